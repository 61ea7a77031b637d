"""Faults the stream cannot repair: it must halt, say why and where, and apply nothing more.

Both scenarios end in a halt, not in recovery: the harness's end proof (sides equal)
does not apply. Each asserts the halt (in the migration state, the daemon log and
``cdcsync status``), that the stored offsets of what cannot be proven contiguous do not
move, and records the ledger's acknowledged writes in its summary row.
"""

from __future__ import annotations

import json
import re
import signal
import time
from typing import Any

import psycopg
import pytest
from psycopg import sql

from cdcsync.adapters.connect_rest import ConnectClient
from tests.faults.harness import FaultRun
from tests.fix_stack import StackHandle
from tests.integration.cutover_helpers import cdcsync, settings_for

pytestmark = pytest.mark.stack


def migration_data(fault_run: FaultRun) -> dict[str, Any]:
    settings = settings_for(fault_run.env)
    with psycopg.connect(fault_run.target_dsn, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL("SELECT data FROM {} WHERE migration_id = %s").format(
                sql.Identifier(settings.state_schema, "migration")
            ),
            (settings.migration_id,),
        ).fetchone()
    assert row is not None, "no migration state"
    return dict(row[0] or {})


def stored_offsets(fault_run: FaultRun) -> dict[tuple[str, int], int]:
    """The forward stream's next offsets, as stored with the applied rows."""
    settings = settings_for(fault_run.env)
    with psycopg.connect(fault_run.target_dsn, autocommit=True) as conn:
        rows = conn.execute(
            sql.SQL(
                "SELECT topic, kafka_partition, next_offset FROM {} "
                "WHERE migration_id = %s AND direction = 'forward'"
            ).format(sql.Identifier(settings.state_schema, "kafka_offset")),
            (settings.migration_id,),
        ).fetchall()
    return {(str(t), int(p)): int(o) for t, p, o in rows}


def wait_for(what: str, check: Any, fault_run: FaultRun, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"{what} not seen after {timeout}s:\n{fault_run.daemon.tail()}")


def status_json(fault_run: FaultRun) -> dict[str, Any]:
    """``cdcsync status -o json`` against the running daemon's health endpoint."""
    found = re.search(r"metrics and health on http://([^\s/\"]+)", fault_run.daemon.log.read_text())
    assert found, fault_run.daemon.tail()
    done = cdcsync(
        fault_run.env, "status", "-o", "json", extra_env={"CDCSYNC_METRICS_ADDR": found.group(1)}
    )
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def end_offset(fault_run: FaultRun, topic: str) -> int:
    """The high watermark of ``topic``'s partition 0."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {"bootstrap.servers": fault_run.env["CDCSYNC_KAFKA_BOOTSTRAP"], "group.id": "probe"}
    )
    try:
        return int(consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1])
    finally:
        consumer.close()


def record_ledger(fault_run: FaultRun) -> None:
    """Writers stopped; the row counts what the ledger had acknowledged."""
    fault_run.stop_writers()
    fault_run.outcome.acknowledged = len(fault_run.app.acked)
    assert fault_run.outcome.acknowledged > 0, "the ledger acknowledged nothing"


# --------------------------------------------------------------------------- slot dropped
def drop_slot(dsn: str, slot: str, timeout: float = 30) -> None:
    """Terminate the slot's walsender and drop the slot (Debezium may reconnect: retry)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                "WHERE slot_name = %s AND active_pid IS NOT NULL",
                (slot,),
            )
            try:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                return
            except psycopg.errors.ObjectInUse:
                assert time.monotonic() < deadline, f"slot {slot} stays in use"
                time.sleep(0.05)


