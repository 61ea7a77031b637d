"""The consistent boundary: cdcsync's publication, then a slot exporting its snapshot.

Every row committed before the slot's consistent point is visible to a transaction
that imports the exported snapshot; every change after it is decoded from the slot.
The snapshot name is valid only while the replication connection that created it stays
open and idle, so every copy worker imports it before that connection is let go.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from cdcsync.core.events import TableId
from cdcsync.errors import PreconditionError


@dataclass
class Boundary:
    slot_name: str
    consistent_point: str
    snapshot_name: str
    replication_conn: psycopg.Connection[Any]

    def release(self) -> None:
        """Close the replication connection (the slot stays)."""
        self.replication_conn.close()


def create_publication(conn: psycopg.Connection[Any], name: str, tables: Iterable[TableId]) -> None:
    """cdcsync's own filtered publication; partitioned tables stream as their root."""
    conn.execute(
        sql.SQL(
            "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)"
        ).format(
            sql.Identifier(name),
            sql.SQL(", ").join(sql.Identifier(t.schema, t.name) for t in tables),
        )
    )


def create_slot(dsn: str, slot: str) -> Boundary:
    """CREATE_REPLICATION_SLOT … EXPORT_SNAPSHOT over a replication connection."""
    try:
        repl = psycopg.connect(
            psycopg.conninfo.make_conninfo(dsn, replication="database"), autocommit=True
        )
    except psycopg.Error as exc:
        raise PreconditionError(f"replication connection to the source failed: {exc}") from exc
    # The replication protocol takes no parameters: the slot name is a validated
    # identifier (settings enforce [a-z0-9_]), quoted here.
    row = repl.execute(
        sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT").format(
            sql.Identifier(slot)
        )
    ).fetchone()
    assert row is not None
    return Boundary(str(row[0]), str(row[1]), str(row[2]), repl)


def import_snapshot(conn: psycopg.Connection[Any], snapshot_name: str) -> None:
    """Open a repeatable-read transaction seeing exactly the exported snapshot."""
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name)))
