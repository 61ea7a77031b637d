"""Cutover and rollback behind pgbouncer: applications see latency, not errors.

pgbench runs through pgbouncer (transaction pooling) for the whole test. The freeze
PAUSEs the database there, so no client meets the fence; the switch repoints it and
RESUMEs; pgbench must finish with zero failed transactions across both switches, and
its writes on either side reach the other.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from cdcsync.adapters.pgbouncer import backend_of
from cdcsync.stack.pgbouncer import PgbouncerProcess
from tests.fix_stack import StackHandle
from tests.integration import workload
from tests.integration.cutover_helpers import cdcsync, drain_direction, settings_for
from tests.integration.test_e2e_stream import Daemon, wait_streaming

pytestmark = pytest.mark.stack


@pytest.fixture
def bouncer(stack: StackHandle, source_dsn: str) -> Iterator[PgbouncerProcess]:
    assert stack.local is not None, "pgbouncer tests need the local stack"
    root = Path(tempfile.mkdtemp(prefix="cdcsync-pgb-"))
    os.chmod(root, 0o755)
    proc = PgbouncerProcess(root, stack.local.password_file)
    proc.start({"app": backend_of(source_dsn)}, pool_mode="transaction")
    yield proc
    proc.stop()
    shutil.rmtree(root, ignore_errors=True)


def test_no_failed_transaction_across_cutover_and_rollback(
    stack: StackHandle,
    bouncer: PgbouncerProcess,
    source_dsn: str,
    target_dsn: str,
    migration_env: dict[str, str],
    daemon: Daemon,
    connectors: list[str],
) -> None:
    assert stack.local is not None
    passfile = stack.local.passfile
    settings = settings_for(migration_env)
    connectors.append(settings.reverse_connector_name)
    workload.create_source(source_dsn, scale=1)
    daemon.start()
    wait_streaming(migration_env, daemon)
    pool_env = {
        "CDCSYNC_PGBOUNCER__ADMIN_DSN": bouncer.admin_dsn(passfile),
        "CDCSYNC_PGBOUNCER__DATABASES_FILE": str(bouncer.databases_file),
        "CDCSYNC_PGBOUNCER__DATABASE": "app",
    }
    pgbench = subprocess.Popen(
        [workload.pg_bin("pgbench"), "-n", "-T", "24", "-c", "4", "-j", "2", "-R", "200"],
        env={**os.environ, **workload.conninfo_env(bouncer.dsn("app", passfile))},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    time.sleep(4)
    cut = cdcsync(migration_env, "cutover", "--yes", "--output", "json", extra_env=pool_env)
    assert cut.returncode == 0, cut.stderr + daemon.tail()
    freeze_cut = json.loads(cut.stdout)["freeze_seconds"]
    before = _history(target_dsn)
    time.sleep(6)  # pgbench now writes to the target through the same pool
    assert _history(target_dsn) > before, "pgbench did not reach the new primary"
    back = cdcsync(migration_env, "rollback", "--yes", "--output", "json", extra_env=pool_env)
    assert back.returncode == 0, back.stderr + daemon.tail()
    freeze_back = json.loads(back.stdout)["freeze_seconds"]
    out, _ = pgbench.communicate(timeout=120)
    text = out.decode(errors="replace")
    assert pgbench.returncode == 0, text
    assert "number of failed transactions: 0 " in text, text
    assert 0 < freeze_cut < 10 and 0 < freeze_back < 10, (freeze_cut, freeze_back)
    drain_direction(migration_env, "forward")
    diff = workload.differences(source_dsn, target_dsn)
    assert not diff, f"{diff}\n{daemon.tail()}"
    assert daemon.alive(), daemon.tail()


def _history(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pgbench_history").fetchone()
    return int(row[0]) if row else 0
