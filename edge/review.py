"""Human review of the captured frames: the queue, the decisions, and the message each decision publishes.

A frame in the dataset is in one of five states (``edge.sinks.dataset.STATES``):

* ``auto_accepted`` -- the capture policy kept it and trusts the detector's boxes;
* ``needs_review``  -- the policy wants a person to look (a score near the threshold, or ``review: all``);
* ``accepted``      -- a person confirmed the boxes as the detector made them;
* ``corrected``     -- a person changed them (deleted, re-classed, moved, resized or drew a box);
* ``rejected``      -- a person threw the frame out: its label file is removed and a stored image moves
  to ``rejected/``, so neither Ultralytics nor the COCO file sees it; rotation removes these first.

Decisions (:meth:`ReviewStore.decide`): ``accept`` (the boxes as they are now, or as sent),
``update`` (a new box list: every edit is saved at once), ``reject`` and ``reopen`` (back to
``needs_review``, boxes kept).  After ``accept``/``update`` the state is derived, not chosen:
``accepted`` when the boxes equal the detector's (same classes, within half a pixel), else
``corrected`` -- so undoing an edit by hand makes the frame ``accepted`` again, and "accept"
after edits keeps it ``corrected``.

Each decision is one transaction in ``index.sqlite`` (state, boxes, who, when, a bumped ``version``
and a ``review_log`` row), then the frame's YOLO file and the COCO file are rewritten atomically
(see :meth:`edge.sinks.dataset.DatasetIndex.update_review`), then a review message is handed to
``publish`` (the daemon passes the MQTT sink's ``publish_review``: ``<prefix>/<device>/review``,
schema ``edge/schemas/review.v1.json``).  A request may name the ``version`` it showed the person; if
someone else changed the frame meanwhile it is refused (:class:`edge.sinks.dataset.VersionConflict`).

The queue lists ``needs_review`` frames, most uncertain first (``uncertainty`` from the capture
policy), oldest first among equals.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from edgelabel.edge.records import iso_utc
from edgelabel.edge.sinks.dataset import REVIEWED, STATES, DatasetIndex, VersionConflict
from edgelabel.engines.models.nms import box_iou

log = logging.getLogger(__name__)

ACTIONS = ("accept", "update", "reject", "reopen")
SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).parent / "schemas" / "review.v1.json"
#: the most boxes one frame may carry: a detector gives at most 300 (``engines.models.nms.MAX_DET``), which
#: leaves a reviewer room to draw; a bound on what one request can make us check, diff and write under the lock
MAX_BOXES = 500
#: a box must be at least this many pixels wide and high
MIN_BOX = 1.0
#: boxes within this many pixels count as unchanged
SAME_BOX_PX = 0.5
MAX_REVIEWER = 64

__all__ = ["ACTIONS", "MAX_BOXES", "REVIEWED", "STATES", "ReviewError", "ReviewStore", "VersionConflict", "check_request",
           "load_schema"]


class ReviewError(ValueError):
    """A decision that cannot be applied as asked (unknown action or class, a bad box); the message says why."""


def check_request(action: Any, detections: Any) -> None:
    """What a decision must look like, checked without the dataset (so before any lock): a known action, and
    for a box list at most MAX_BOXES objects with an integer ``class_id`` and four finite numbers as ``box``.
    The class range and the frame's size are checked by :meth:`ReviewStore.decide`.  Raises ReviewError."""
    if action not in ACTIONS:
        raise ReviewError(f"unknown action {action!r} (use {', '.join(ACTIONS)})")
    if action == "update" and detections is None:
        raise ReviewError("update needs the frame's detections (the whole list, as it should be)")
    if detections is None:
        return
    if not isinstance(detections, list):
        raise ReviewError("detections must be a list of {class_id, box: [x1, y1, x2, y2]}")
    if len(detections) > MAX_BOXES:
        raise ReviewError(f"detections: {len(detections)} boxes; at most {MAX_BOXES} per frame")
    for i, d in enumerate(detections):
        if not isinstance(d, dict):
            raise ReviewError(f"detections[{i}]: expected an object")
        cls = d.get("class_id")
        if isinstance(cls, bool) or not isinstance(cls, int):
            raise ReviewError(f"detections[{i}].class_id: {cls!r} is not a class number")
        box = d.get("box")
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            raise ReviewError(f"detections[{i}].box: expected [x1, y1, x2, y2] in pixels")


