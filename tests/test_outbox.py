"""The durable outbox on its own: order, batching, bounds, expiry, crash safety."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgelabel.edge.sinks.outbox import Message, Outbox


def msg(source: str, i: int, qos: int = 1) -> Message:
    return Message(source, f"el/dev/{source}/labels", f'{{"i":{i}}}'.encode(), qos, False, f"{source}-{i}")


def ids(rows) -> list[str]:
    return [r.msg_id for r in rows]


def test_rows_come_back_in_write_order_per_source_and_window_by_seq(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    written = [msg(src, i) for i in range(20) for src in ("cam1", "cam2", "yard")]
    for m in written:
        box.put([m])
    rows = box.fetch(0, 1000)
    assert ids(rows) == [m.msg_id for m in written]
    assert [r.seq for r in rows] == sorted(r.seq for r in rows)
    for src in ("cam1", "cam2", "yard"):  # the order inside each source is the write order
        assert [r.msg_id for r in rows if r.source == src] == [f"{src}-{i}" for i in range(20)]
    first, second = box.fetch(0, 25), box.fetch(rows[24].seq, 25)  # the publisher's sliding window
    assert ids(first + second) == ids(rows[:50])
    assert rows[0].topic == "el/dev/cam1/labels" and rows[0].payload == b'{"i":0}' and rows[0].qos == 1
    # acknowledged rows go, in any order; the rest stays in order
    assert box.ack([rows[3].seq, rows[0].seq, rows[1].seq, 10**9]) == 3
    assert box.depth == 57
    assert ids(box.fetch(0, 3)) == ids([rows[2], rows[4], rows[5]])
    box.close()
    # a new process replays the same rows in the same order, new rows after them
    again = Outbox(tmp_path / "o.sqlite")
    assert ids(again.fetch(0, 1000)) == ids([rows[2]] + rows[4:])
    again.ack(r.seq for r in again.fetch(0, 1000))
    again.put([msg("cam1", 99)])
    assert again.fetch(0, 10)[0].seq > rows[-1].seq  # AUTOINCREMENT: seq never goes back, even when emptied
    again.close()


def test_unsynced_puts_are_batched_and_invisible_until_committed(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", commit_interval=60.0, batch_size=50)
    assert box.put([msg("cam1", -1)], sync=False).committed  # the first after a quiet spell: no waiting
    for i in range(49):
        res = box.put([msg("cam1", i)], sync=False)
        assert res.stored == 1 and not res.committed
    assert box.depth == 50 and len(box.fetch(0, 100)) == 1  # committed before published: the batch is invisible
    assert box.stats()["uncommitted"] == 49
    assert box.put([msg("cam1", 49)], sync=False).committed  # the 50th fills the batch: one transaction for all
    assert len(box.fetch(0, 100)) == 51 and box.stats()["uncommitted"] == 0
    box.put([msg("cam1", 50)], sync=False)
    assert box.commit() == 1 and len(box.fetch(0, 100)) == 52
    # a sync put commits what was batched before it too, in order
    box.put([msg("cam1", 51)], sync=False)
    box.put([msg("cam2", 0)], sync=True)
    assert ids(box.fetch(0, 100))[-2:] == ["cam1-51", "cam2-0"]
    box.close()

    timed = Outbox(None, commit_interval=0.05)
    timed.put([msg("cam1", 0)], sync=False)
    timed.put([msg("cam1", 1)], sync=False)
    assert timed.commit_due() == 0  # not old enough yet
    time.sleep(0.06)
    assert timed.commit_due() == 1 and len(timed.fetch()) == 2
    time.sleep(0.06)  # a quiet spell: the next put commits at once (a camera's pace pays no batching delay)
    assert timed.put([msg("cam1", 2)], sync=False).committed and len(timed.fetch()) == 3
    timed.close()


def test_batched_commits_are_much_faster_than_one_per_message(tmp_path: Path) -> None:
    n = 3000
    sync_box = Outbox(tmp_path / "sync.sqlite")
    t0 = time.perf_counter()
    for i in range(n):
        sync_box.put([msg("cam1", i)], sync=True)
    t_sync = time.perf_counter() - t0
    batch_box = Outbox(tmp_path / "batch.sqlite", commit_interval=1.0, batch_size=500)
    t0 = time.perf_counter()
    for i in range(n):
        batch_box.put([msg("cam1", i)], sync=False)
    batch_box.commit()
    t_batch = time.perf_counter() - t0
    assert batch_box.depth == sync_box.depth == n
    assert t_batch < t_sync, (t_batch, t_sync)
    assert n / t_batch > 5000, f"batched puts only {n / t_batch:.0f}/s"
    sync_box.close()
    batch_box.close()


def test_drop_oldest_evicts_counts_and_logs(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="edgelabel.edge.sinks.outbox")
    box = Outbox(tmp_path / "o.sqlite", max_messages=5, policy="drop_oldest")
    for i in range(8):
        box.put([msg("cam1", i)])
    assert box.depth == 5 and box.evicted == 3 and box.dropped == 3
    assert ids(box.fetch(0, 10)) == [f"cam1-{i}" for i in range(3, 8)]
    logged = [r.getMessage() for r in caplog.records]
    assert logged and "max_messages=5" in logged[0] and "oldest" in logged[0]
    # a batch larger than the whole outbox keeps its newest rows
    box.put([msg("cam2", i) for i in range(7)])
    assert ids(box.fetch(0, 10)) == [f"cam2-{i}" for i in range(2, 7)]
    assert box.evicted == 3 + 5 + 2 and box.stats()["evicted"] == 10
    box.close()


def test_stop_capture_blocks_until_acked_and_resumes(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_messages=3, policy="stop_capture")
    for i in range(3):
        box.put([msg("cam1", i)])
    done = threading.Event()
    result = {}

    def writer() -> None:
        result["r"] = box.put([msg("cam1", 3)], sync=True, interrupted=lambda: False, poll=0.02)
        done.set()

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    assert not done.wait(0.4), "put must wait while the outbox is full"
    assert box.stats()["blocked"] is True and box.depth == 3
    first = box.fetch(0, 1)[0]
    box.ack([first.seq])  # the broker took one: the writer goes on
    assert done.wait(2.0)
    assert result["r"].stored == 1 and result["r"].refused == 0
    assert ids(box.fetch(0, 10)) == ["cam1-1", "cam1-2", "cam1-3"] and box.dropped == 0
    assert box.stats()["blocked"] is False
    box.close()


def test_stop_capture_wait_is_interruptible_and_the_refusal_counted(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="edgelabel.edge.sinks.outbox")
    box = Outbox(tmp_path / "o.sqlite", max_messages=2, policy="stop_capture")
    box.put([msg("cam1", 0), msg("cam1", 1)])
    closing = threading.Event()
    threading.Timer(0.2, closing.set).start()
    t0 = time.monotonic()
    r = box.put([msg("cam1", 2)], interrupted=closing.is_set, poll=0.02)
    assert 0.15 < time.monotonic() - t0 < 2.0
    assert (r.stored, r.refused) == (0, 1) and box.refused == 1 and box.dropped == 1 and box.depth == 2
    assert any("stop_capture" in rec.getMessage() and "not stored" in rec.getMessage() for rec in caplog.records)
    # close() releases a blocked writer too
    released = threading.Event()
    threading.Thread(target=lambda: (box.put([msg("cam1", 3)], poll=0.02), released.set()), daemon=True).start()
    time.sleep(0.1)
    box.close()
    assert released.wait(2.0)


def test_max_age_expires_old_rows_and_counts_them(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="edgelabel.edge.sinks.outbox")
    now = [1000.0]
    box = Outbox(tmp_path / "o.sqlite", max_age=60.0, clock=lambda: now[0])
    box.put([msg("cam1", i) for i in range(4)])
    now[0] += 30
    box.put([msg("cam1", i) for i in range(4, 6)])
    assert box.expire() == 0
    assert box.oldest_age() == pytest.approx(30.0)
    now[0] += 31  # the first four are 61 s old now, the last two 31 s
    assert box.expire() == 4
    assert ids(box.fetch(0, 10)) == ["cam1-4", "cam1-5"] and box.expired == 4 and box.dropped == 4
    assert any("max_age=60" in r.getMessage() for r in caplog.records)
    box.close()
    never = Outbox(None, max_age=0.0, clock=lambda: now[0])
    never.put([msg("cam1", 0)])
    now[0] += 10**9
    assert never.expire() == 0 and never.depth == 1
    never.close()


CRASH_CHILD = """
import os, signal, sys
from edgelabel.edge.sinks.outbox import Message, Outbox
box = Outbox(sys.argv[1], commit_interval=3600)
for i in range(100):
    box.put([Message("cam1" if i % 2 else "cam2", "t", str(i).encode(), 1, False, str(i))], sync=True)
