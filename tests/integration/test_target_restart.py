"""The target crashes mid-stream (immediate shutdown: no checkpoint) and comes back.

Expected outcome: the daemon stays up through the outage (its supervisor reconnects
with backoff, the stream halts and is retried), then catches up from the offsets stored
in the target — whatever batch was in flight is lost together with its offsets and
re-applied — and source and target end equal, under load the whole time.
"""

from __future__ import annotations

import os
import time

import psycopg
import pytest

from cdcsync.stack import procs
from tests.fix_stack import StackHandle
from tests.integration import workload
from tests.integration.cutover_helpers import drain_direction
from tests.integration.test_e2e_stream import Daemon, wait_streaming

pytestmark = pytest.mark.stack


def test_daemon_survives_a_target_crash(
    stack: StackHandle,
    source_dsn: str,
    target_dsn: str,
    migration_env: dict[str, str],
    daemon: Daemon,
) -> None:
    if stack.local is None:
        pytest.fail("this test restarts the target cluster: it needs the local stack")
    workload.create_source(source_dsn, scale=1)
    daemon.env = {**daemon.env, "CDCSYNC_APPLY__HALT_RETRY_SECONDS": "2"}
    daemon.start()
    wait_streaming(migration_env, daemon)
    with psycopg.connect(stack.admin_dsn("target"), autocommit=True) as conn:
        row = conn.execute("SHOW data_directory").fetchone()
    assert row is not None
    data_dir = str(row[0])
    load = workload.Load(source_dsn, seconds=15, seed=31, exclude=("truncate",), rate=200)
    load.start()
    time.sleep(3)
    procs.run(
        [workload.pg_bin("pg_ctl"), "stop", "-m", "immediate", "-D", data_dir],
        what="target: pg_ctl stop -m immediate",
        user="postgres" if os.geteuid() == 0 else None,
        timeout=60,
    )
    time.sleep(4)  # the outage: the applier cannot commit anything
    assert daemon.alive(), daemon.tail()
    stack.local.up(("target",))
    load.wait()
    assert not load.errors, load.errors
    drain_direction(migration_env, "forward", timeout=180)
    diff = workload.differences(source_dsn, target_dsn)
    assert not diff, f"{diff}\n{daemon.tail()}"
    assert daemon.alive(), daemon.tail()
    assert "retrying" in daemon.log.read_text(), daemon.tail()
