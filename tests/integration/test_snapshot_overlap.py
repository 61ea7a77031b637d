"""Indexes built while the copy goes on: each table's once its own rows are all in.

A table's indexes and keys are built as soon as its last chunk commits, overlapping the
copy of the other tables; a foreign key between plain tables once both are copied and
keyed. Watched from outside through the target's catalog and the recorded chunks, then
checked at the end: the target's indexes and constraints are the source's, all valid.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import psycopg
import pytest

from cdcsync.config import load_settings
from cdcsync.snapshot.copy import RateLimiter
from cdcsync.snapshot.progress import Progress
from cdcsync.snapshot.runner import run_snapshot
from tests.integration import workload
from tests.integration.test_snapshot import (
    boundary_digests,
    env_for,
    finish,
    snapshot_cli,
    state_row,
    wait_for,
)

pytestmark = pytest.mark.stack

EXTRA_DDL = """
CREATE INDEX accounts_abalance ON public.pgbench_accounts (abalance);
ALTER TABLE public.pgbench_tellers ADD CONSTRAINT tellers_bid_tid UNIQUE (bid, tid);
CREATE INDEX measures_v ON public.measures (v);
CREATE UNIQUE INDEX "Odd idx" ON "Odd Schema Table" ("Mixed Case");
ALTER TABLE public.scratch ADD CONSTRAINT scratch_v_check CHECK (v <> '') NOT VALID;
CREATE TABLE public.big_tail (
    id bigint PRIMARY KEY, ref int NOT NULL REFERENCES public.scratch (id), pad text
);
CREATE INDEX big_tail_ref ON public.big_tail (ref);
INSERT INTO public.big_tail SELECT g, g % 50 + 1, repeat(md5(g::text), 5)
    FROM generate_series(1, 120000) g;
ANALYZE;
"""

# What the schema consists of, as each side's catalog says (the state schema aside).
INDEXES = """
SELECT n.nspname, t.relname, i.relname, pg_get_indexdef(x.indexrelid), x.indisvalid
FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast', 'cdcsync')
ORDER BY 1, 2, 3
"""
CONSTRAINTS = """
SELECT n.nspname, t.relname, c.conname, c.contype, pg_get_constraintdef(c.oid), c.convalidated
FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'cdcsync')
ORDER BY 1, 2, 3
"""

# One consistent look: what exists, the step, and chunks (done, planned) by table.
WATCH = """
SELECT to_regclass('public.pgbench_accounts_pkey') IS NOT NULL,
       to_regclass('public.accounts_abalance') IS NOT NULL,
       m.data->>'step',
       (SELECT count(*) FROM cdcsync.snapshot_chunk c WHERE c.migration_id = m.migration_id),
       (SELECT count(*) FROM cdcsync.snapshot_plan p WHERE p.migration_id = m.migration_id),
       (SELECT count(*) FROM cdcsync.snapshot_chunk c WHERE c.migration_id = m.migration_id
          AND c.table_name = 'pgbench_accounts'),
       (SELECT count(*) FROM cdcsync.snapshot_plan p WHERE p.migration_id = m.migration_id
          AND p.table_name = 'pgbench_accounts'),
       EXISTS (SELECT FROM pg_constraint WHERE conname = 'pgbench_accounts_bid_fkey'),
       EXISTS (SELECT FROM pg_constraint WHERE conname = 'big_tail_ref_fkey'),
       (SELECT count(*) FROM cdcsync.snapshot_chunk c WHERE c.migration_id = m.migration_id
          AND c.table_name = 'big_tail'),
       (SELECT count(*) FROM cdcsync.snapshot_plan p WHERE p.migration_id = m.migration_id
          AND p.table_name = 'big_tail')
FROM cdcsync.migration m WHERE m.migration_id = %s
"""


def schema_of(dsn: str) -> tuple[list[Any], list[Any]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(INDEXES).fetchall(), conn.execute(CONSTRAINTS).fetchall()


def prepare(source_dsn: str) -> None:
    workload.create_source(source_dsn, scale=2)
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(EXTRA_DDL)


class Watcher(threading.Thread):
    """Reads the target's catalog and chunk records every few milliseconds."""

    def __init__(self, target_dsn: str, migration: str) -> None:
        super().__init__(daemon=True)
        self.target_dsn = target_dsn
        self.migration = migration
        self.seen: list[tuple[Any, ...]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.target_dsn, autocommit=True) as conn:
            while not self.stop.wait(0.02):
                try:
                    row = conn.execute(WATCH, (self.migration,)).fetchone()
                except psycopg.Error:
                    continue  # no state schema yet
                if row is not None:
                    self.seen.append(tuple(row))


