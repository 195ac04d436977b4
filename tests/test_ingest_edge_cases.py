"""Ingest against odd but possible input: spellings of ids, strings COPY must escape, hostile names.

Each test here stores through the real writer into a real PostgreSQL database of its own (``pg_dsn``).
"""

from __future__ import annotations

import json

import psycopg
import pytest

from tests.test_ingest import label, pg_dsn  # noqa: F401 - pg_dsn is a fixture

TOPIC = "edgelabel/cam-1/gate/labels"


def _msg(rec: dict | bytes, mid: int = 1):
    from edgelabel.ingest.db import Message

    return Message(TOPIC, rec if isinstance(rec, bytes) else json.dumps(rec).encode(), mid, 1)


def test_an_id_in_uppercase_or_braces_is_stored_once_with_its_boxes(pg_dsn):  # noqa: F811
    """PostgreSQL reads a uuid in any spelling; the COPY of the boxes must find the record all the same."""
    from edgelabel.ingest.db import Writer, migrate

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        migrate(conn)
        writer = Writer(conn, "edgelabel")
        rec = label("cam-1", "gate", 1)
        upper = {**rec, "id": rec["id"].upper()}
        braces = {**rec, "id": "{" + rec["id"] + "}"}
        result = writer.write([_msg(upper, 1), _msg(braces, 2)])
        assert result.inserted["labels"] == 1 and result.duplicates == 1 and result.rejected == 0
        again = writer.write([_msg(rec, 3)])  # the canonical spelling redelivered
        assert again.inserted["labels"] == 0 and again.duplicates == 1
        assert conn.execute("SELECT count(*) FROM records").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM detections WHERE record_id = %s", (rec["id"],)).fetchone()[0] == 2
        bad = writer.write([_msg({**label("cam-1", "gate", 2), "id": "not-a-uuid"}, 4)])
        assert bad.rejected == 1
        err = conn.execute("SELECT error FROM rejected_messages").fetchone()[0]
        assert err.startswith("id: 'not-a-uuid' is not a UUID")


def test_labels_with_tabs_newlines_backslashes_and_non_ascii_come_back_as_sent(pg_dsn):  # noqa: F811
    from edgelabel.ingest.db import Writer, migrate

    odd = "a\tb\nc\\d\\N\r é 人 \\."
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        migrate(conn)
        rec = label("cam-1", "gate", 1)
        rec["detections"][0]["label"] = odd
        nul = label("cam-1", "gate", 2)
        nul["detections"][0]["label"] = "x\x00y"  # PostgreSQL text cannot hold NUL: rejected, kept, not lost
        result = Writer(conn, "edgelabel").write_each([_msg(rec, 1), _msg(nul, 2)])
        assert result.inserted["labels"] == 1 and result.rejected == 1
        assert conn.execute("SELECT label FROM detections WHERE idx = 0").fetchone()[0] == odd


# --- frames from a hostile or broken appliance --------------------------------------------------------------


class RawAppliance:
    """An HTTP server that answers every request the way ``mode`` says, recording what it was sent.

    drip: headers, then one body byte every 0.3 s (for minutes); redirect: 302 to ``location``; ok: a frame.
    """

    def __init__(self, mode: str, location: str = "", body: bytes = b"") -> None:
        import socket
        import threading

        self.mode, self.location, self.body = mode, location, body
        self.requests: list[str] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn) -> None:  # noqa: ANN001 - a socket
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            self.requests.append(head.decode("latin-1"))
            if self.mode == "redirect":
                conn.sendall(f"HTTP/1.1 302 Found\r\nLocation: {self.location}\r\nContent-Length: 0\r\n"
                             "Connection: close\r\n\r\n".encode())
            elif self.mode in ("drip", "drip-error"):
                status = b"500 Internal Server Error" if self.mode == "drip-error" else b"200 OK"
                conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n")
                for _ in range(1000):
                    if self.closed.wait(0.3):
                        break
                    conn.sendall(b"x")
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: "
                             + str(len(self.body)).encode() + b"\r\nConnection: close\r\n\r\n" + self.body)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.closed.set()
        self.sock.close()


