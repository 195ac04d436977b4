"""The Grafana dashboard's SQL (docs/grafana/edgelabel-fleet.json) runs against a real ingest database.

Records, reviews and status of two appliances are stored by the ingest writer itself; every panel's query is
executed with Grafana's macros filled in as Grafana would, and the three questions docs/fleet.md answers
(counts per class per hour per line, review backlog per appliance, appliances not seen in 5 minutes) are
checked against what was written.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.conftest import ROOT
from tests.test_ingest import label, pg_dsn, review  # noqa: F401 (pg_dsn is a fixture)

psycopg = pytest.importorskip("psycopg", reason="the ingest extra is not installed (pip install '.[ingest]')")

DASHBOARD = ROOT / "docs" / "grafana" / "edgelabel-fleet.json"


def grafana_sql(sql: str, min_score: str = "0.5") -> str:
    """Fill in what Grafana replaces before it sends a query: the time filter macro and the variable."""
    sql = re.sub(r"\$__timeFilter\(([^)]+)\)",
                 r"\1 BETWEEN now() - interval '24 hours' AND now() + interval '1 hour'", sql)
    sql = sql.replace("$min_score", min_score)
    assert "$" not in sql, f"a Grafana macro or variable the test does not know: {sql}"
    return sql


def panels() -> dict[str, str]:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["__inputs"][0]["pluginId"] == "grafana-postgresql-datasource"
    return {p["title"]: p["targets"][0]["rawSql"] for p in dash["panels"]}


def test_every_dashboard_query_runs_and_answers_the_three_questions(pg_dsn):  # noqa: F811
    from edgelabel.ingest.db import Message, Writer, migrate

    t0 = time.time() - 4 * 3600
    recs = {d: [label(d, "cam1", i, t0=t0 + i * 300) for i in range(n)] for d, n in (("line1-cam", 40), ("line2-cam", 25))}
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        migrate(conn)
        writer = Writer(conn, "edgelabel")
        msgs = [Message(f"edgelabel/{d}/cam1/labels", json.dumps(r).encode(), 1, 1) for d, rs in recs.items() for r in rs]
        a = recs["line1-cam"]
        msgs += [Message("edgelabel/line1-cam/review", json.dumps(review(a[3], 1, "needs_review", [])).encode(), 1, 1),
                 Message("edgelabel/line1-cam/review",
                         json.dumps(review(a[4], 1, "corrected", [[1.0, 2.0, 3.0, 4.0]])).encode(), 1, 1),
                 Message("edgelabel/line2-cam/status", b"online", 1, 1)]
        writer.write(msgs)
        conn.execute("UPDATE devices SET last_seen = now() - interval '10 minutes' WHERE device = 'line2-cam'")

        results = {}
        for title, sql in panels().items():
            results[title] = conn.execute(grafana_sql(sql)).fetchall()  # every panel's query runs

        expected: dict[tuple[str, str], int] = {}
        for d, rs in recs.items():
            for r in rs:
                for det in r["detections"]:
                    if det["score"] >= 0.5:
                        expected[(d, det["label"])] = expected.get((d, det["label"]), 0) + 1
        got: dict[tuple[str, str], int] = {}
        for _, metric, n in results["Detections per class per hour per line"]:
            device, _, cls = metric.partition(" / ")
            got[(device, cls)] = got.get((device, cls), 0) + n
        assert got == expected
        hours = {row[0] for row in results["Detections per class per hour per line"]}
        assert len(hours) >= 3, "the counts are split by hour"

        backlog = {row[0]: row[1:3] for row in results["Review backlog per appliance"]}
        # every test record has a car at 0.31: undecided and uncertain unless a decision arrived
        assert backlog == {"line1-cam": (1, 38), "line2-cam": (0, 25)}

        silent = [row[0] for row in results["Appliances not seen in 5 minutes"]]
        assert silent == ["line2-cam"]
        assert {row[0] for row in results["Appliances"]} == {"line1-cam", "line2-cam"}
        assert sum(row[2] for row in results["Label records per minute"]) == 65
