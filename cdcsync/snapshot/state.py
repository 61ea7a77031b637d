"""The snapshot's durable state in the target's ``cdcsync`` schema.

``migration`` holds one row per migration: phase (``snapshot`` while the snapshot
runs, ``snapshotted`` when it is done), the slot, publication, consistent point and
exported snapshot, a fingerprint of the settings that scope it, and in ``data`` the
step reached, the migrated tables and what this run created. ``snapshot_plan`` holds
the chunk plan, ``snapshot_chunk`` one row per chunk whose rows are committed.

Reading never creates anything: a database without the state schema simply has no
migration yet (preflight must be able to fail with nothing changed).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from cdcsync.config import Settings
from cdcsync.core.events import TableId
from cdcsync.snapshot.chunking import Chunk

PHASE_SNAPSHOT = "snapshot"
PHASE_SNAPSHOTTED = "snapshotted"

# Steps of the snapshot phase, in order.
STEP_PRE_DATA = "pre_data"
STEP_BOUNDARY = "boundary"
STEP_COPY = "copy"
STEP_POST_DATA = "post_data"


@dataclass
class State:
    phase: str
    fingerprint: str | None
    slot_name: str | None
    publication_name: str | None
    consistent_point: str | None
    snapshot_name: str | None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> str:
        return str(self.data.get("step", STEP_PRE_DATA))

    @property
    def tables(self) -> list[TableId]:
        return [TableId(str(s), str(n)) for s, n in self.data.get("tables", [])]


def fingerprint_inputs(settings: Settings, source_database: str) -> dict[str, Any]:
    """What decides the migration's scope; a resume under different values is refused."""
    return {
        "migration_id": settings.migration_id,
        "source_database": source_database,
        "schemas": sorted(settings.schemas),
        "tables": sorted(settings.tables),
        "state_schema": settings.state_schema,
    }


def fingerprint(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _schema(settings: Settings) -> sql.Identifier:
    return sql.Identifier(settings.state_schema)


def read(conn: psycopg.Connection[Any], settings: Settings) -> State | None:
    """The migration's state, or None (also when the state schema does not exist yet)."""
    present = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL",
        (sql.Identifier(settings.state_schema, "migration").as_string(conn),),
    ).fetchone()
    if not present or not present[0]:
        conn.rollback()
        return None
    row = conn.execute(
        sql.SQL(
            "SELECT phase, fingerprint, slot_name, publication_name, consistent_point::text, "
            "snapshot_name, data FROM {}.migration WHERE migration_id = %s"
        ).format(_schema(settings)),
        (settings.migration_id,),
    ).fetchone()
    conn.rollback()
    if row is None:
        return None
    return State(
        str(row[0]),
        None if row[1] is None else str(row[1]),
        None if row[2] is None else str(row[2]),
        None if row[3] is None else str(row[3]),
        None if row[4] is None else str(row[4]),
        None if row[5] is None else str(row[5]),
        dict(row[6] or {}),
    )


def write(
    conn: psycopg.Connection[Any],
    settings: Settings,
    phase: str,
    *,
    fingerprint: str | None = None,
    consistent_point: str | None = None,
    snapshot_name: str | None = None,
    replace_data: bool = False,
    **data: Any,
) -> None:
    """Upsert the migration row; ``data`` keys are merged into what is there (or replace it)."""
    s = _schema(settings)
    merge = (
        sql.SQL("EXCLUDED.data")
        if replace_data
        else sql.SQL("{}.migration.data || EXCLUDED.data").format(s)
    )
    with conn.transaction():
        conn.execute(
            sql.SQL(
                "INSERT INTO {s}.migration (migration_id, phase, fingerprint, slot_name, "
                "publication_name, consistent_point, snapshot_name, data) "
                "VALUES (%s, %s, %s, %s, %s, %s::pg_lsn, %s, %s::jsonb) "
                "ON CONFLICT (migration_id) DO UPDATE SET phase = EXCLUDED.phase, "
                "fingerprint = coalesce(EXCLUDED.fingerprint, {s}.migration.fingerprint), "
                "slot_name = EXCLUDED.slot_name, publication_name = EXCLUDED.publication_name, "
                "consistent_point = coalesce(EXCLUDED.consistent_point, "
                "{s}.migration.consistent_point), "
                "snapshot_name = coalesce(EXCLUDED.snapshot_name, {s}.migration.snapshot_name), "
                "data = {merge}, updated_at = now()"
            ).format(s=s, merge=merge),
            (
                settings.migration_id,
                phase,
                fingerprint,
                settings.slot_name,
                settings.publication_name,
                consistent_point,
                snapshot_name,
                json.dumps(data),
            ),
        )