def _fetch_one(dsn: str, device: str, frames: dict, until, timeout: float = 30.0) -> dict:
    """Store one label record naming a frame for ``device``, run the real fetcher until ``until(row)``."""
    import hashlib
    import time

    from prometheus_client import CollectorRegistry

    from edgelabel.ingest.config import ingest_config_from_dict
    from edgelabel.ingest.db import Writer, migrate
    from edgelabel.ingest.frames import FrameFetcher

    cfg = ingest_config_from_dict({"frames": {"enabled": True, "rate": 100, "backoff_min": 60, **frames}}).frames
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate(conn)
        rec = {**label("cam-1", "gate", 1), "device_id": device,
               "frame_sha256": hashlib.sha256(b"frame").hexdigest(), "frame_path": "/data/f.jpg"}
        assert Writer(conn, "edgelabel").write([_msg(rec)]).inserted["labels"] == 1
        fetcher = FrameFetcher(cfg, dsn, registry=CollectorRegistry())
        fetcher.start()
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                cur = conn.cursor(row_factory=psycopg.rows.dict_row)
                row = cur.execute("SELECT * FROM frames").fetchone()
                if until(row):
                    return row
                time.sleep(0.2)
            raise AssertionError(f"the frame's row did not get there in {timeout:.0f} s: {row}")
        finally:
            fetcher.stop()


def test_a_device_id_cannot_steer_the_token_to_another_host(pg_dsn, tmp_path):  # noqa: F811
    """frames.url's {device} is filled with the device id of the message: an id that is not a plain name
    (an '@', a '/', a '#') is refused instead of becoming part of the address the token is sent to."""
    catcher = RawAppliance("ok", body=b"frame")
    try:
        device = f"127.0.0.1:{catcher.port}/#"
        (tmp_path / "nas").mkdir()
        row = _fetch_one(pg_dsn, device, {"folder": str(tmp_path / "nas"), "url": "http://{device}.plant.invalid:1",
                                          "token": "viewer-token-0123456789abcdef"},
                         lambda r: r["status"] != "pending")
        assert not catcher.requests, catcher.requests
        assert row["status"] == "failed" and "cannot go into frames.url" in row["last_error"]
    finally:
        catcher.close()


def test_a_redirect_is_not_followed_with_the_token(pg_dsn, tmp_path):  # noqa: F811
    elsewhere = RawAppliance("ok", body=b"frame")
    redirect = RawAppliance("redirect", location=f"http://127.0.0.1:{elsewhere.port}/steal")
    try:
        (tmp_path / "nas").mkdir()
        row = _fetch_one(pg_dsn, "cam-1", {"folder": str(tmp_path / "nas"), "url": f"http://127.0.0.1:{redirect.port}",
                                           "token": "viewer-token-0123456789abcdef"},
                         lambda r: r["attempts"] >= 1)
        assert redirect.requests and "Bearer viewer-token" in redirect.requests[0]
        assert not elsewhere.requests, "the redirect was followed"
        assert row["status"] == "pending" and "302" in row["last_error"] and "not followed" in row["last_error"]
    finally:
        redirect.close()
        elsewhere.close()


@pytest.mark.parametrize("mode", ["drip", "drip-error"])
def test_an_appliance_dripping_its_answer_is_cut_off_after_the_timeout(pg_dsn, tmp_path, mode):  # noqa: F811
    """frames.timeout bounds the whole answer, not each read: a byte every 0.3 s does not hold the thread
    (an image, or the body of an error answer, whose reason is read for last_error)."""
    import time

    drip = RawAppliance(mode)
    try:
        (tmp_path / "nas").mkdir()
        t0 = time.monotonic()
        row = _fetch_one(pg_dsn, "cam-1", {"folder": str(tmp_path / "nas"), "url": f"http://127.0.0.1:{drip.port}",
                                           "timeout": 1.0, "workers": 1}, lambda r: r["attempts"] >= 1, timeout=40)
        # the drip lasts 300 s; a cut after ~1 s (margin for a loaded machine)
        assert time.monotonic() - t0 < 40
        if mode == "drip":
            assert "longer than frames.timeout" in row["last_error"], row["last_error"]
        else:
            assert "answered 500" in row["last_error"], row["last_error"]
    finally:
        drip.close()


