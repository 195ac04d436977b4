"""The ingest writer alone, in this process: batches of label records into PostgreSQL, no MQTT.

Usage::

    python bench/ingest_writer.py                          # this tree's writer
    python bench/ingest_writer.py --compare OTHER/ingest/db.py   # and another version's, alternated

It separates the database side of ingest from the broker and the publisher (``bench/ingest.py`` measures
them together): each run makes a database of its own, migrates it with that writer's own migrations and
writes N records (the same ones as ``bench/ingest.py``) in batches of 500, then reports records/s.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from ingest import records  # noqa: E402  (bench/ingest.py)


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"writer_{uuid.uuid4().hex[:6]}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run(db, admin_dsn: str, msgs: list, batch: int) -> float:
    admin = psycopg.connect(admin_dsn, autocommit=True)
    name = f"ingest_writer_{uuid.uuid4().hex[:8]}"
    admin.execute(f"CREATE DATABASE {name}")
    try:
        with psycopg.connect(admin_dsn.rsplit("/", 1)[0] + "/" + name, autocommit=True) as conn:
            db.migrate(conn)
            writer = db.Writer(conn, "edgelabel")
            batches = [[db.Message(t, p.encode(), i, 1) for i, (t, _, p) in enumerate(msgs[k:k + batch])]
                       for k in range(0, len(msgs), batch)]
            t0 = time.perf_counter()
            for b in batches:
                writer.write(b)
            return len(msgs) / (time.perf_counter() - t0)
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compare", type=Path, help="another version's ingest/db.py")
    ap.add_argument("--pg", default=os.environ.get("EDGELABEL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"))
    args = ap.parse_args()
    msgs = records(args.n)
    versions = [("this tree", load(ROOT / "ingest" / "db.py"))]
    if args.compare:
        versions.append((str(args.compare), load(args.compare)))
    for r in range(args.rounds):
        for label, db in versions:
            print(f"round {r + 1}, {label}: {run(db, args.pg, msgs, args.batch):,.0f} records/s "
                  f"({args.n} records, batches of {args.batch})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
