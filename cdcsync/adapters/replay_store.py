"""The applier's replay marks and cursors (:mod:`cdcsync.core.replay`), beside the offsets."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from cdcsync.core.replay import WINDOW, CursorRow, Row


def load(
    conn: psycopg.Connection[Any],
    schema: str,
    migration_id: str,
    direction: str,
    partitions: list[tuple[str, int]],
) -> tuple[list[Row], list[CursorRow]]:
    """Marks and cursors of ``partitions``; marks older than the window are deleted."""
    if not partitions:
        return [], []
    marks = sql.Identifier(schema, "replay_mark")
    cursors = sql.Identifier(schema, "replay_cursor")
    offsets = sql.Identifier(schema, "kafka_offset")
    topics, numbers = [t for t, _ in partitions], [n for _, n in partitions]
    conn.execute(
        sql.SQL(
            "DELETE FROM {} m USING {} o WHERE m.migration_id = %s AND m.direction = %s "
            "AND o.migration_id = m.migration_id AND o.direction = m.direction "
            "AND o.topic = m.topic AND o.kafka_partition = m.kafka_partition "
            "AND m.kafka_offset < o.next_offset - %s"
        ).format(marks, offsets),
        (migration_id, direction, WINDOW),
    )
    where = sql.SQL(
        "WHERE migration_id = %s AND direction = %s AND (topic, kafka_partition) IN "
        "(SELECT * FROM unnest(%s::text[], %s::int[]))"
    )
    params = (migration_id, direction, topics, numbers)
    rows = conn.execute(
        sql.SQL(
            "SELECT topic, kafka_partition, txid, lsn, ordinal, kafka_offset FROM {} {}"
        ).format(marks, where),
        params,
    ).fetchall()
    curs = conn.execute(
        sql.SQL(
            "SELECT topic, kafka_partition, txid, lsn, ordinal, first_change, ts_ms FROM {} {}"
        ).format(cursors, where),
        params,
    ).fetchall()
    return (
        [(str(a), int(b), int(c), int(d), int(e), int(f)) for a, b, c, d, e, f in rows],
        [(str(a), int(b), int(c), int(d), int(e), str(f), int(g)) for a, b, c, d, e, f, g in curs],
    )


def save(
    conn: psycopg.Connection[Any],
    schema: str,
    migration_id: str,
    direction: str,
    rows: list[Row],
    cursors: list[CursorRow],
) -> None:
    """Record marks and cursors in the caller's transaction (the batch's)."""
    if rows:
        cols = [list(c) for c in zip(*rows, strict=True)]
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (migration_id, direction, topic, kafka_partition, txid, lsn, "
                "ordinal, kafka_offset) SELECT %s, %s, * FROM unnest(%s::text[], %s::int[], "
                "%s::bigint[], %s::bigint[], %s::int[], %s::bigint[]) "
                "ON CONFLICT (migration_id, direction, topic, kafka_partition, txid) DO UPDATE "
                "SET lsn = EXCLUDED.lsn, ordinal = EXCLUDED.ordinal, "
                "kafka_offset = EXCLUDED.kafka_offset"
            ).format(sql.Identifier(schema, "replay_mark")),
            (migration_id, direction, *cols),
        )
    if cursors:
        cols = [list(c) for c in zip(*cursors, strict=True)]
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (migration_id, direction, topic, kafka_partition, txid, lsn, "
                "ordinal, first_change, ts_ms) SELECT %s, %s, * FROM unnest(%s::text[], "
                "%s::int[], %s::bigint[], %s::bigint[], %s::int[], %s::text[], %s::bigint[]) "
                "ON CONFLICT (migration_id, direction, topic, kafka_partition) DO UPDATE "
                "SET txid = EXCLUDED.txid, lsn = EXCLUDED.lsn, ordinal = EXCLUDED.ordinal, "
                "first_change = EXCLUDED.first_change, ts_ms = EXCLUDED.ts_ms"
            ).format(sql.Identifier(schema, "replay_cursor")),
            (migration_id, direction, *cols),
        )
