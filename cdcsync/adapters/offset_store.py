"""Kafka offsets kept in the database the batch is applied to, in the same transaction.

A crash loses rows and offsets together, so a restart re-reads exactly what was not
applied. Writes are compare-and-set: a process that lost its partitions to another
one fails instead of overwriting newer progress with stale work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from cdcsync.errors import HaltedError


@dataclass(frozen=True)
class Progress:
    """What a batch moves a partition to."""

    topic: str
    partition: int
    expected: int  # the offset the batch started from: the stored one must equal it
    next_offset: int
    last_lsn: int | None
    last_commit_ms: int | None


class PartitionLost(HaltedError):
    """Another process of the group moved this partition's offset: this batch is stale."""


def load(
    conn: psycopg.Connection[Any], schema: str, migration_id: str, direction: str
) -> dict[tuple[str, int], int]:
    rows = conn.execute(
        sql.SQL(
            "SELECT topic, kafka_partition, next_offset FROM {}.kafka_offset "
            "WHERE migration_id = %s AND direction = %s"
        ).format(sql.Identifier(schema)),
        (migration_id, direction),
    ).fetchall()
    return {(str(t), int(p)): int(o) for t, p, o in rows}


def save(
    conn: psycopg.Connection[Any],
    schema: str,
    migration_id: str,
    direction: str,
    progress: list[Progress],
) -> None:
    """Record progress in the caller's transaction; raise if another writer moved it."""
    table = sql.Identifier(schema, "kafka_offset")
    for p in progress:
        # One statement for the first batch of a partition and every later one: the row
        # is created, or moved on only from where this batch started (compare-and-set).
        # A row stored at the batch's first offset by someone else (a stream re-armed at
        # the end of an empty topic stores 0) is where this batch starts, not a conflict.
        done = conn.execute(
            sql.SQL(
                "INSERT INTO {} AS o (migration_id, direction, topic, kafka_partition, "
                "next_offset, last_lsn, last_commit_ts) VALUES (%s, %s, %s, %s, %s, "
                "%s::pg_lsn, to_timestamp(%s / 1000.0)) "
                "ON CONFLICT (migration_id, direction, topic, kafka_partition) DO UPDATE SET "
                "next_offset = EXCLUDED.next_offset, "
                "last_lsn = coalesce(EXCLUDED.last_lsn, o.last_lsn), "
                "last_commit_ts = coalesce(EXCLUDED.last_commit_ts, o.last_commit_ts), "
                "updated_at = now() WHERE o.next_offset = %s"
            ).format(table),
            (
                migration_id,
                direction,
                p.topic,
                p.partition,
                p.next_offset,
                _lsn_text(p.last_lsn),
                p.last_commit_ms,
                p.expected,
            ),
        )
        if done.rowcount != 1:
            raise PartitionLost(
                f"offset of {p.topic}[{p.partition}] was moved by another process "
                f"(expected {p.expected}); this process lost the partition"
            )


def _lsn_text(lsn: int | None) -> str | None:
    if lsn is None:
        return None
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"