rows = box.fetch(0, 40)
box.ack(r.seq for r in rows)                                               # acknowledged: gone
box.put([Message("cam1", "t", b"x", 1, False, "uncommitted")], sync=False)  # never committed
os.kill(os.getpid(), signal.SIGKILL)                                        # no close, no checkpoint
"""


def test_reopen_after_a_crash_keeps_every_committed_unacked_row(tmp_path: Path) -> None:
    path = tmp_path / "state" / "outbox.sqlite"
    proc = subprocess.run([sys.executable, "-c", CRASH_CHILD, str(path)], cwd=Path(__file__).parent.parent, timeout=60)
    assert proc.returncode == -9
    assert Path(str(path) + "-wal").exists()  # the rows live in the WAL: no checkpoint happened
    box = Outbox(path)
    rows = box.fetch(0, 1000)
    assert ids(rows) == [str(i) for i in range(40, 100)]  # exactly the committed, unacknowledged rows, in order
    assert box.depth == 60
    with box._cond:  # the file is sound, not just readable
        assert box._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    box.close()


def test_an_unreadable_file_is_moved_aside_and_a_new_outbox_started(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="edgelabel.edge.sinks.outbox")
    path = tmp_path / "outbox.sqlite"
    path.write_bytes(b"this is not an SQLite database" * 100)
    box = Outbox(path)
    assert box.depth == 0
    box.put([msg("cam1", 0)])
    assert ids(box.fetch()) == ["cam1-0"]
    aside = list(tmp_path.glob("outbox.sqlite.corrupt-*"))
    assert len(aside) == 1 and any("moved it to" in r.getMessage() for r in caplog.records)
    box.close()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="policy"):
        Outbox(None, policy="drop_newest")
    with pytest.raises(ValueError, match="max_messages"):
        Outbox(None, max_messages=0)
    box = Outbox(None)
    box.close()
    with pytest.raises(RuntimeError):
        box.put([msg("cam1", 0)])
    assert box.fetch() == [] and box.ack([1]) == 0


def test_checkpoints_run_off_the_write_path_and_keep_the_wal_small(tmp_path: Path) -> None:
    """Automatic checkpoints are off (no fsync inside a label's commit); checkpoint() keeps the WAL bounded."""
    box = Outbox(tmp_path / "o.sqlite")
    wal = tmp_path / "o.sqlite-wal"
    assert box.checkpoint() is False  # nothing committed yet
    for i in range(3000):
        box.put([msg("cam1", i)], sync=True)
    grown = wal.stat().st_size
    assert grown > 1000 * 4096  # past SQLite's automatic checkpoint point: it did not run
    assert box.checkpoint() is True and box.checkpoint() is False  # nothing new since
    for i in range(3000, 6000):
        box.put([msg("cam1", i)], sync=True)
        if i % 100 == 0:
            box.checkpoint(min_commits=64)
    assert wal.stat().st_size <= grown  # the checkpointed WAL is reused from its start, not appended to
    assert len(box.fetch(0, 10000)) == 6000
    box.close()
