"""Peers the benchmarks run beside cdcsync: the Debezium JDBC sink, native logical replication.

Each peer is driven to the same end state as cdcsync and timed the same way, so a
benchmark can print honest ratios from one run.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from cdcsync.adapters.connect_rest import ConnectClient


def wait(check: Any, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done after {timeout:.0f}s")
        time.sleep(interval)


def consumer_group_lag(bootstrap: str, group: str, topics: Iterable[str]) -> int:
    """Sum over partitions of end offset minus the group's committed offset."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        metadata = consumer.list_topics(timeout=10)
        parts = [TopicPartition(t, p) for t in topics for p in metadata.topics[t].partitions]
        committed = consumer.committed(parts, timeout=10)
        lag = 0
        for tp in committed:
            _low, high = consumer.get_watermark_offsets(
                TopicPartition(tp.topic, tp.partition), timeout=10, cached=False
            )
            lag += high - max(tp.offset, 0)
        return lag
    finally:
        consumer.close()


def run_jdbc_sink(
    connect: ConnectClient,
    *,
    bootstrap: str,
    target_dsn: str,
    secrets_file: str,
    keyed_topics: list[str],
    keyless_topics: list[str],
    batch_size: int = 5000,
    timeout: float = 1800,
    converters: dict[str, str] | None = None,
) -> float:
    """Drain the topics into the target with the Debezium JDBC sink; seconds taken.

    Tuned fairly: upsert by record key, deletes enabled, large batches, the
    reduction buffer on (one write per key per batch, like cdcsync's compaction).
    Keyless tables (no record key) go through a second connector in insert mode.
    ``converters`` (``key.converter*`` / ``value.converter*``) replace the JSON ones, so
    the sink reads the same Avro topics cdcsync reads.
    """
    info = psycopg.conninfo.conninfo_to_dict(target_dsn)
    host, port = info.get("host", "127.0.0.1"), info.get("port", 5432)
    url = f"jdbc:postgresql://{host}:{port}/{info['dbname']}"
    common = {
        "connector.class": "io.debezium.connector.jdbc.JdbcSinkConnector",
        "tasks.max": "1",
        "connection.url": url,
        "connection.username": str(info.get("user", "postgres")),
        "connection.password": f"${{file:{secrets_file}:target.password}}",
        "schema.evolution": "none",
        "batch.size": str(batch_size),
        "consumer.override.max.poll.records": str(batch_size),
        "consumer.override.auto.offset.reset": "earliest",
        "collection.name.format": "${source.schema}.${source.table}",
        "key.converter": "org.apache.kafka.connect.json.JsonConverter",
        "value.converter": "org.apache.kafka.connect.json.JsonConverter",
        "key.converter.schemas.enable": "true",
        "value.converter.schemas.enable": "true",
    }
    if converters:
        for key in [k for k in common if k.startswith(("key.converter", "value.converter"))]:
            del common[key]
        common.update(converters)
    run = uuid.uuid4().hex[:6]
    names: list[tuple[str, list[str]]] = []
    if keyed_topics:
        names.append((f"bench-jdbc-keyed-{run}", keyed_topics))
    if keyless_topics:
        names.append((f"bench-jdbc-keyless-{run}", keyless_topics))
    started = time.monotonic()
    try:
        for name, topics in names:
            config = dict(common, topics=",".join(topics))
            if topics is keyed_topics:
                config.update(
                    {
                        "insert.mode": "upsert",
                        "primary.key.mode": "record_key",
                        "delete.enabled": "true",
                        "use.reduction.buffer": "true",
                    }
                )
            else:
                config.update({"insert.mode": "insert", "primary.key.mode": "none"})
            connect.put_config(name, config)
        for name, topics in names:
            connect.wait_running(name, timeout=120)
            wait(
                lambda n=name, t=topics: _sink_done(connect, bootstrap, n, t),
                timeout,
                f"JDBC sink {name}",
            )
        return time.monotonic() - started
    finally:
        for name, _ in names:
            with contextlib.suppress(Exception):
                connect.delete(name)


class SinkFailed(RuntimeError):
    """A sink task failed: waiting for its lag to reach 0 would only run into the timeout."""


def _sink_done(connect: ConnectClient, bootstrap: str, name: str, topics: list[str]) -> bool:
    if consumer_group_lag(bootstrap, f"connect-{name}", topics) == 0:
        return True
    status = connect.status(name) or {}
    for task in status.get("tasks", []):
        if task.get("state") == "FAILED":
            trace = str(task.get("trace", ""))
            cause = trace[trace.rfind("Caused by:") :] if "Caused by:" in trace else trace
            raise SinkFailed(f"JDBC sink {name} failed: {cause.splitlines()[0][:300]}")
    return False


def _with_password(dsn: str) -> str:
    """The subscriber connects as the server's OS user, which cannot read our passfile:
    hand it the password itself (this throwaway benchmark database only)."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    passfile = info.pop("passfile", None)
    if passfile:
        for line in Path(str(passfile)).read_text().splitlines():
            parts = line.split(":")
            if len(parts) >= 5:
                info["password"] = ":".join(parts[4:])
                break
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in info.items()})


def native_subscription(
    target_dsn: str, source_dsn: str, publication: str, slot: str, name: str
) -> None:
    """Create a disabled subscription on an existing slot, with no initial copy."""
    source_dsn = _with_password(source_dsn)
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} WITH "
                "(create_slot = false, slot_name = {}, copy_data = false, enabled = false)"
            ).format(
                sql.Identifier(name),
                sql.Literal(source_dsn),
                sql.Identifier(publication),
                sql.Literal(slot),
            )
        )


def run_native(target_dsn: str, name: str, marker: str, timeout: float = 1800) -> float:
    """Enable the subscription; time until the workload's last transaction is applied.

    Native logical replication applies transactions in commit order, so once the
    marker row (the workload's last commit) is on the target, everything is.
    """
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        started = time.monotonic()
        conn.execute(sql.SQL("ALTER SUBSCRIPTION {} ENABLE").format(sql.Identifier(name)))

        def caught_up() -> bool:
            got = conn.execute("SELECT 1 FROM ins WHERE payload = %s", (marker,)).fetchone()
            return got is not None

        wait(caught_up, timeout, f"native subscription {name}", interval=0.05)
        elapsed = time.monotonic() - started
        conn.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(sql.Identifier(name)))
        conn.execute(
            sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(sql.Identifier(name)))
        return elapsed
