"""Provable drain: every change committed on the source before a marker is applied.

1. Emit a transactional logical message on the source; its LSN is the marker.
2. Wait until Kafka Connect's committed source offset for the connector is at or past
   the marker. Connect commits a source offset only once every record before it is
   acknowledged by Kafka, so from then on every change before the marker is in Kafka.
3. Take the end offset of every partition of the migration's data topics.
4. Wait until the applier has committed (in the target's ``kafka_offset`` table) up
   to those end offsets.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from cdcsync.adapters import offset_store
from cdcsync.adapters.connect_rest import ConnectBusy, ConnectClient
from cdcsync.errors import AbortedSafely

MARKER_PREFIX = "cdcsync.drain"


@dataclass
class DrainResult:
    """What the drain proved, and how long each part took."""

    marker_lsn: int
    connector_lsn: int
    end_offsets: dict[tuple[str, int], int]
    seconds_to_kafka: float
    seconds_to_target: float
    timings: dict[str, float] = field(default_factory=dict)


def parse_lsn(text: str) -> int:
    """``'16/B374D848'`` → integer position."""
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def emit_marker(source: psycopg.Connection[Any]) -> int:
    """Write a transactional logical message on the source; return its LSN."""
    marker = f"{uuid.uuid4()}"
    with source.transaction():
        row = source.execute(
            "SELECT pg_logical_emit_message(true, %s, %s)::text", (MARKER_PREFIX, marker)
        ).fetchone()
    assert row is not None
    return parse_lsn(str(row[0]))


def connector_lsn(client: ConnectClient, connector: str) -> int | None:
    """The highest LSN in the connector's committed source offsets, if any."""
    body = client.offsets(connector)
    if not body:
        return None
    best: int | None = None
    for entry in body.get("offsets", []):
        offset = entry.get("offset") or {}
        for key in ("lsn", "lsn_proc", "lsn_commit"):
            value = offset.get(key)
            if isinstance(value, int):
                best = value if best is None else max(best, value)
    return best


def data_topics(topics: list[str], prefix: str) -> list[str]:
    """The migration's change topics: ``<prefix>.<schema>.<table>``, nothing else."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.[^.]+\.[^.]+$")
    return sorted(t for t in topics if pattern.match(t))


def offsets_consumer(bootstrap: str) -> Any:
    """A consumer that only reads watermarks; reuse it across drains (it costs a connect)."""
    from confluent_kafka import Consumer

    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"cdcsync-drain-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
        }
    )


def end_offsets(
    bootstrap: str, prefix: str, timeout: float = 10.0, consumer: Any = None
) -> dict[tuple[str, int], int]:
    """High watermark of every partition of the migration's data topics."""
    from confluent_kafka import TopicPartition

    own = consumer is None
    if own:
        consumer = offsets_consumer(bootstrap)
    try:
        metadata = consumer.list_topics(timeout=timeout)
        result: dict[tuple[str, int], int] = {}
        for topic in data_topics(list(metadata.topics), prefix):
            for partition in metadata.topics[topic].partitions:
                _low, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=timeout, cached=False
                )
                result[(topic, partition)] = int(high)
        return result
    finally:
        if own:
            consumer.close()


def applied_offsets(
    target: psycopg.Connection[Any], schema: str, migration_id: str, direction: str
) -> dict[tuple[str, int], int]:
    """Next offsets the applier has committed, per partition."""
    return offset_store.load(target, schema, migration_id, direction)


def lagging(
    ends: dict[tuple[str, int], int], applied: dict[tuple[str, int], int]
) -> dict[tuple[str, int], int]:
    """Partitions whose applied offset is behind the end offset, with the gap."""
    return {tp: end - applied.get(tp, 0) for tp, end in ends.items() if applied.get(tp, 0) < end}


def drain(
    *,
    source: psycopg.Connection[Any],
    target: psycopg.Connection[Any],
    connect: ConnectClient,
    connector: str,
    bootstrap: str,
    topic_prefix: str,
    migration_id: str,
    state_schema: str = "cdcsync",
    direction: str = "forward",
    timeout: float = 60.0,
    poll: float = 0.05,
    clock: Callable[[], float] = time.monotonic,
    consumer: Any = None,
) -> DrainResult:
    """Run the four steps; raise :class:`AbortedSafely` when ``timeout`` passes."""
    started = clock()
    deadline = started + timeout
    marker = emit_marker(source)
    seen: int | None = None
    busy: ConnectBusy | None = None
    while True:
        try:
            # A worker rejoining its group (after a broker or worker restart) answers
            # 409 or times out for a while: ask again until the deadline, not abort.
            seen, busy = connector_lsn(connect, connector), None
        except ConnectBusy as exc:
            busy = exc
        if seen is not None and seen >= marker:
            break
        if clock() > deadline:
            why = f"; last answer: {busy}" if busy is not None else ""
            raise AbortedSafely(
                f"drain: connector {connector} did not commit past marker LSN "
                f"{_fmt(marker)} within {timeout:.1f}s (at {_fmt(seen) if seen else 'nothing'})"
                f"{why}"
            )
        time.sleep(poll)
    in_kafka = clock()
    ends = end_offsets(bootstrap, topic_prefix, consumer=consumer)
    while True:
        target.rollback()  # a fresh snapshot of the offsets table each poll
        behind = lagging(ends, applied_offsets(target, state_schema, migration_id, direction))
        if not behind:
            break
        if clock() > deadline:
            detail = ", ".join(f"{t}[{p}] {gap} behind" for (t, p), gap in sorted(behind.items()))
            raise AbortedSafely(f"drain: applier did not catch up within {timeout:.1f}s: {detail}")
        time.sleep(poll)
    done = clock()
    return DrainResult(
        marker_lsn=marker,
        connector_lsn=seen,
        end_offsets=ends,
        seconds_to_kafka=in_kafka - started,
        seconds_to_target=done - in_kafka,
    )


def _fmt(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"
