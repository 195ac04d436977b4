"""Ingest against odd but possible input: spellings of ids, strings COPY must escape, hostile names.

Each test here stores through the real writer into a real PostgreSQL database of its own (``pg_dsn``).
"""

from __future__ import annotations

import json

import psycopg

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
