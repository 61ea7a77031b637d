"""Kafka Connect, the Kafka broker and the source PostgreSQL restart under load.

Each scenario injects its fault in the middle of a loaded stream and ends with the
harness's proof: sides equal by independent digests, every acknowledged ledger write
exactly once on the target.

A restart of Connect's task (the worker killed, the broker gone long enough for the
worker to lose its group, the source crashing back to its last checkpoint) re-sends
what Debezium produced after its last flushed position. Keyed tables absorb the replay
(upsert and delete by key); keyless tables (REPLICA IDENTITY FULL, matched by their
whole image, duplicate rows included) skip the re-sent changes by the applier's replay
marks (:mod:`cdcsync.core.replay`). Every scenario runs the full workload.
"""

from __future__ import annotations

import os
import time

import psycopg
import pytest

from cdcsync.adapters.pg_apply import ApplyError, fetch_rows_by_key
from cdcsync.core.events import TableId
from cdcsync.errors import HaltedError
from cdcsync.stack import procs
from tests.faults.harness import FaultRun, restart_service
from tests.fix_stack import StackHandle
from tests.integration import workload
from tests.integration.cutover_helpers import settings_for

pytestmark = pytest.mark.stack


def stop_postgres(stack: StackHandle, side: str, *, mode: str) -> None:
    """``pg_ctl stop -m <mode>`` one cluster, as its owner (its data directory from SHOW).

    ``fast`` is a clean shutdown (sessions end, checkpoint); ``immediate`` is a crash:
    no checkpoint, so replication slots come back at their last checkpointed position.
    """
    if stack.local is None:
        pytest.fail(f"this scenario stops the {side} cluster: it needs the local stack")
    with psycopg.connect(stack.admin_dsn(side), autocommit=True) as conn:
        row = conn.execute("SHOW data_directory").fetchone()
    assert row is not None
    procs.run(
        [workload.pg_bin("pg_ctl"), "stop", "-m", mode, "-D", str(row[0])],
        what=f"{side}: pg_ctl stop -m {mode}",
        user="postgres" if os.geteuid() == 0 else None,
        timeout=60,
    )


def restart_postgres(stack: StackHandle, side: str, *, mode: str, down_for: float = 3) -> None:
    """Stop one cluster (:func:`stop_postgres`), leave it down, start it again."""
    stop_postgres(stack, side, mode=mode)
    time.sleep(down_for)
    assert stack.local is not None
    stack.local.up((side,))


# ------------------------------------------------------------------ Kafka Connect
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


@pytest.mark.slow
@pytest.mark.scenario(
    "Kafka Connect worker hard kill (SIGKILL)",
    "connector resumes from its last flushed source offset; events produced after it are "
    "produced again; keyed tables absorb them, keyless ones skip them by their replay marks; "
    "0 lost, 0 doubled",
)
def test_connect_worker_hard_kill(
    stack: StackHandle, fault_run: FaultRun, connectors: list[str]
) -> None:
    """SIGKILL gives the worker no chance to flush offsets: Debezium re-reads the slot.

    Everything produced since the last offset flush reaches Kafka twice; the applier's
    upserts by key make the replay harmless, and the ledger proves nothing doubled.
    """
    fault_run.start(connectors, seconds=20)
    time.sleep(6)
    restart_service(stack, "connect", hard=True)
    fault_run.finish()


# ------------------------------------------------------------------ Kafka broker
@pytest.mark.slow
@pytest.mark.scenario(
    "Kafka broker restart (SIGTERM)",
    "Connect's producer and the applier's consumer reconnect; Connect's task restarts and "
    "re-sends; keyed tables absorb them, keyless ones skip them by their replay marks; "
    "0 lost, 0 doubled",
)
def test_kafka_broker_restart(
    stack: StackHandle, fault_run: FaultRun, connectors: list[str]
) -> None:
    """A clean broker stop mid-load: clients see the connection drop, then reconnect."""
    fault_run.start(connectors, seconds=25)
    time.sleep(6)
    restart_service(stack, "kafka", hard=False)
    assert fault_run.daemon.alive(), fault_run.daemon.tail()
    fault_run.finish(timeout=300)
    assert fault_run.daemon.alive(), fault_run.daemon.tail()


