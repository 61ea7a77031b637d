"""Kafka Connect, the Kafka broker and the source PostgreSQL restart under load.

Each scenario injects its fault in the middle of a loaded stream and ends with the
harness's proof: sides equal by independent digests, every acknowledged ledger write
exactly once on the target.
"""

from __future__ import annotations

import time

import pytest

from tests.faults.harness import FaultRun, restart_service
from tests.fix_stack import StackHandle

pytestmark = pytest.mark.stack


@pytest.mark.scenario(
    "Kafka Connect worker restart (SIGTERM)",
    "connector resumes from its committed source offset; replayed events absorbed",
)
def test_connect_worker_restart(
    stack: StackHandle, fault_run: FaultRun, connectors: list[str]
) -> None:
    fault_run.start(connectors, seconds=20)
    time.sleep(6)
    restart_service(stack, "connect", hard=False)
    fault_run.finish()
