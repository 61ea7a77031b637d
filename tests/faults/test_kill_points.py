"""The daemon dies at named instants under load, is restarted, and loses and doubles nothing.

Each crash is placed with ``CDCSYNC_FAULT_AT`` (:mod:`cdcsync.faultpoints`) in one run
of ``cdcsync run``; the restart is ``cdcsync run`` again without it. Expected, every
time: a batch killed before its COMMIT is rolled back with its offsets and re-read; one
killed right after it is not re-applied (its offsets committed with it); a snapshot
killed inside a chunk's transaction resumes under the same exported snapshot with that
chunk copied once; SIGTERM lets the batch in flight commit and exits 0. The harness's
proof closes each: sides equal, every acknowledged ledger write exactly once.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.faults.faultkit import (
    log_text,
    start_daemon,
    start_with_fault,
    stop_daemon,
    stored_offsets,
    wait_exit,
    wait_log,
)
from tests.faults.harness import FaultRun
from tests.integration import workload
from tests.integration.cutover_helpers import (
    LEDGER_DDL,
    App,
    cdcsync,
    hook,
    settings_for,
)
from tests.integration.test_e2e_stream import wait_streaming

pytestmark = pytest.mark.stack

#: The N-th batch after the restart: a few seconds into the load, with batches behind it.
NTH_BATCH = 40


def _kill_at_batch(fault_run: FaultRun, connectors: list[str], point: str) -> None:
    fault_run.start(connectors, seconds=25)
    time.sleep(3)
    stop_daemon(fault_run.daemon)  # the run that streamed the snapshot's start
    mark = len(log_text(fault_run.daemon))
    before = stored_offsets(fault_run.env)
    start_with_fault(fault_run.daemon, f"{point}:{NTH_BATCH}")
    code = wait_exit(fault_run.daemon)
    assert code == -signal.SIGKILL, f"exit {code}, not SIGKILL:\n{fault_run.daemon.tail()}"
    wait_log(fault_run.daemon, f"fault injection: signal 9 at {point}", since=mark)
    after = stored_offsets(fault_run.env)
    assert after != before, "no batch committed between the restart and the kill"
    time.sleep(2)  # the load goes on while the daemon is down
    start_daemon(fault_run.daemon)
    fault_run.finish()


@pytest.mark.scenario(
    "kill -9 between a batch's rows+offsets and its COMMIT",
    "transaction rolled back with its offsets; restart re-reads the batch; 0 lost, 0 doubled",
)
def test_kill_batch_before_commit(fault_run: FaultRun, connectors: list[str]) -> None:
    _kill_at_batch(fault_run, connectors, "batch-before-commit")


@pytest.mark.slow
@pytest.mark.scenario(
    "kill -9 right after a batch's COMMIT (before Kafka's commit)",
    "restart seeks to the offsets stored in the target; nothing re-applied; 0 lost, 0 doubled",
)
def test_kill_batch_after_commit(fault_run: FaultRun, connectors: list[str]) -> None:
    _kill_at_batch(fault_run, connectors, "batch-after-commit")


@pytest.mark.slow
@pytest.mark.scenario(
    "SIGTERM while a batch is being applied",
    "the batch in flight commits, exit 0; restart resumes; 0 lost, 0 doubled",
)
def test_sigterm_mid_batch(fault_run: FaultRun, connectors: list[str]) -> None:
    fault_run.start(connectors, seconds=25)
    time.sleep(3)
    stop_daemon(fault_run.daemon)
    mark = len(log_text(fault_run.daemon))
    start_with_fault(fault_run.daemon, f"batch-before-commit:{NTH_BATCH}", sig="TERM")
    code = wait_exit(fault_run.daemon)
    assert code == 0, f"exit {code} after SIGTERM:\n{fault_run.daemon.tail()}"
    wait_log(fault_run.daemon, "fault injection: signal 15 at batch-before-commit", since=mark)
    wait_log(fault_run.daemon, "finishing the batch in flight", since=mark)
    start_daemon(fault_run.daemon)
    fault_run.finish()


def _chunks_done(env: dict[str, str]) -> int:
    settings = settings_for(env)
    with psycopg.connect(env["CDCSYNC_TARGET_DSN"], autocommit=True) as conn:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {}.snapshot_chunk WHERE migration_id = %s").format(
                sql.Identifier(settings.state_schema)
            ),
            (settings.migration_id,),
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.slow
@pytest.mark.scenario(
    "kill -9 inside a snapshot chunk's transaction (after its COPY, before COMMIT), under load",
    "rerun resumes the copy under the same exported snapshot; the chunk copied once; "
    "0 lost, 0 doubled",
)
def test_kill_snapshot_chunk(
    fault_run: FaultRun, connectors: list[str], source_dsn: str, target_dsn: str
) -> None:
    env = fault_run.env
    # Small chunks: the kill lands with some copied and many to go. The setting is part
    # of the migration's fingerprint, so every run of it carries the same value.
    env["CDCSYNC_SNAPSHOT_CHUNK_BLOCKS"] = "64"
    connectors.append(settings_for(env).reverse_connector_name)
    workload.create_source(source_dsn, scale=1)
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(LEDGER_DDL)
    # The writers run during the snapshot, the crash and the resumed copy.
    fault_run.app = App({"source": source_dsn, "target": target_dsn}, fault_run.primary_file)
    fault_run.app.start()
    fault_run.load = workload.Load(source_dsn, seconds=40, exclude=("truncate",), rate=200)
    fault_run.load.start()
    time.sleep(2)
    start_with_fault(fault_run.daemon, "snapshot-chunk-copied:6")
    code = wait_exit(fault_run.daemon)
    assert code == -signal.SIGKILL, f"exit {code}, not SIGKILL:\n{fault_run.daemon.tail()}"
    wait_log(fault_run.daemon, "fault injection: signal 9 at snapshot-chunk-copied")
    done = _chunks_done(env)
    # Two workers: the one killed at its 6th chunk left at most 5 of its own recorded.
    assert 0 < done < 12, f"{done} chunks recorded before the kill"
    mark = len(log_text(fault_run.daemon))
    start_daemon(fault_run.daemon)
    wait_streaming(env, fault_run.daemon)
    line = wait_log(fault_run.daemon, "resuming the copy under exported snapshot", since=mark)
    assert "consistent point" in line, line
    assert _chunks_done(env) > done
    fault_run.finish()


@pytest.mark.slow
@pytest.mark.scenario(
    "kill -9 while the reverse stream applies (after cutover)",
    "restart streams the reverse direction from the offsets stored in the old source; "
    "0 lost, 0 doubled",
)
def test_kill_during_reverse_streaming(
    fault_run: FaultRun, connectors: list[str], target_dsn: str
) -> None:
    fault_run.start(connectors, seconds=6)
    assert fault_run.load is not None
    fault_run.load.wait()  # the forward load ends before the freeze
    assert not fault_run.load.errors, fault_run.load.errors
    cut = cdcsync(fault_run.env, "cutover", "--yes", "--on-switch", hook(fault_run.primary_file))
    assert cut.returncode == 0, cut.stderr + fault_run.daemon.tail()
    assert Path(fault_run.primary_file).read_text() == "target"
    # Writers on the new primary; the ledger moved there on the fence error.
    fault_run.load = workload.Load(target_dsn, seconds=25, seed=23, exclude=("truncate",), rate=200)
    fault_run.load.start()
    deadline = time.monotonic() + 60
    while not stored_offsets(fault_run.env, "reverse"):
        assert time.monotonic() < deadline, f"no reverse batch:\n{fault_run.daemon.tail()}"
        time.sleep(0.5)
    time.sleep(4)
    moving = stored_offsets(fault_run.env, "reverse")
    assert fault_run.daemon.kill(signal.SIGKILL) == -signal.SIGKILL
    time.sleep(3)
    mark = len(log_text(fault_run.daemon))
    start_daemon(fault_run.daemon)
    wait_log(fault_run.daemon, "starting the reverse stream", since=mark)
    fault_run.finish(direction="reverse")
    assert stored_offsets(fault_run.env, "reverse") != moving
