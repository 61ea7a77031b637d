"""The ``cdcsync`` schema: migration state kept in the database it describes.

The target holds the forward migration's state (and the source, after cutover, the
reverse one), so progress is committed in the same transaction as the rows it
describes: a snapshot chunk with its rows, a Kafka offset with the batch it covers.
The schema is versioned; :func:`ensure_schema` creates or upgrades it idempotently.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

SCHEMA_VERSION = 1

# Each statement is formatted with the state schema's quoted name as {s}.
_DDL: tuple[str, ...] = (
    "CREATE SCHEMA IF NOT EXISTS {s}",
    """CREATE TABLE IF NOT EXISTS {s}.schema_version (
        version int NOT NULL,
        installed_at timestamptz NOT NULL DEFAULT now()
    )""",
    # One row per migration: its phase and everything a resume needs.
    """CREATE TABLE IF NOT EXISTS {s}.migration (
        migration_id text PRIMARY KEY,
        phase text NOT NULL,
        fingerprint text,
        slot_name text,
        publication_name text,
        consistent_point pg_lsn,
        snapshot_name text,
        data jsonb NOT NULL DEFAULT '{{}}'::jsonb,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    )""",
    # Snapshot chunks: a row is written in the transaction that copied the chunk.
    """CREATE TABLE IF NOT EXISTS {s}.snapshot_chunk (
        migration_id text NOT NULL,
        table_schema text NOT NULL,
        table_name text NOT NULL,
        chunk_no int NOT NULL,
        rows_copied bigint NOT NULL,
        bytes_copied bigint NOT NULL,
        done_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (migration_id, table_schema, table_name, chunk_no)
    )""",
    # The snapshot's chunk plan, written once before the copy: a resume copies exactly
    # the planned chunks that have no snapshot_chunk row yet.
    """CREATE TABLE IF NOT EXISTS {s}.snapshot_plan (
        migration_id text NOT NULL,
        table_schema text NOT NULL,
        table_name text NOT NULL,
        chunk_no int NOT NULL,
        source_schema text NOT NULL,
        source_name text NOT NULL,
        kind text NOT NULL,
        lower_bound text[],
        upper_bound text[],
        est_bytes bigint NOT NULL,
        filenode oid,
        PRIMARY KEY (migration_id, table_schema, table_name, chunk_no)
    )""",
    # Next Kafka offset per partition, written in the transaction that applied the batch.
    """CREATE TABLE IF NOT EXISTS {s}.kafka_offset (
        migration_id text NOT NULL,
        direction text NOT NULL,
        topic text NOT NULL,
        kafka_partition int NOT NULL,
        next_offset bigint NOT NULL,
        last_lsn pg_lsn,
        last_commit_ts timestamptz,
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (migration_id, direction, topic, kafka_partition)
    )""",
    # Where the applier got to in each source transaction of a keyless table's partition
    # (and for truncates), written with the batch: changes Debezium sends again after a
    # task restart are recognised (cdcsync.core.replay).
    """CREATE TABLE IF NOT EXISTS {s}.replay_mark (
        migration_id text NOT NULL,
        direction text NOT NULL,
        topic text NOT NULL,
        kafka_partition int NOT NULL,
        txid bigint NOT NULL,
        lsn bigint NOT NULL,
        ordinal int NOT NULL,
        kafka_offset bigint NOT NULL,
        PRIMARY KEY (migration_id, direction, topic, kafka_partition, txid)
    )""",
    # The last such change the applier saw in each of those partitions.
    """CREATE TABLE IF NOT EXISTS {s}.replay_cursor (
        migration_id text NOT NULL,
        direction text NOT NULL,
        topic text NOT NULL,
        kafka_partition int NOT NULL,
        txid bigint NOT NULL,
        lsn bigint NOT NULL,
        ordinal int NOT NULL,
        first_change text NOT NULL,
        ts_ms bigint NOT NULL,
        PRIMARY KEY (migration_id, direction, topic, kafka_partition)
    )""",
    # Phase transitions and commands: who did what, when, with what result.
    """CREATE TABLE IF NOT EXISTS {s}.audit (
        id bigserial PRIMARY KEY,
        migration_id text NOT NULL,
        at timestamptz NOT NULL DEFAULT now(),
        actor text NOT NULL,
        command text NOT NULL,
        args jsonb NOT NULL DEFAULT '{{}}'::jsonb,
        result text,
        detail jsonb
    )""",
    # Requests from the CLI to a running daemon; the daemon's loop carries them out.
    """CREATE TABLE IF NOT EXISTS {s}.request (
        id bigserial PRIMARY KEY,
        migration_id text NOT NULL,
        kind text NOT NULL,
        args jsonb NOT NULL DEFAULT '{{}}'::jsonb,
        requested_by text NOT NULL,
        requested_at timestamptz NOT NULL DEFAULT now(),
        state text NOT NULL DEFAULT 'pending',
        result text,
        done_at timestamptz
    )""",
)


def ensure_schema(conn: psycopg.Connection[Any], schema: str = "cdcsync") -> None:
    """Create or upgrade the state schema; safe to call concurrently and repeatedly."""
    ident = sql.Identifier(schema)
    with conn.transaction():
        # Serialise concurrent installers (two workers starting at once).
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('cdcsync.ensure_schema'))")
        for statement in _DDL:
            conn.execute(sql.SQL(statement).format(s=ident))
        row = conn.execute(
            sql.SQL("SELECT max(version) FROM {s}.schema_version").format(s=ident)
        ).fetchone()
        current = row[0] if row else None
        if current is None:
            conn.execute(
                sql.SQL("INSERT INTO {s}.schema_version (version) VALUES (%s)").format(s=ident),
                (SCHEMA_VERSION,),
            )
        elif current > SCHEMA_VERSION:
            from cdcsync.errors import PreconditionError

            raise PreconditionError(
                f"state schema {schema!r} is at version {current}, newer than this "
                f"cdcsync ({SCHEMA_VERSION}): upgrade cdcsync"
            )