@pytest.mark.scenario(
    "Replication slot dropped behind cdcsync's back (writes continue)",
    "halt naming the slot and 're-snapshot', recorded in the state, the log and status; "
    "nothing applied after it, not even once a slot of that name is created again",
)
def test_dropped_slot_halts_the_stream(
    stack: StackHandle, fault_run: FaultRun, connectors: list[str]
) -> None:
    """Changes committed after the drop never reach Kafka; a silent skip would lose them.

    The slot's walsender is terminated and the slot dropped while the ledger and the
    load keep writing. The daemon's slot watchdog must record the halt (sticky), stop
    the forward stream and keep it stopped, also after a slot with the same name is
    created again at a later WAL position — the trap that streams on with a hole:
    Debezium 3.5 fails its task when the slot is missing or starts past its stored
    offset, but with its offsets reset it creates the slot and streams from there.
    """
    settings = settings_for(fault_run.env)
    slot = settings.slot_name
    fault_run.start(connectors, seconds=15)
    time.sleep(4)
    drop_slot(fault_run.source_dsn, slot)

    data = wait_for("the slot halt", lambda: migration_data(fault_run).get("slot_lost"), fault_run)
    reason = str(data["reason"])
    assert data["slot"] == slot and data["direction"] == "forward", data
    assert f"replication slot {slot} on the source is gone" in reason, reason
    assert "re-snapshot" in reason, reason
    assert slot in str(migration_data(fault_run).get("halted")), migration_data(fault_run)
    log = fault_run.daemon.log.read_text()
    assert "forward stream halted" in log and slot in log, fault_run.daemon.tail()
    assert fault_run.daemon.alive(), fault_run.daemon.tail()

    status = status_json(fault_run)
    halted = [c for c in status["daemon"]["checks"] if c["name"] == "halted"]
    assert halted and not halted[0]["ok"] and slot in halted[0]["detail"], status["daemon"]

    # The stream stopped: nothing is applied while the writers go on.
    frozen = stored_offsets(fault_run)
    time.sleep(6)
    assert stored_offsets(fault_run) == frozen, "offsets moved after the slot halt"

    # The silent trap: the connector's offsets reset (as when an operator re-registers
    # it), Debezium creates the slot again at today's WAL and streams on from there.
    # New events reach Kafka; the halt must stay and the applier must not take them.
    client = ConnectClient(fault_run.env["CDCSYNC_CONNECT_URL"])
    ledger_topic = f"{settings.topic_prefix}.public.ledger"
    ends = end_offset(fault_run, ledger_topic)
    client.reset_offsets(settings.connector_name)
    client._call("PUT", f"/connectors/{settings.connector_name}/resume")
    wait_for(
        "Debezium streaming from a recreated slot",
        lambda: end_offset(fault_run, ledger_topic) > ends + 10,
        fault_run,
    )
    with psycopg.connect(fault_run.source_dsn, autocommit=True) as conn:
        assert conn.execute(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone(), "Debezium did not create the slot again"
    time.sleep(5)
    assert migration_data(fault_run).get("slot_lost"), "the halt was cleared by a new slot"
    assert stored_offsets(fault_run) == frozen, "events from the recreated slot were applied"
    assert fault_run.daemon.alive(), fault_run.daemon.tail()
    record_ledger(fault_run)


# --------------------------------------------------------------------------- retention
@pytest.mark.scenario(
    "Kafka retention expired before the applier read the data (records deleted)",
    "halt 'offset gap' naming topic[partition], expected and earliest offsets; stored "
    "offset unchanged, nothing of that partition applied past the gap",
)
def test_expired_records_halt_with_an_offset_gap(
    stack: StackHandle, fault_run: FaultRun, connectors: list[str]
) -> None:
    """Records the applier never read are deleted from Kafka while the daemon is down.

    The daemon stops cleanly (SIGTERM), the ledger keeps writing, the ledger topic's
    partition loses its records up to a few past the stored offset (``delete_records``,
    what retention does, deterministically), and the daemon starts again: it must halt
    on the gap instead of starting from the earliest offset left.
    """
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient

    settings = settings_for(fault_run.env)
    topic = f"{settings.topic_prefix}.public.ledger"
    fault_run.start(connectors, seconds=12)
    wait_for("ledger rows applied", lambda: stored_offsets(fault_run).get((topic, 0)), fault_run)
    time.sleep(2)
    assert fault_run.daemon.kill(signal.SIGTERM) == 0, fault_run.daemon.tail()
    before = stored_offsets(fault_run)
    expected = before[(topic, 0)]

    admin = AdminClient({"bootstrap.servers": fault_run.env["CDCSYNC_KAFKA_BOOTSTRAP"]})
    cut = expected + 5
    wait_for(
        "ledger events past the stored offset",
        lambda: end_offset(fault_run, topic) > cut + 5,
        fault_run,
    )
    futures = admin.delete_records([TopicPartition(topic, 0, cut)])
    for future in futures.values():
        assert future.result(timeout=30).low_watermark == cut

    fault_run.daemon.start()
    gap = f"offset gap on {topic}[0]: expected offset {expected}, got {cut}"
    wait_for("the offset gap halt", lambda: gap in fault_run.daemon.log.read_text(), fault_run)
    wait_for(
        "the halt in the state",
        lambda: gap in str(migration_data(fault_run).get("halted") or ""),
        fault_run,
    )
    assert "refusing to skip" in fault_run.daemon.log.read_text()
    time.sleep(3)  # let a retry run: it must halt again, not move on
    after = stored_offsets(fault_run)
    assert after[(topic, 0)] == expected, (before, after)
    assert fault_run.daemon.alive(), fault_run.daemon.tail()
    record_ledger(fault_run)
