"""The INT8 accuracy gate: use a quantized engine only if it still finds what the FP16 one finds.

Why: INT8 calibration can go wrong silently (too few or unrepresentative calibration images, a
layer that does not quantize well).  The engine then runs fast and labels badly, and nothing in the
daemon would notice.  There is usually no labeled data on site, but the FP16 engine of the same
model is a trusted reference, so the gate scores the INT8 engine's detections with the FP16
detections as the ground truth, on images held back from calibration:

* mAP50 of INT8 against FP16 is 1.0 (100 points) when both give the same boxes;
* the drop is ``100 * (1 - mAP50)`` points; INT8 is accepted when the drop is at most
  ``margin_points`` (2.0 by default), and refused otherwise (the caller then runs the reference build
  and says what that runs: FP32 where ONNX Runtime stands in for a failed FP16 engine);
* no held-back image, or no readable one: refused (nothing was checked);
* the reference finds nothing on every image: refused, because agreement on empty frames says
  nothing about accuracy (give images that show the objects the model should find).

Both detectors run with their own configured thresholds, so the gate judges the labels the daemon
would actually publish.  The result is small and JSON-serialisable (:meth:`GateResult.to_json`) so
it can be cached next to the engine and not re-run at every start; ``candidate_sha256`` and
``reference_sha256`` tell whether a cached verdict is still about the same two files.

The COCO scoring lives in :mod:`edge.evaluate`: one implementation for ``edgelabel eval`` and
this gate.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from edgelabel.edge.evaluate import NoGroundTruthError, map_against_reference
from edgelabel.edge.progress import Progress
from edgelabel.edge.sources.imageio import ImageRejected, decode_image_file
from edgelabel.engines.base import Detection
from edgelabel.engines.detector import Detector

log = logging.getLogger(__name__)

#: version of the JSON written by :meth:`GateResult.to_json`
GATE_JSON_VERSION = 1
#: the drop is rounded to this many decimals before the comparison, so 100 * (1 - 0.98) == 2.0 exactly
_DROP_DECIMALS = 6


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict and the numbers behind it (mAP values 0..1, drop and margin in points)."""

    accepted: bool
    map50: float
    map50_95: float
    drop_points: float
    margin_points: float
    images: int
    reason: str
    candidate_sha256: str = ""
    reference_sha256: str = ""

    def to_json(self) -> str:
        """The verdict as one JSON object (with a format version), to cache next to the engine."""
        return json.dumps({"version": GATE_JSON_VERSION, **asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GateResult:
        """Read :meth:`to_json` output back; ``ValueError`` naming the field when it is not one.

        A cache that fails here should be deleted and the gate run again.
        """
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"INT8 gate result: not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"INT8 gate result: expected a JSON object, got {type(data).__name__}")
        version = data.pop("version", None)
        if version != GATE_JSON_VERSION:
            raise ValueError(f"INT8 gate result: version {version!r} (this edgelabel reads version {GATE_JSON_VERSION})")
        kinds: dict[str, type | tuple[type, ...]] = {
            "accepted": bool,
            "map50": (int, float),
            "map50_95": (int, float),
            "drop_points": (int, float),
            "margin_points": (int, float),
            "images": int,
            "reason": str,
            "candidate_sha256": str,
            "reference_sha256": str,
        }
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                if f.name in ("candidate_sha256", "reference_sha256"):
                    continue
                raise ValueError(f"INT8 gate result: field {f.name!r} is missing")
            value = data.pop(f.name)
            kind = kinds[f.name]
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise ValueError(f"INT8 gate result: field {f.name!r} has the wrong type ({type(value).__name__})")
            values[f.name] = float(value) if kind == (int, float) else value
        if data:
            raise ValueError(f"INT8 gate result: unknown field(s) {', '.join(sorted(data))}")
        return cls(**values)

    def matches(self, candidate_sha256: str, reference_sha256: str, margin_points: float) -> bool:
        """Whether this (cached) verdict was reached for these two model files and this margin."""
        return (
            self.candidate_sha256 == candidate_sha256
            and self.reference_sha256 == reference_sha256
            and math.isclose(self.margin_points, margin_points)
        )


def _points(value: float, other: float) -> str:
    """One decimal, or two when one decimal would print a refused drop equal to the margin."""
    text = f"{value:.1f}"
    return f"{value:.2f}" if text == f"{other:.1f}" and value != other else text


def judge(
    map50: float,
    map50_95: float,
    images: int,
    margin_points: float = 2.0,
    *,
    candidate_sha256: str = "",
    reference_sha256: str = "",
) -> GateResult:
    """The verdict for a measured mAP50 (0..1) of the candidate against the reference.

    Accepted when ``100 * (1 - map50) <= margin_points``; the drop is rounded to 6 decimals first,
    so a drop of exactly the margin is accepted despite floating-point noise.  The sha256 values
    identify the two model files for the cache (:meth:`GateResult.matches`).
    """
    if not math.isfinite(margin_points) or margin_points < 0:
        raise ValueError(f"margin_points must be a number >= 0, got {margin_points}")
    drop = round(100.0 * (1.0 - map50), _DROP_DECIMALS)
    accepted = drop <= margin_points
    score = f"mAP50 vs FP16 is {100.0 * map50:.1f}"
    if accepted:
        reason = f"INT8 accepted: {score} (drop {_points(drop, margin_points)} <= {margin_points:.1f} points, {images} images)"
    else:
        reason = f"INT8 refused: {score} (drop {_points(drop, margin_points)} > {margin_points:.1f} points)"
    return GateResult(
        accepted=accepted,
        map50=map50,
        map50_95=map50_95,
        drop_points=drop,
        margin_points=float(margin_points),
        images=images,
        reason=reason,
        candidate_sha256=candidate_sha256,
        reference_sha256=reference_sha256,
    )


def _refused(reason: str, images: int, margin_points: float, **sha256: str) -> GateResult:
    return GateResult(
        accepted=False,
        map50=0.0,
        map50_95=0.0,
        drop_points=100.0,
        margin_points=float(margin_points),
        images=images,
        reason=reason,
        **sha256,
    )


def run_gate(
    candidate: Detector,
    reference: Detector,
    images: list[Path],
    margin_points: float = 2.0,
    progress: bool = True,
) -> GateResult:
    """Run both detectors on the held-back ``images`` and decide whether ``candidate`` may be used.

    ``reference`` is the trusted build (FP16), ``candidate`` the fast one (INT8); the decision
    rule is in the module docstring.  Unreadable images are logged and skipped.  Never raises for
    a data problem: every way the check cannot be made is a refusal whose ``reason`` says what to
    do (the daemon then runs the reference precision).
    """
    if not math.isfinite(margin_points) or margin_points < 0:
        raise ValueError(f"margin_points must be a number >= 0, got {margin_points}")
    sha = {"candidate_sha256": candidate.engine.sha256, "reference_sha256": reference.engine.sha256}
    if not images:
        return _refused(
            "INT8 refused: no held-back images to check it against; give more calibration images "
            "(some are held back for this check)",
            0,
            margin_points,
            **sha,
        )
    ref_dets: list[list[Detection]] = []
    cand_dets: list[list[Detection]] = []
    sizes: list[tuple[int, int]] = []
    bar = Progress(total=len(images), label="INT8 gate", enabled=progress)
    try:
        for path in images:
            try:
                image = decode_image_file(str(path)).image
            except ImageRejected as exc:
                log.warning("INT8 gate: %s skipped (%s)", path, exc.reason)
                bar.update()
                continue
            ref_dets.append(reference.detect(image).detections)
            cand_dets.append(candidate.detect(image).detections)
            sizes.append((image.shape[1], image.shape[0]))
            bar.update()
    finally:
        bar.close()
    if not sizes:
        return _refused(
            f"INT8 refused: none of the {len(images)} held-back images could be read (see the log)",
            0,
            margin_points,
            **sha,
        )
    try:
        map50_95, map50 = map_against_reference(ref_dets, cand_dets, sizes)
    except NoGroundTruthError:
        return _refused(
            f"INT8 refused: FP16 finds no object on the {len(sizes)} held-back images, so INT8 cannot be judged; "
            "give calibration images that show the objects to detect",
            len(sizes),
            margin_points,
            **sha,
        )
    result = judge(map50, map50_95, len(sizes), margin_points, **sha)
    log.log(logging.INFO if result.accepted else logging.WARNING, "%s", result.reason)
    return result
