"""The target crashes mid-stream (immediate shutdown: no checkpoint) and comes back.

Expected outcome: the daemon stays up through the outage (its supervisor reconnects
with backoff, the stream halts and is retried), then catches up from the offsets stored
in the target — whatever batch was in flight is lost together with its offsets and
re-applied — and source and target end equal, under load the whole time, with every
acknowledged ledger write on the target exactly once. No event is sent twice by Kafka
here, so the full workload runs, keyless tables included.
"""

from __future__ import annotations

import time

import pytest

from tests.faults.harness import FaultRun
from tests.faults.test_service_restarts import stop_postgres
from tests.fix_stack import StackHandle

pytestmark = pytest.mark.stack


@pytest.mark.scenario(
    "Target PostgreSQL crash mid-batch (pg_ctl -m immediate)",
    "daemon stays up; the batch in flight is lost with its offsets and re-applied from the "
    "offsets stored in the target; 0 lost, 0 doubled",
)
def test_daemon_survives_a_target_crash(
    stack: StackHandle, fault_run: FaultRun, connectors: list[str]
) -> None:
    daemon = fault_run.daemon
    daemon.env = {**daemon.env, "CDCSYNC_APPLY__HALT_RETRY_SECONDS": "2"}
    fault_run.start(connectors, seconds=15)
    time.sleep(3)
    stop_postgres(stack, "target", mode="immediate")
    time.sleep(4)  # the outage: the applier cannot commit anything
    assert daemon.alive(), daemon.tail()
    assert stack.local is not None
    stack.local.up(("target",))
    fault_run.finish(timeout=240)
    assert daemon.alive(), daemon.tail()
    assert "retrying" in daemon.log.read_text(), daemon.tail()