def forget_boundary(conn: psycopg.Connection[Any], settings: Settings) -> None:
    """Clear the consistent point and snapshot of an abandoned attempt."""
    with conn.transaction():
        conn.execute(
            sql.SQL(
                "UPDATE {}.migration SET consistent_point = NULL, snapshot_name = NULL "
                "WHERE migration_id = %s"
            ).format(_schema(settings)),
            (settings.migration_id,),
        )


def save_plan(conn: psycopg.Connection[Any], settings: Settings, chunks: Sequence[Chunk]) -> None:
    s = _schema(settings)
    with conn.transaction():
        conn.execute(
            sql.SQL("DELETE FROM {}.snapshot_plan WHERE migration_id = %s").format(s),
            (settings.migration_id,),
        )
        with conn.cursor().copy(
            sql.SQL(
                "COPY {}.snapshot_plan (migration_id, table_schema, table_name, chunk_no, "
                "source_schema, source_name, kind, lower_bound, upper_bound, est_bytes, "
                "filenode) FROM STDIN"
            ).format(s)
        ) as copy:
            for c in chunks:
                copy.write_row(
                    (
                        settings.migration_id,
                        c.table.schema,
                        c.table.name,
                        c.number,
                        c.source.schema,
                        c.source.name,
                        c.kind,
                        None if c.lower is None else list(c.lower),
                        None if c.upper is None else list(c.upper),
                        c.est_bytes,
                        c.filenode,
                    )
                )


def load_plan(conn: psycopg.Connection[Any], settings: Settings) -> list[Chunk]:
    rows = conn.execute(
        sql.SQL(
            "SELECT table_schema, table_name, chunk_no, source_schema, source_name, kind, "
            "lower_bound, upper_bound, est_bytes, filenode FROM {}.snapshot_plan "
            "WHERE migration_id = %s ORDER BY 1, 2, 3"
        ).format(_schema(settings)),
        (settings.migration_id,),
    ).fetchall()
    conn.rollback()
    return [
        Chunk(
            TableId(str(r[0]), str(r[1])),
            int(r[2]),
            TableId(str(r[3]), str(r[4])),
            r[5],
            None if r[6] is None else tuple(str(v) for v in r[6]),
            None if r[7] is None else tuple(str(v) for v in r[7]),
            int(r[8]),
            None if r[9] is None else int(r[9]),
        )
        for r in rows
    ]


def done_chunks(
    conn: psycopg.Connection[Any], settings: Settings
) -> dict[tuple[TableId, int], tuple[int, int]]:
    """(table, chunk number) → (rows, bytes) of every committed chunk."""
    rows = conn.execute(
        sql.SQL(
            "SELECT table_schema, table_name, chunk_no, rows_copied, bytes_copied "
            "FROM {}.snapshot_chunk WHERE migration_id = %s"
        ).format(_schema(settings)),
        (settings.migration_id,),
    ).fetchall()
    conn.rollback()
    return {(TableId(str(r[0]), str(r[1])), int(r[2])): (int(r[3]), int(r[4])) for r in rows}


def clear_copy(
    conn: psycopg.Connection[Any], settings: Settings, tables: Sequence[TableId]
) -> None:
    """Empty the partially copied target tables and forget the plan, in one transaction."""
    s = _schema(settings)
    with conn.transaction():
        present = [
            t
            for t in tables
            if (
                row := conn.execute(
                    "SELECT to_regclass(%s) IS NOT NULL",
                    (sql.Identifier(t.schema, t.name).as_string(conn),),
                ).fetchone()
            )
            and row[0]
        ]
        if present:
            conn.execute(
                sql.SQL("TRUNCATE {}").format(
                    sql.SQL(", ").join(sql.Identifier(t.schema, t.name) for t in present)
                )
            )
        for table in ("snapshot_chunk", "snapshot_plan"):
            conn.execute(
                sql.SQL("DELETE FROM {}.{} WHERE migration_id = %s").format(
                    s, sql.Identifier(table)
                ),
                (settings.migration_id,),
            )
