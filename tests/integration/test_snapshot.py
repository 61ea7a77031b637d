"""The snapshot against real PostgreSQL: the boundary under load, and resume after kill -9.

The copy is compared with a second source transaction that imported the same exported
snapshot: that is the definition of "the source at the consistent point".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from cdcsync.config import load_settings
from cdcsync.snapshot.boundary import import_snapshot
from cdcsync.snapshot.progress import Progress
from cdcsync.snapshot.runner import handover, run_snapshot
from tests.integration import workload

pytestmark = pytest.mark.stack


def env_for(source_dsn: str, target_dsn: str, migration: str, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CDCSYNC_")}
    return {
        **base,
        "CDCSYNC_SOURCE_DSN": source_dsn,
        "CDCSYNC_TARGET_DSN": target_dsn,
        "CDCSYNC_MIGRATION_ID": migration,
        "CDCSYNC_LOG_FORMAT": "json",
        **extra,
    }


def snapshot_cli(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cdcsync", "snapshot", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def wait_for(check: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def state_row(target_dsn: str, migration: str) -> dict[str, Any] | None:
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('cdcsync.migration') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return None
        row = conn.execute(
            "SELECT phase, consistent_point::text, snapshot_name, data, "
            "(SELECT count(*) FROM cdcsync.snapshot_chunk c WHERE c.migration_id = m.migration_id),"
            "(SELECT count(*) FROM cdcsync.snapshot_plan p WHERE p.migration_id = m.migration_id) "
            "FROM cdcsync.migration m WHERE migration_id = %s",
            (migration,),
        ).fetchone()
    if row is None:
        return None
    return {
        "phase": row[0],
        "consistent_point": row[1],
        "snapshot_name": row[2],
        "data": row[3],
        "chunks_done": int(row[4]),
        "chunks_planned": int(row[5]),
    }


def chunk_times(target_dsn: str, migration: str) -> dict[tuple[str, str, int], Any]:
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT table_schema, table_name, chunk_no, done_at FROM cdcsync.snapshot_chunk "
            "WHERE migration_id = %s",
            (migration,),
        ).fetchall()
    return {(str(s), str(t), int(n)): at for s, t, n, at in rows}


def slot_of(source_dsn: str, slot: str) -> tuple[str, int | None] | None:
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text, active_pid FROM pg_replication_slots "
            "WHERE slot_name = %s",
            (slot,),
        ).fetchone()
    return None if row is None else (str(row[0]), row[1])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


def boundary_digests(source_dsn: str, snapshot_name: str) -> dict[str, tuple[int, str]]:
    with psycopg.connect(source_dsn) as observer:
        import_snapshot(observer, snapshot_name)
        digests = workload.digests_in(observer)
        observer.rollback()
    return digests


def test_copy_equals_the_source_at_the_consistent_point_under_load(
    source_dsn: str, target_dsn: str, topic_prefix: str
) -> None:
    workload.create_source(source_dsn, scale=2)
    # pgbench_history (no key) must span several chunks whatever pace the load reaches,
    # so the copy by block ranges is exercised on every run.
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
            "SELECT 1, 1, g, g, now() FROM generate_series(1, 20000) g"
        )
    # TRUNCATE is not MVCC-safe: a copy racing one may see the table already emptied, and
    # only the stream's truncate event makes it right (the end-to-end test covers that).
    # Comparing the copy with the boundary itself therefore runs without truncates.
    load = workload.Load(source_dsn, seconds=10, seed=3, exclude=("truncate",))
    load.start()
    time.sleep(1.0)
    seen: dict[str, Any] = {}

    def on_boundary(snapshot_name: str) -> None:
        seen["at_boundary"] = boundary_digests(source_dsn, snapshot_name)

    settings = load_settings(
        source_dsn=source_dsn,
        target_dsn=target_dsn,
        migration_id=topic_prefix,
        snapshot_chunk_blocks=16,
        workers=3,
    )
    progress = Progress("quiet")
    result = run_snapshot(settings, on_boundary=on_boundary, progress=progress)
    load.wait()
    assert not load.errors, load.errors
    copied = workload.table_digests(target_dsn)
    assert copied == seen["at_boundary"]
    # The source kept changing during the copy: the copy is the boundary, not the end.
    assert workload.table_digests(source_dsn) != copied
    assert result.how == "fresh"
    assert result.rows == sum(n for n, _ in copied.values())
    totals = progress.totals()
    assert totals.rows_done == result.rows and totals.chunks_done == totals.chunks_total

    # The slot sits at the recorded consistent point, and hands over to streaming.
    slot = slot_of(source_dsn, settings.slot_name)
    assert slot is not None and slot[0] == result.consistent_point and slot[1] is None
    with psycopg.connect(target_dsn) as conn:
        hand = handover(conn, settings)
        assert hand.slot_name == settings.slot_name
        assert hand.consistent_point == result.consistent_point
        assert {str(t) for t in hand.tables} == set(copied)
        chunks = conn.execute(
            "SELECT count(*), count(DISTINCT (table_schema, table_name)) "
            "FROM cdcsync.snapshot_chunk WHERE migration_id = %s",
            (topic_prefix,),
        ).fetchone()
        assert chunks is not None and chunks[0] > chunks[1]  # big tables were split
        kinds = {
            str(r[0])
            for r in conn.execute(
                "SELECT DISTINCT kind FROM cdcsync.snapshot_plan WHERE migration_id = %s",
                (topic_prefix,),
            )
        }
        assert {"key", "ctid", "whole"} <= kinds  # pgbench_history has no key
        # Indexes and constraints came after the data; foreign keys too.
        assert conn.execute(
            "SELECT count(*) FROM pg_constraint WHERE conname IN "
            "('pgbench_accounts_pkey', 'pgbench_accounts_bid_fkey')"
        ).fetchone() == (2,)
        # The fence rejects everyone but cdcsync's replica-role sessions.
        for statement in (
            "INSERT INTO public.empty_one VALUES (1, 'x')",
            "UPDATE public.measures_2024 SET v = 0",  # a partition named directly
            "TRUNCATE public.scratch",
        ):
            with pytest.raises(psycopg.Error) as err:
                conn.execute(statement)
            assert err.value.sqlstate == "CDC01"
            assert topic_prefix in str(err.value)
            conn.rollback()
        conn.execute("SET session_replication_role = replica")
        conn.execute("INSERT INTO public.empty_one VALUES (1, 'x')")
        conn.rollback()
    with psycopg.connect(source_dsn) as conn:
        pub = conn.execute(
            "SELECT pubviaroot, pubinsert AND pubupdate AND pubdelete AND pubtruncate "
            "FROM pg_publication WHERE pubname = %s",
            (settings.publication_name,),
        ).fetchone()
        assert pub == (True, True)
        published = {
            f"{s}.{t}"
            for s, t in conn.execute(
                "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
                (settings.publication_name,),
            )
        }
        assert published == set(copied)  # partitions stream as their root


def test_resume_after_kill_nine_at_several_points(
    source_dsn: str, target_dsn: str, topic_prefix: str
) -> None:
    workload.create_source(source_dsn, scale=3)
    env = env_for(
        source_dsn,
        target_dsn,
        topic_prefix,
        CDCSYNC_SNAPSHOT_CHUNK_BLOCKS="64",
        CDCSYNC_WORKERS="2",
    )
    slow = ("--max-rate", "8")  # MB/s: a copy of a few seconds, long enough to kill mid-way

    # 1. Killed almost at once: before, during or just after the boundary.
    proc = snapshot_cli(env, *slow)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    # 2. Killed mid-copy under load; the holder keeps the exported snapshot alive, so
    #    the next run finishes under the very same snapshot and boundary.
    load = workload.Load(source_dsn, seconds=12, seed=5, exclude=("truncate",))
    load.start()
    proc = snapshot_cli(env, *slow)

    def some_chunks_done() -> bool:
        row = state_row(target_dsn, topic_prefix)
        return bool(row and row["phase"] == "snapshot" and row["chunks_done"] >= 3)

    wait_for(some_chunks_done, "three copied chunks")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = state_row(target_dsn, topic_prefix)
    assert before is not None and before["chunks_done"] < before["chunks_planned"]
    holder = int(before["data"]["holder_pid"])
    assert alive(holder)
    at_boundary = boundary_digests(source_dsn, before["snapshot_name"])
    done_before = chunk_times(target_dsn, topic_prefix)
    out = finish(snapshot_cli(env))
    assert "snapshot (resumed)" in out
    load.wait()
    assert not load.errors, load.errors
    after = state_row(target_dsn, topic_prefix)
    assert after is not None and after["phase"] == "snapshotted"
    assert after["consistent_point"] == before["consistent_point"]
    assert after["chunks_done"] == after["chunks_planned"]
    # Chunks copied before the kill were kept, not copied again.
    assert {k: v for k, v in chunk_times(target_dsn, topic_prefix).items() if k in done_before} == (
        done_before
    )
    assert workload.table_digests(target_dsn) == at_boundary
    wait_for(lambda: not alive(holder), "the old holder to exit", timeout=30)
    slot = slot_of(source_dsn, f"{topic_prefix}_slot")
    assert slot is not None and slot[0] == before["consistent_point"] and slot[1] is None


def test_killed_with_its_snapshot_holder_the_copy_starts_over(
    source_dsn: str, target_dsn: str, topic_prefix: str
) -> None:
    workload.create_source(source_dsn, scale=3)
    env = env_for(
        source_dsn,
        target_dsn,
        topic_prefix,
        CDCSYNC_SNAPSHOT_CHUNK_BLOCKS="64",
        CDCSYNC_WORKERS="2",
    )
    # The holder keeps the snapshot 3 s after its parent's death, then lets it go.
    proc = snapshot_cli(env, "--max-rate", "8", "--keep-snapshot-seconds", "3")

    def copying() -> bool:
        row = state_row(target_dsn, topic_prefix)
        return bool(row and row["chunks_done"] >= 2)

    wait_for(copying, "two copied chunks")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = state_row(target_dsn, topic_prefix)
    assert before is not None
    holder = int(before["data"]["holder_pid"])
    assert alive(holder)
    wait_for(lambda: not alive(holder), "the orphaned holder to give up", timeout=30)
    # Writes after the first boundary must be in the new copy.
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO public.scratch VALUES (100000, 'after the first boundary')")
        conn.execute("DELETE FROM public.events_nokey WHERE kind = 'a'")
    out = finish(snapshot_cli(env))
    assert "snapshot (restarted)" in out
    after = state_row(target_dsn, topic_prefix)
    assert after is not None and after["phase"] == "snapshotted"
    assert after["consistent_point"] != before["consistent_point"]
    assert workload.table_digests(target_dsn) == workload.table_digests(source_dsn)
    with psycopg.connect(source_dsn) as conn:
        slots = conn.execute(
            "SELECT slot_name, confirmed_flush_lsn::text FROM pg_replication_slots "
            "WHERE database = current_database()"
        ).fetchall()
        assert slots == [(f"{topic_prefix}_slot", after["consistent_point"])]


def test_a_crash_during_post_data_finishes_without_copying_again(
    source_dsn: str, target_dsn: str, topic_prefix: str
) -> None:
    workload.create_source(source_dsn, scale=1)
    env = env_for(source_dsn, target_dsn, topic_prefix)
    finish(snapshot_cli(env))
    before = chunk_times(target_dsn, topic_prefix)
    # The state a crash between the copy and the fence leaves: copy recorded, some
    # indexes built, no fence yet.
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE cdcsync.migration SET phase = 'snapshot', "
            'data = data || \'{"step": "post_data"}\' WHERE migration_id = %s',
            (topic_prefix,),
        )
        conn.execute("DROP TRIGGER cdcsync_fence ON public.scratch")
        conn.execute(
            "ALTER TABLE public.pgbench_accounts DROP CONSTRAINT pgbench_accounts_pkey CASCADE"
        )
    out = finish(snapshot_cli(env))
    assert "snapshot (resumed)" in out
    assert "kept existing constraint public.pgbench_branches pgbench_branches_pkey" in out
    assert chunk_times(target_dsn, topic_prefix) == before
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_constraint WHERE conname IN "
            "('pgbench_accounts_pkey', 'pgbench_history_aid_fkey')"
        ).fetchone() == (2,)
        with pytest.raises(psycopg.Error) as err:
            conn.execute("DELETE FROM public.scratch")
        assert err.value.sqlstate == "CDC01"
    assert workload.table_digests(target_dsn) == workload.table_digests(source_dsn)
    # Once done, running it again changes nothing.
    out = finish(snapshot_cli(env))
    assert "already has its snapshot" in out
    assert chunk_times(target_dsn, topic_prefix) == before
