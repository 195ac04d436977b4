"""A damaged outbox file costs only what is damaged: bytes overwritten or cut off inside a real outbox file.

Before, a malformed page made every fetch fail ("database disk image is malformed") for ever, after every
restart, with no alarm; a file SQLite could not open was moved aside and its messages vanished uncounted.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from edgelabel.edge.health import outbox_alarms
from edgelabel.edge.sinks.outbox import Message, Outbox

N = 2000


def fill(path: Path, n: int = N) -> None:
    box = Outbox(path)
    box.put([Message("cam1", "el/dev/cam1/labels", (f'{{"i":{i},"pad":"' + "x" * 150 + '"}').encode(), 1, False,
                     f"cam1-{i}") for i in range(n)])
    box.close()  # checkpointed: every row is in the main file


def table_leaf_pages(path: Path) -> list[int]:
    """Page numbers (1-based) of the outbox table's leaf pages, from SQLite itself (dbstat is not always built)."""
    data = path.read_bytes()
    page = int.from_bytes(data[16:18], "big")
    return [i // page + 1 for i in range(page, len(data), page) if data[i] == 0x0D]


def snapshot(box: Outbox) -> dict:
    return {"sinks": {"mqtt": {"outbox": box.stats(), "last_error": None}}}


def test_a_garbage_page_in_the_middle_loses_only_its_rows(tmp_path: Path, caplog) -> None:
    path = tmp_path / "outbox.sqlite"
    fill(path)
    leaves = table_leaf_pages(path)
    victim = leaves[len(leaves) // 2]
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    on_page = int.from_bytes(data[(victim - 1) * page + 3:(victim - 1) * page + 5], "big")
    data[(victim - 1) * page:(victim) * page] = bytes([0xA5]) * page  # a page of garbage
    path.write_bytes(bytes(data))
    with sqlite3.connect(path) as db:  # the old failure: the rows cannot be read
        try:
            db.execute("SELECT payload FROM outbox ORDER BY seq").fetchall()
            raise AssertionError("the damage should make a full read fail")
        except sqlite3.DatabaseError as exc:
            assert "malformed" in str(exc)
    caplog.set_level(logging.ERROR)
    box = Outbox(path)
    rows = box.fetch(0, 10 * N)  # salvaged on the spot instead of failing for ever
    got = [int(r.msg_id.split("-")[1]) for r in rows]
    assert got == sorted(got) and len(got) == N - on_page and box.lost == on_page
    assert box.depth == N - on_page and box.dropped == on_page
    assert any("corrupt" in r.getMessage() and f"{on_page} message(s) could not be read" in r.getMessage()
               for r in caplog.records)
    [alarm] = outbox_alarms(snapshot(box))
    assert alarm["id"] == "outbox_lost" and alarm["severity"] == "error"
    assert list(tmp_path.glob("outbox.sqlite.corrupt-*"))  # the damaged file is kept for a post-mortem
    # delivery goes on: acknowledge, store new messages, read them back
    box.ack(r.seq for r in rows)
    box.put([Message("cam1", "el/dev/cam1/labels", b"{}", 1, False, "new")])
    assert [r.msg_id for r in box.fetch(0, 10)] == ["new"]
    box.close()
    again = Outbox(path)
    assert again.depth == 1 and again.lost == 0
    again.close()


def test_a_truncated_outbox_is_replaced_and_its_lost_messages_counted(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    fill(path)
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    box = Outbox(path)
    kept = box.depth
    assert 0 <= kept < N and box.lost > 0 and kept + box.lost >= N * 0.9
    assert box.stats()["lost"] == box.lost and "corrupt" in box.stats()["last_loss"]
    assert [a["id"] for a in outbox_alarms(snapshot(box))] == ["outbox_lost"]
    box.close()


def test_a_bad_header_is_replaced_and_its_messages_counted_as_lost(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    fill(path)
    with open(path, "r+b") as fh:
        fh.write(b"not an sqlite file")
    box = Outbox(path)
    assert box.depth == 0
    assert N * 0.9 <= box.lost <= N * 1.1  # estimated from the file's pages: SQLite cannot read it at all
    assert box.dropped == box.lost
    [alarm] = outbox_alarms(snapshot(box))
    assert alarm["id"] == "outbox_lost" and str(box.lost) in alarm["message"]
    box.put([Message("cam1", "t", b"{}", 1)])
    assert len(box.fetch(0, 10)) == 1
    box.close()


def test_edgelabel_outbox_lists_exports_and_requeues_the_dead_letters(tmp_path: Path) -> None:
    """The set-aside messages are reached with the product's own command, by file or through the config."""
    from edgelabel.edge.sinks.outbox import Message, Outbox
    from tests.helpers import run_edgelabel

    state = tmp_path / "state"
    state.mkdir()
    ob = Outbox(state / "outbox.sqlite")
    ob.put([Message("cam", "el/dev/cam/labels", b'{"id": "big"}', 1, msg_id="big"),
            Message("cam", "el/dev/cam/labels", b'{"id": "ok"}', 1, msg_id="ok")])
    head = ob.fetch(limit=1)[0]
    assert ob.dead_letter(head.seq, "packet too large for the broker (0x95)") is not None
    ob.close()
    config = tmp_path / "c.yaml"
    config.write_text(f"state_dir: {state}\nmodel: {{path: m.onnx}}\nsources: {{cam: {{uri: v4l2:///dev/video9}}}}\n")

    listed = run_edgelabel("outbox", "list", "-c", str(config), timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "el/dev/cam/labels" in listed.stdout and "0x95" in listed.stdout
    exported = run_edgelabel("outbox", "export", str(state / "outbox.sqlite"), timeout=60)
    assert exported.returncode == 0 and '"big"' in exported.stdout
    requeued = run_edgelabel("outbox", "requeue", "-c", str(config), timeout=60)
    assert requeued.returncode == 0 and "1 message(s) put back" in requeued.stdout, requeued.stdout + requeued.stderr
    missing = run_edgelabel("outbox", "list", timeout=60)
    assert missing.returncode == 2 and "-c CONFIG" in missing.stderr
