"""``verify`` records its progress: killed mid-run, ``--resume`` goes on from there.

The CLI runs as an operator runs it; a named fault point kills it (SIGTERM, the
default action: the process just ends) right after it recorded its fifth range. The
rerun with ``--resume`` must take the recorded ranges as they are, compare only the
rest over the same plan, still find the one damaged key, and leave the result —
reconciliation totals included — in the migration's state for ``cdcsync report``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from cdcsync.adapters.state_store import ensure_schema
from cdcsync.core import report_model

pytestmark = pytest.mark.stack

MIGRATION = "vresume"


def setup(source_dsn: str, target_dsn: str) -> None:
    for dsn in (source_dsn, target_dsn):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE orders (id int PRIMARY KEY, qty int NOT NULL, price numeric(10, 2), "
                "note text); INSERT INTO orders SELECT g, g % 50, g * 0.5, repeat('n', g % 40) "
                "FROM generate_series(1, 200000) g; "
                "CREATE TABLE tags (tag text, n int); INSERT INTO tags VALUES ('a', 1), ('b', 2)"
            )
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        ensure_schema(conn)
        conn.execute(
            "INSERT INTO cdcsync.migration (migration_id, phase, data) VALUES (%s, %s, %s)",
            (MIGRATION, "streaming", Jsonb({})),
        )
        conn.execute("UPDATE orders SET qty = qty + 1 WHERE id = 199999")


def cli(
    source_dsn: str, target_dsn: str, *args: str, fault: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDCSYNC_")}
    env.update(
        CDCSYNC_SOURCE_DSN=source_dsn,
        CDCSYNC_TARGET_DSN=target_dsn,
        CDCSYNC_WORKERS="1",
        CDCSYNC_MIGRATION_ID=MIGRATION,
    )
    if fault:
        env.update(CDCSYNC_FAULT_AT=fault, CDCSYNC_FAULT_SIGNAL="TERM")
    return subprocess.run(
        [sys.executable, "-m", "cdcsync", "verify", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def progress(target_dsn: str) -> list[tuple[str, int, int, bool]]:
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT r.run_id, count(*) FILTER (WHERE g.range_no >= 0), "
            "count(*) FILTER (WHERE g.range_no >= 0 AND g.detail IS NOT NULL), "
            "r.finished_at IS NOT NULL FROM cdcsync.verify_run r "
            "LEFT JOIN cdcsync.verify_range g USING (run_id) GROUP BY r.run_id, r.finished_at"
        ).fetchall()
    return [(str(a), int(b), int(c), bool(d)) for a, b, c, d in rows]


def test_killed_verify_resumes_from_recorded_ranges(source_dsn: str, target_dsn: str) -> None:
    setup(source_dsn, target_dsn)
    tables = "public.orders,public.tags"
    args = ("--level", "rows", "--tables", tables, "--range-bytes", "262144", "-o", "json")
    killed = cli(source_dsn, target_dsn, *args, fault="verify-range-recorded:5")
    assert killed.returncode == -15, killed.stdout + killed.stderr
    assert killed.stdout == ""  # no report: it died mid-run
    ((run_id, planned, done, finished),) = progress(target_dsn)
    assert planned > 20 and done == 5 and not finished

    again = cli(source_dsn, target_dsn, "--resume", *args[:2], "-o", "json")
    assert again.returncode == 3, again.stdout + again.stderr  # the damage is still there
    doc = json.loads(again.stdout)
    assert doc["run_id"] == run_id
    orders = next(t for t in doc["tables"] if t["table"] == "public.orders")
    assert orders["resumed_ranges"] == 5
    assert orders["ranges"] == planned
    assert orders["changed"] == [{"id": "199999"}]
    assert orders["source_rows"] == orders["target_rows"] == 200000
    ((_, _, done, finished),) = progress(target_dsn)
    assert done == planned and finished

    with psycopg.connect(target_dsn, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL("SELECT data->'verification' FROM cdcsync.migration WHERE migration_id = %s"),
            (MIGRATION,),
        ).fetchone()
    assert row is not None
    recorded = row[0]
    assert recorded["run_id"] == run_id and recorded["level"] == "rows"
    assert recorded["mismatches"] == {"public.orders": 1, "public.tags": 0}
    rec = recorded["reconciliation"]["public.orders"]
    assert rec["source_rows"] == rec["target_rows"] == 200000
    assert rec["source_sums"]["qty"] != rec["target_sums"]["qty"]
    assert int(rec["target_sums"]["qty"]) - int(rec["source_sums"]["qty"]) == 1
    assert rec["source_sums"]["price"] == f"{sum(range(1, 200001)) * 0.5:.2f}"
    # The report reads what verify recorded.
    phase = report_model._verification({"verification": recorded})
    assert phase.reason == "the last verification found differences"

    # Nothing left to resume; a fresh run after the fix is clean and recorded so.
    nothing = cli(source_dsn, target_dsn, "--resume", *args[:2])
    assert nothing.returncode == 3 and "already finished" in nothing.stderr
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        conn.execute("UPDATE orders SET qty = qty - 1 WHERE id = 199999")
    clean = cli(source_dsn, target_dsn, *args)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT data->'verification' FROM cdcsync.migration WHERE migration_id = %s",
            (MIGRATION,),
        ).fetchone()
    assert row is not None and row[0]["ok"] is True
    assert report_model._verification({"verification": row[0]}).reason.startswith("verified equal")


def test_resume_refuses_another_level(source_dsn: str, target_dsn: str) -> None:
    setup(source_dsn, target_dsn)
    args = ("--tables", "public.orders", "--range-bytes", "262144")
    killed = cli(
        source_dsn, target_dsn, "--level", "checksum", *args, fault="verify-range-recorded:2"
    )
    assert killed.returncode == -15
    other = cli(source_dsn, target_dsn, "--resume", "--level", "rows")
    assert other.returncode == 2, other.stderr
    assert "level checksum, not rows" in other.stderr
    assert "Traceback" not in other.stderr
