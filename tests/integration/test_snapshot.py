"""The snapshot: a consistent boundary under load, resume after kill -9, clear refusals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdcsync.config import load_settings
from cdcsync.snapshot.boundary import import_snapshot
from cdcsync.snapshot.runner import run_snapshot
from cdcsync.stack.local import LocalStack
from tests.integration import workload

pytestmark = pytest.mark.stack


def env_for(source_dsn: str, target_dsn: str, migration: str, **extra: str) -> dict[str, str]:
    return {
        "CDCSYNC_SOURCE_DSN": source_dsn,
        "CDCSYNC_TARGET_DSN": target_dsn,
        "CDCSYNC_MIGRATION_ID": migration,
        "CDCSYNC_LOG_FORMAT": "json",
        **extra,
    }


def snapshot_cli(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cdcsync", "snapshot", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def source_objects(dsn: str, migration: str) -> tuple[int, int]:
    with psycopg.connect(dsn) as conn:
        slots = conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s",
            (f"{migration}_slot",),
        ).fetchone()
        pubs = conn.execute(
            "SELECT count(*) FROM pg_publication WHERE pubname = %s", (f"{migration}_pub",)
        ).fetchone()
    assert slots is not None and pubs is not None
    return int(slots[0]), int(pubs[0])


def test_copy_equals_the_source_at_the_consistent_point_under_load(
    source_dsn: str, target_dsn: str, topic_prefix: str
) -> None:
    workload.create_source(source_dsn, scale=2)
    # TRUNCATE is not MVCC-safe: a copy racing one sees the table empty, and the stream's
    # truncate event makes it right later (the end-to-end test covers that). Comparing
    # the copy with the boundary itself therefore runs without truncates.
    load = workload.Load(source_dsn, seconds=8, seed=3, exclude=("truncate",))
    load.start()
    time.sleep(1.0)
    seen: dict[str, Any] = {}
    observer = psycopg.connect(source_dsn)

    def on_boundary(snapshot_name: str) -> None:
        import_snapshot(observer, snapshot_name)
        seen["at_boundary"] = workload.digests_in(observer)
        observer.commit()

    settings = load_settings(
        source_dsn=source_dsn,
        target_dsn=target_dsn,
        migration_id=topic_prefix,
        snapshot_chunk_blocks=16,
    )
    result = run_snapshot(settings, on_boundary=on_boundary)
    observer.close()
    load.wait()
    assert not load.errors, load.errors
    copied = workload.table_digests(target_dsn)
    assert copied == seen["at_boundary"]
    # The source kept changing during the copy: the copy is the boundary, not the end.
    assert workload.table_digests(source_dsn) != copied
    assert result.rows == sum(n for n, _ in copied.values())
    with psycopg.connect(target_dsn) as conn:
        chunks = conn.execute(
            "SELECT count(*) FROM cdcsync.snapshot_chunk WHERE migration_id = %s",
            (topic_prefix,),
        ).fetchone()
        assert chunks is not None and chunks[0] > len(copied)  # big tables were split
        # Indexes and constraints came after the data; the fence is on.
        pk = conn.execute(
            "SELECT count(*) FROM pg_constraint WHERE conname = 'pgbench_accounts_pkey'"
        ).fetchone()
        assert pk == (1,)
        with pytest.raises(psycopg.Error) as err:
            conn.execute("INSERT INTO public.empty_one VALUES (1, 'x')")
        assert err.value.sqlstate == "CDC01"
        assert topic_prefix in str(err.value)


def test_resume_after_kill_nine_restarts_cleanly(
    source_dsn: str, target_dsn: str, topic_prefix: str
) -> None:
    workload.create_source(source_dsn, scale=3)
    env = env_for(
        source_dsn, target_dsn, topic_prefix, CDCSYNC_SNAPSHOT_CHUNK_BLOCKS="8", CDCSYNC_WORKERS="2"
    )
    # Kill at the start (before or at the boundary) and twice in the middle of the copy.
    for copied_lines in (0, 1, 6):
        proc = snapshot_cli(env)
        assert proc.stdout is not None
        if copied_lines == 0:
            time.sleep(0.4)
        else:
            seen = 0
            for line in proc.stdout:
                seen += "copied" in line
                if seen >= copied_lines:
                    break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    done = snapshot_cli(env)
    out, _ = done.communicate(timeout=300)
    assert done.returncode == 0, out
    assert workload.table_digests(target_dsn) == workload.table_digests(source_dsn)
    assert source_objects(source_dsn, topic_prefix) == (1, 1)


def test_nonempty_target_is_refused_and_nothing_changes(
    source_dsn: str, target_dsn: str, topic_prefix: str
) -> None:
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute("INSERT INTO t VALUES (1)")
    done = snapshot_cli(env_for(source_dsn, target_dsn, topic_prefix))
    out, _ = done.communicate(timeout=120)
    assert done.returncode == 3, out
    assert "target table public.t is not empty" in out
    assert source_objects(source_dsn, topic_prefix) == (0, 0)


def test_slot_in_use_is_refused(source_dsn: str, target_dsn: str, topic_prefix: str) -> None:
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute(
            "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (f"{topic_prefix}_slot",)
        )
    done = snapshot_cli(env_for(source_dsn, target_dsn, topic_prefix))
    out, _ = done.communicate(timeout=120)
    assert done.returncode == 3, out
    assert f"replication slot {topic_prefix}_slot already exists" in out
    assert source_objects(source_dsn, topic_prefix) == (1, 0)


def test_role_without_replication_is_refused(
    source_dsn: str, target_dsn: str, topic_prefix: str
) -> None:
    role = f"r_{topic_prefix}"
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    try:
        limited = psycopg.conninfo.make_conninfo(source_dsn, user=role, password="pw")
        done = snapshot_cli(env_for(limited, target_dsn, topic_prefix))
        out, _ = done.communicate(timeout=120)
        assert done.returncode == 3, out
        assert "lacks REPLICATION" in out
        assert "no SELECT privilege on source table public.t" in out
    finally:
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            conn.execute(f"DROP ROLE {role}")


def test_unreachable_source_is_a_clear_error(target_dsn: str, topic_prefix: str) -> None:
    done = snapshot_cli(
        env_for("host=127.0.0.1 port=1 dbname=x user=x connect_timeout=2", target_dsn, topic_prefix)
    )
    out, _ = done.communicate(timeout=60)
    assert done.returncode != 0
    assert "port 1" in out or "127.0.0.1" in out
    assert "Traceback" not in out


def test_wal_level_not_logical_is_refused(target_dsn: str, topic_prefix: str) -> None:
    root = Path(tempfile.mkdtemp(prefix="cdcsync-wal-"))
    os.chmod(root, 0o755)
    stack = LocalStack(root)
    try:
        stack.up(("source",))
        stack.down()
        (root / "source" / "data" / "cdcsync.conf").write_text("wal_level = replica\n")
        stack.up(("source",))
        dsn = stack.dsn("source")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        done = snapshot_cli(env_for(dsn, target_dsn, topic_prefix))
        out, _ = done.communicate(timeout=120)
        assert done.returncode == 3, out
        assert "wal_level is replica" in out
        assert "ALTER SYSTEM SET wal_level = logical" in out
    finally:
        stack.down()