@pytest.mark.scenario(
    "Kafka broker hard kill (SIGKILL), full workload incl. keyless tables",
    "broker recovers its log; Connect's task restarts and re-sends; keyed tables absorb the "
    "re-sent changes, keyless ones skip them by their replay marks; 0 lost, 0 doubled",
)
def test_kafka_broker_hard_kill(
    stack: StackHandle, fault_run: FaultRun, connectors: list[str]
) -> None:
    """SIGKILL mid-load: no controlled shutdown, the broker recovers its log on start.

    The full workload runs, keyless tables with duplicate rows included: Debezium's
    re-sent changes reach them too, and the replay marks must skip every one.
    """
    fault_run.start(connectors, seconds=25)
    time.sleep(6)
    restart_service(stack, "kafka", hard=True, down_for=6)
    assert fault_run.daemon.alive(), fault_run.daemon.tail()
    fault_run.finish(timeout=300)
    assert fault_run.daemon.alive(), fault_run.daemon.tail()


# ------------------------------------------------------------------ source PostgreSQL
def _source_restart(
    stack: StackHandle, fault_run: FaultRun, connectors: list[str], *, mode: str
) -> None:
    """Load, then the source goes down while the ledger writes, then load again.

    pgbench aborts a client whose connection drops, so the first load ends before the
    outage and a second one starts as soon as the source is back (while Debezium is
    still reconnecting to its slot). The ledger writes throughout: its writes during
    the outage fail or stay in doubt, and only acknowledged ones are counted.

    The applier runs with ``apply.on_error=dead-letter``: an event whose by-key read
    from the source fails because the source went away is not at fault and must halt
    (and be retried), never be dead-lettered — the dead-letter topic ends empty, and a
    by-key read on a connection the outage broke raises a halt, not an apply error.
    """
    daemon = fault_run.daemon
    daemon.env = {**daemon.env, "CDCSYNC_APPLY__ON_ERROR": "dead-letter"}
    fault_run.start(connectors, seconds=8)
    assert fault_run.load is not None
    fault_run.load.wait()
    assert not fault_run.load.errors, fault_run.load.errors
    acked_before = len(fault_run.app.acked)
    reader = psycopg.connect(fault_run.source_dsn, autocommit=True)
    restart_postgres(stack, "source", mode=mode)
    assert daemon.alive(), daemon.tail()
    fault_run.load = workload.Load(
        fault_run.source_dsn, seconds=10, seed=17, exclude=("truncate",), rate=200
    )
    fault_run.load.start()

    fetch = fetch_rows_by_key(reader)
    with pytest.raises(HaltedError) as lost:
        fetch(TableId("public", "all_types"), ("id",), [("1",)])
    assert not isinstance(lost.value, ApplyError), lost.value
    assert "source connection lost while reading public.all_types by key" in str(lost.value)
    reader.close()

    fault_run.finish(timeout=300)
    assert daemon.alive(), daemon.tail()
    assert len(fault_run.app.acked) > acked_before, "the ledger wrote nothing after the restart"
    assert fault_run.app.other_errors, "the ledger never saw the outage: was the source stopped?"
    settings = settings_for(fault_run.env)
    dead = dead_letters(fault_run.env["CDCSYNC_KAFKA_BOOTSTRAP"], f"{settings.topic_prefix}-dlq")
    assert dead == 0, f"{dead} valid event(s) dead-lettered during the outage:\n{daemon.tail()}"


def dead_letters(bootstrap: str, topic: str) -> int:
    """Records in the dead-letter topic (0 when it was never created)."""
    from confluent_kafka import Consumer, TopicPartition
    from confluent_kafka.admin import AdminClient

    if topic not in AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics:
        return 0
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "probe"})
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        return int(high) - int(low)
    finally:
        consumer.close()


@pytest.mark.slow
@pytest.mark.scenario(
    "Source PostgreSQL restart (pg_ctl -m fast)",
    "Debezium reconnects to its slot and resumes at its confirmed position; "
    "ledger writes during the outage fail, none acknowledged is lost; 0 lost, 0 doubled",
)
def test_source_restart_fast(
    stack: StackHandle, fault_run: FaultRun, connectors: list[str]
) -> None:
    """A clean source shutdown: the slot's position is checkpointed with it."""
    _source_restart(stack, fault_run, connectors, mode="fast")


@pytest.mark.scenario(
    "Source PostgreSQL crash (pg_ctl -m immediate)",
    "slot comes back at its last checkpointed position; Debezium re-sends from there, "
    "keyed tables absorb them, keyless ones skip them by their replay marks; 0 lost, 0 doubled",
)
def test_source_restart_immediate(
    stack: StackHandle, fault_run: FaultRun, connectors: list[str]
) -> None:
    """A source crash: no checkpoint, so the slot may come back behind what was sent."""
    _source_restart(stack, fault_run, connectors, mode="immediate")