# --- the central export over records ingest stored as they came -------------------------------------------


def test_a_malformed_record_is_listed_by_the_central_export_and_the_others_are_exported(pg_dsn, tmp_path):  # noqa: F811
    """Ingest keeps any JSON object; a record with a width of 1280.5 or a review whose boxes lack class_id
    is left out with its reason, the rest is a valid COCO dataset (before: the whole export failed)."""
    import hashlib

    from edgelabel.ingest.db import Message, Writer, migrate
    from edgelabel.ingest.export import export_central
    from edgelabel.ingest.framestore import FolderStore, frame_location
    from tests.test_ingest import review

    (tmp_path / "nas").mkdir()
    store = FolderStore(tmp_path / "nas")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        migrate(conn)
        writer = Writer(conn, "edgelabel")
        recs = [label(f"cam-{i}", "gate", i) for i in range(4)]
        recs[1]["width"] = 1280.5
        recs[2]["height"] = "tall"
        bad_review = review(recs[3], 1, "corrected", [[1.0, 2.0, 30.0, 40.0]])
        bad_review["detections"] = [{"label": "truck", "box": [1, 2, 3, 4]}]
        for rec in recs:
            data = rec["id"].encode()
            rec["frame_sha256"], rec["frame_path"] = hashlib.sha256(data).hexdigest(), "/d/f.jpg"
            loc = frame_location(rec["device_id"], rec["source"], rec["frame_sha256"], "jpg")
            store.put(loc, data, rec["frame_sha256"])
        msgs = [Message(f"edgelabel/{r['device_id']}/gate/labels", json.dumps(r).encode(), i, 1)
                for i, r in enumerate(recs)]
        msgs.append(Message("edgelabel/cam-3/review", json.dumps(bad_review).encode(), 9, 1))
        assert writer.write(msgs).rejected == 0
        conn.execute("UPDATE frames SET status = 'fetched', location = device || '/gate/' || left(frame_sha256, 2) "
                     "|| '/' || frame_sha256 || '.jpg'")
        for fmt in ("coco", "yolo"):
            res = export_central(conn, store, fmt, tmp_path / f"out-{fmt}")
            assert res.images == 1 and res.devices == {"cam-0": 1}
            reasons = {m["record_id"]: m["reason"] for m in res.not_exported}
            assert "1280.5" in reasons[recs[1]["id"]] and "'tall'" in reasons[recs[2]["id"]]
            assert reasons[recs[3]["id"]].startswith("the reviewed boxes: detections[0].class_id is None")
        doc = json.loads((tmp_path / "out-coco" / "annotations" / "instances_default.json").read_text())
        cats = {c["id"] for c in doc["categories"]}
        assert doc["annotations"] and all(a["category_id"] in cats for a in doc["annotations"])
        assert {a["image_id"] for a in doc["annotations"]} <= {i["id"] for i in doc["images"]}