def load_schema() -> dict[str, Any]:
    """The JSON Schema of the review message."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def clean_reviewer(name: str | None, default: str = "operator") -> str:
    """A reviewer name fit for the index and the log: printable, one line, at most MAX_REVIEWER characters."""
    text = " ".join("".join(c if c.isprintable() else " " for c in (name or "")).split())[:MAX_REVIEWER]
    return text or default


class ReviewStore:
    """The review queue and decisions over one dataset index (the daemon's own, or one opened here)."""

    def __init__(self, index: DatasetIndex, *, publish: Callable[[dict[str, Any]], bool] | None = None,
                 owns_index: bool = False) -> None:
        self.index = index
        self.publish = publish
        self._owns_index = owns_index

    @classmethod
    def open(cls, root: Path, *, formats: Iterable[str] = ("yolo", "coco"),
             publish: Callable[[dict[str, Any]], bool] | None = None) -> ReviewStore:
        """A store over the dataset at ``root`` without a running sink (tests, tools); close it after use."""
        index = DatasetIndex(root, formats=formats)
        index.open()
        return cls(index, publish=publish, owns_index=True)

    def close(self) -> None:
        if self._owns_index:
            self.index.close()

    @property
    def names(self) -> list[str]:
        return self.index.names

    # ------------------------------------------------------------------ reading

    def counts(self) -> dict[str, int]:
        """Frames per review state."""
        return dict(self.index.counts()["states"])

    def queue(self, *, state: str = "needs_review", source: str | None = None, limit: int = 50,
              offset: int = 0) -> dict[str, Any]:
        """Frames in ``state``, most uncertain first (then oldest first): ``{total, limit, offset, items}``."""
        if state not in STATES:
            raise ReviewError(f"unknown state {state!r} (use {', '.join(STATES)})")
        where, params = "state = ?", [state]
        if source:
            where += " AND source = ?"
            params.append(source)
        rows = self.index.select(where, params, order="uncertainty DESC, created, rowid", limit=limit, offset=offset)
        return {"total": self.index.count(where, params), "limit": limit, "offset": offset,
                "items": [self._summary(r) for r in rows]}

    def item(self, record_id: str) -> dict[str, Any]:
        """One frame with its boxes, the detector's boxes, its state and history (KeyError if unknown)."""
        row = self.index.row(record_id)
        if row is None:
            raise KeyError(record_id)
        return self._detail(row)

    def image_path(self, record_id: str) -> Path | None:
        """The file with the frame's pixels, if it still exists (KeyError if the frame is unknown)."""
        row = self.index.row(record_id)
        if row is None:
            raise KeyError(record_id)
        path = self.index.image_file(row)
        return path if path is not None and path.is_file() else None

    def image_bytes(self, record_id: str) -> tuple[bytes, str] | None:
        """(bytes, suffix) of the frame's pixels as they were labeled; None when gone or changed since
        (KeyError if the frame is unknown).  Read once: what is checked is what is served."""
        row = self.index.row(record_id)
        if row is None:
            raise KeyError(record_id)
        path = self.index.image_file(row)
        data = self.index.read_verified(row) if path is not None else None
        return (data, path.suffix.lower()) if data is not None and path is not None else None

    def next_id(self, after: str | None = None) -> str | None:
        """The queue's first frame other than ``after`` (what "next" shows)."""
        rows = self.index.select("state = 'needs_review'" + (" AND id != ?" if after else ""), [after] if after else [],
                                 order="uncertainty DESC, created, rowid", limit=1)
        return rows[0]["id"] if rows else None

    # ------------------------------------------------------------------ deciding

    def decide(self, record_id: str, action: str, *, by: str | None = None,
               detections: list[dict[str, Any]] | None = None, version: int | None = None,
               context: dict[str, Any] | None = None) -> dict[str, Any]:
        """Apply one decision and publish it; returns ``{"item": ..., "published": bool}``.

        ``context`` (how the decision arrived, e.g. ``{"via": "session", "address": ...}``) is kept in the
        review log with the box changes, for audits.

        Raises KeyError (unknown frame), ReviewError (bad request), VersionConflict, or
        OSError/sqlite3.Error (the dataset could not be written; see DatasetIndex.update_review).
        """
        check_request(action, detections)
        reviewer = clean_reviewer(by)
        # Everything that needs no lock is done first: the boxes are checked and clipped (a frame's size never
        # changes), the new state and the change summary derived from the row as read now.  Under the lock only
        # the version is compared and the row written; derived again there only if the row changed meanwhile.
        seen = self.index.row(record_id)
        if seen is None:
            raise KeyError(record_id)
        boxes = self._validated(detections, seen["width"], seen["height"]) if detections is not None else None
        plan = self._plan(seen, action, boxes)
        with self.index.lock:  # read, compare and write as one step: another decision cannot slip in between
            row = self.index.row(record_id)
            if row is None:
                raise KeyError(record_id)
            if version is not None and row["version"] != version:
                raise VersionConflict(row["version"])
            if row["version"] != seen["version"]:  # another decision came between: derive from the row as it is
                plan = self._plan(row, action, boxes)
            state, new_boxes, changes = plan
            now = time.time()
            at = iso_utc(now)
            detail = dict(context or {})
            if changes is not None:
                detail["changes"] = changes
            before, after = self.index.update_review(
                record_id, action=action, state=state, detections=new_boxes, by=reviewer, at=at,
                expect_version=version, detail=detail or None, write_coco=False)
        self.index.write_coco()  # the lock is free again: the sink thread indexes frames meanwhile
        log.info("review: %s %s frame %s of %s (%s -> %s, version %d)", reviewer, action, row["frame_index"],
                 row["source"], before["state"], state, after["version"])
        published = False
        if self.publish is not None:
            doc = self.message(after, action=action, previous_state=before["state"], ts=now)
            try:
                published = bool(self.publish(doc))
            except Exception:  # the decision is saved; a broker problem must not undo or hide it
                log.exception("review: publishing the decision about %s failed", record_id)
            if not published:
                log.warning("review: the decision about %s is saved but was not queued for MQTT", record_id)
        return {"item": self._detail(after), "published": published}

    @staticmethod
    def _plan(row: sqlite3.Row, action: str, boxes: list[dict[str, Any]] | None
              ) -> tuple[str, list[dict[str, Any]], dict[str, int] | None]:
        """(new state, the frame's boxes after the decision, the change summary or None) for ``row``."""
        current = json.loads(row["detections"])
        model = json.loads(row["model_detections"]) if row["model_detections"] else current
        new = current if boxes is None else boxes
        if action == "reject":
            state = "rejected"
        elif action == "reopen":
            state = "needs_review"
        else:
            state = "accepted" if same_boxes(new, model) else "corrected"
        return state, new, (None if boxes is None else diff_boxes(current, boxes))

    def _validated(self, detections: Any, width: int, height: int) -> list[dict[str, Any]]:
        """The boxes of a request, checked and clipped to the frame; class names come from the index."""
        check_request("update", detections)
        names = self.names
        out: list[dict[str, Any]] = []
        for i, d in enumerate(detections):
            if not isinstance(d, dict):
                raise ReviewError(f"detections[{i}]: expected an object")
            cls = d.get("class_id")
            if isinstance(cls, bool) or not isinstance(cls, int) or not 0 <= cls < len(names):
                raise ReviewError(f"detections[{i}].class_id: {cls!r} is not a class of this dataset (0..{len(names) - 1})")
            box = d.get("box")
            if (not isinstance(box, list) or len(box) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
                raise ReviewError(f"detections[{i}].box: expected [x1, y1, x2, y2] in pixels")
            x1, y1, x2, y2 = (float(v) for v in box)
            x1, x2 = sorted((min(max(x1, 0.0), width), min(max(x2, 0.0), width)))
            y1, y2 = sorted((min(max(y1, 0.0), height), min(max(y2, 0.0), height)))
            if x2 - x1 < MIN_BOX or y2 - y1 < MIN_BOX:
                raise ReviewError(f"detections[{i}].box: smaller than {MIN_BOX:g} pixel inside the frame")
            score = d.get("score")
            if not (isinstance(score, (int, float)) and not isinstance(score, bool) and 0.0 <= score <= 1.0):
                score = None  # a box a person drew has no detector score
            out.append({"class_id": cls, "label": names[cls], "score": score,
                        "box": [round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2)]})
        return out

    # ------------------------------------------------------------------ shapes

    def message(self, row: sqlite3.Row, *, action: str, previous_state: str, ts: float) -> dict[str, Any]:
        """The review message (review.v1.json without device_id, which the MQTT sink adds)."""
        w, h = row["width"], row["height"]
        dets = []
        for d in json.loads(row["detections"]):
            x1, y1, x2, y2 = d["box"]
            dets.append({**d, "box_norm": [round(x1 / w, 6), round(y1 / h, 6), round(x2 / w, 6), round(y2 / h, 6)]})
        return {
            "schema_version": SCHEMA_VERSION,
            "id": str(uuid.uuid4()),
            "type": "review",
            "record_id": row["id"],
            "source": row["source"],
            "frame_index": row["frame_index"],
            "frame_key": row["frame_key"],
            "action": action,
            "state": row["state"],
            "previous_state": previous_state,
            "by": row["reviewed_by"],
            "at": row["reviewed_at"],
            "ts": round(ts, 3),
            "version": row["version"],
            "width": w,
            "height": h,
            "detections": dets,
            "image": row["image_path"],
        }

    def _summary(self, row: sqlite3.Row) -> dict[str, Any]:
        return {
            "id": row["id"],
            "source": row["source"],
            "frame_index": row["frame_index"],
            "captured_at": row["captured_at"],
            "state": row["state"],
            "uncertainty": row["uncertainty"],
            "n_detections": row["n_detections"],
            "reviewed_by": row["reviewed_by"],
            "reviewed_at": row["reviewed_at"],
            "version": row["version"],
        }

    def _detail(self, row: sqlite3.Row) -> dict[str, Any]:
        current = json.loads(row["detections"])
        model = json.loads(row["model_detections"]) if row["model_detections"] else current
        image = self.index.image_file(row)
        return {
            **self._summary(row),
            "frame_key": row["frame_key"],
            "width": row["width"],
            "height": row["height"],
            "detections": current,
            "model_detections": model,
            "image": row["image_path"],
            "image_available": image is not None and image.is_file() and not self.index.original_changed(row, image),
            "history": self.index.history(row["id"]),
        }


def _key(d: dict[str, Any]) -> tuple[Any, ...]:
    return (d["class_id"], *(round(float(v), 1) for v in d["box"]))


def same_boxes(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """The same boxes in any order: same classes, corners within SAME_BOX_PX pixels."""
    if len(a) != len(b):
        return False
    for x, y in zip(sorted(a, key=_key), sorted(b, key=_key), strict=True):
        if x["class_id"] != y["class_id"] or any(abs(float(p) - float(q)) > SAME_BOX_PX for p, q in zip(x["box"], y["box"], strict=True)):
            return False
    return True


def diff_boxes(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> dict[str, int]:
    """How many boxes a decision kept, re-classed, moved, removed and added (for the review log)."""
    unmatched = list(old)
    kept = reclassed = moved = 0
    for d in new:
        best, best_iou = None, 0.0
        for o in unmatched:
            iou = box_iou(o["box"], d["box"])
            if iou > best_iou:
                best, best_iou = o, iou
        if best is None or best_iou < 0.3:
            continue
        unmatched.remove(best)
        if best["class_id"] != d["class_id"]:
            reclassed += 1
        elif any(abs(float(p) - float(q)) > SAME_BOX_PX for p, q in zip(best["box"], d["box"], strict=True)):
            moved += 1
        else:
            kept += 1
    matched = kept + reclassed + moved
    return {"kept": kept, "reclassed": reclassed, "moved": moved, "removed": len(old) - matched,
            "added": len(new) - matched}