def test_indexes_are_built_during_the_copy_and_the_schema_ends_equal(
    source_dsn: str, target_dsn: str, topic_prefix: str
) -> None:
    prepare(source_dsn)
    settings = load_settings(
        source_dsn=source_dsn,
        target_dsn=target_dsn,
        migration_id=topic_prefix,
        snapshot_chunk_blocks=64,
        workers=2,
    )
    watcher = Watcher(target_dsn, topic_prefix)
    watcher.start()
    # Paced so the copy lasts seconds: pgbench_accounts (the largest table, copied
    # first) is done well before big_tail is.
    result = run_snapshot(
        settings, progress=Progress("quiet"), limiter=RateLimiter(bytes_per_second=8e6)
    )
    watcher.stop.set()
    watcher.join(timeout=10)

    with_pkey = [row for row in watcher.seen if row[0]]
    assert with_pkey, "pgbench_accounts_pkey never seen"
    step, done, planned = with_pkey[0][2:5]
    # Seen while other tables were still being copied ...
    assert step == "copy" and done < planned, with_pkey[0]
    # ... and never before every chunk of its own table was in.
    assert all(row[5] == row[6] for row in watcher.seen if row[0] or row[1] or row[7])
    assert all(row[9] == row[10] for row in watcher.seen if row[8])
    during = [row for row in watcher.seen if row[2] == "copy"]
    assert any(row[1] for row in during)  # a secondary index too
    # pgbench_branches (tiny: copied first) and pgbench_accounts were both in before
    # big_tail: the foreign key between them was validated during the copy.
    assert any(row[7] for row in during)

    assert result.how == "fresh"
    assert result.timings["post_data_overlapped"] > 0
    assert result.kept_objects == []
    # The overlapped work is inside the copy's wall time, not added on top of it.
    steps = ("pre_data", "boundary", "copy", "sequences", "post_data", "plan", "fence")
    assert sum(result.timings[k] for k in steps) <= result.timings["total"] + 0.05

    src_indexes, src_constraints = schema_of(source_dsn)
    tgt_indexes, tgt_constraints = schema_of(target_dsn)
    assert tgt_indexes == src_indexes
    assert all(valid for *_, valid in tgt_indexes)  # partition indexes attached
    assert tgt_constraints == src_constraints
    assert {r[2] for r in tgt_constraints if r[3] == "f"} >= {
        "big_tail_ref_fkey",
        "pgbench_accounts_bid_fkey",
    }
    assert workload.table_digests(target_dsn) == workload.table_digests(source_dsn)


def test_killed_after_some_indexes_were_built_the_rerun_keeps_them(
    source_dsn: str, target_dsn: str, topic_prefix: str
) -> None:
    prepare(source_dsn)
    env = env_for(
        source_dsn,
        target_dsn,
        topic_prefix,
        CDCSYNC_SNAPSHOT_CHUNK_BLOCKS="64",
        CDCSYNC_WORKERS="2",
    )
    proc = snapshot_cli(env, "--max-rate", "6")

    def accounts_indexed_mid_copy() -> bool:
        row = state_row(target_dsn, topic_prefix)
        if not row or row["data"].get("step") != "copy":
            return False
        with psycopg.connect(target_dsn, autocommit=True) as conn:
            found = conn.execute(
                "SELECT to_regclass('public.pgbench_accounts_pkey') IS NOT NULL"
            ).fetchone()
        return bool(found and found[0])

    wait_for(accounts_indexed_mid_copy, "pgbench_accounts_pkey during the copy")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = state_row(target_dsn, topic_prefix)
    assert before is not None and before["chunks_done"] < before["chunks_planned"]
    at_boundary = boundary_digests(source_dsn, before["snapshot_name"])
    started = time.monotonic()
    out = finish(snapshot_cli(env))
    assert "snapshot (resumed)" in out, out
    assert "kept existing constraint public.pgbench_accounts pgbench_accounts_pkey" in out
    assert time.monotonic() - started < 120
    after = state_row(target_dsn, topic_prefix)
    assert after is not None and after["phase"] == "snapshotted"
    assert after["consistent_point"] == before["consistent_point"]
    assert workload.table_digests(target_dsn) == at_boundary
    assert schema_of(target_dsn) == schema_of(source_dsn)