def test_long_device_and_source_names_from_a_foreign_publisher_still_export(pg_dsn, tmp_path):  # noqa: F811
    """The daemon's names are at most 64 characters; ingest takes longer ones from any publisher, and the
    export's file name (device, source, index, id) must still fit a file system's 255 bytes."""
    import hashlib

    from edgelabel.ingest.db import Message, Writer, migrate
    from edgelabel.ingest.export import export_central
    from edgelabel.ingest.framestore import FolderStore, frame_location

    (tmp_path / "nas").mkdir()
    store = FolderStore(tmp_path / "nas")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        migrate(conn)
        recs = [label("d" * 200 + str(i), "s" * 200, i) for i in range(2)]
        for rec in recs:
            data = rec["id"].encode()
            rec["frame_sha256"], rec["frame_path"] = hashlib.sha256(data).hexdigest(), "/d/f.png"
            loc = frame_location(rec["device_id"], rec["source"], rec["frame_sha256"], "png")
            store.put(loc, data, rec["frame_sha256"])
        msgs = [Message(f"edgelabel/{r['device_id']}/{r['source']}/labels", json.dumps(r).encode(), i, 1)
                for i, r in enumerate(recs)]
        assert Writer(conn, "edgelabel").write(msgs).inserted["labels"] == 2
        for rec in recs:
            conn.execute("UPDATE frames SET status = 'fetched', location = %s WHERE record_id = %s",
                         (frame_location(rec["device_id"], rec["source"], rec["frame_sha256"], "png"), rec["id"]))
        res = export_central(conn, store, "yolo", tmp_path / "out")
        assert res.images == 2 and not res.not_exported
        names = [p.name for p in (tmp_path / "out" / "images" / "train").iterdir()]
        assert len(set(names)) == 2 and all(len(n.encode()) <= 255 for n in names)


def test_a_deeply_nested_or_infinite_payload_is_rejected_and_the_batch_stored(pg_dsn):  # noqa: F811
    """JSON nested 100 000 deep (RecursionError in the parser) or a 1e999 where an integer goes (int(inf):
    OverflowError) is one bad message: kept in rejected_messages, the rest of its batch stored.  Raised out
    of the writer, it stopped the worker, and again on each redelivery."""
    from edgelabel.ingest.db import Message, Writer, migrate

    good = label("cam-1", "gate", 1)
    huge_index = json.dumps(label("cam-1", "gate", 2)).replace('"frame_index": 2', '"frame_index": 1e999')
    huge_class = json.dumps(label("cam-1", "gate", 3)).replace('"class_id": 0', '"class_id": 1e999', 1)
    huge_ts = json.dumps({**label("cam-1", "gate", 4), "captured_at": None, "captured_ts": 1e300})
    assert "1e999" in huge_index and "1e999" in huge_class
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        migrate(conn)
        batch = [Message(TOPIC, b"[" * 100_000, 1, 1), Message(TOPIC, b'{"a":' * 100_000, 2, 1),
                 Message(TOPIC, huge_index.encode(), 3, 1), Message(TOPIC, huge_class.encode(), 4, 1),
                 Message(TOPIC, huge_ts.encode(), 5, 1), _msg(good, 6)]
        result = Writer(conn, "edgelabel").write(batch)
        assert result.inserted["labels"] == 1 and result.rejected == 5
        assert conn.execute("SELECT id::text FROM records").fetchone()[0] == good["id"]


def test_a_plant_view_on_the_history_tables_stops_the_upgrade_with_what_to_do(pg_dsn):  # noqa: F811
    """Migration 003 rebuilds track_events, alarms and device_status; a view of the plant's own on one of
    them makes it fail.  The database stays at version 2, and the error names the view and says what to
    do (not PostgreSQL's 'DROP ... CASCADE', and not a retry for ever)."""
    import pytest

    from edgelabel.ingest import db

    every = db.migrations()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        old = db.migrations
        db.migrations = lambda: every[:2]  # an earlier edgelabel
        try:
            assert db.migrate(conn) == 2
        finally:
            db.migrations = old
        conn.execute("CREATE VIEW line_alarms AS SELECT device, at FROM alarms")
        with pytest.raises(RuntimeError) as err:
            db.migrate(conn)
        text = str(err.value)
        assert "003_history_partitions.sql" in text and "line_alarms" in text and "not changed" in text
        assert "CASCADE" not in text
        assert conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] == 2
        conn.execute("DROP VIEW line_alarms")
        assert db.migrate(conn) == len(every)
