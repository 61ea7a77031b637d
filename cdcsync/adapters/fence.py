"""Write fences: a statement trigger per table that rejects writes with SQLSTATE CDC01.

An ordinary trigger fires in every session except those with
``session_replication_role = replica`` — the applier's — so the fence stops
applications and operators while cdcsync's own writes pass. Installing it takes a
lock that waits for writers mid-transaction (under ``lock_timeout``, retried), so
once it is in place no transaction that could still write is running.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg import sql

from cdcsync.core.events import TableId
from cdcsync.errors import AbortedSafely

SQLSTATE = "CDC01"
TRIGGER = "cdcsync_fence"
TRUNCATE_TRIGGER = "cdcsync_fence_truncate"


def ensure_function(conn: psycopg.Connection[Any], schema: str) -> None:
    conn.execute(
        sql.SQL(
            """
            CREATE OR REPLACE FUNCTION {}.fence() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION USING
                    ERRCODE = 'CDC01',
                    MESSAGE = format('%s.%s is write-fenced by cdcsync migration %s',
                                     TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_ARGV[0]),
                    HINT = 'this database is not the primary of the migration; write to '
                           'the other side, or run cdcsync abort/rollback';
            END $$
            """
        ).format(sql.Identifier(schema))
    )


def install(
    conn: psycopg.Connection[Any],
    tables: Iterable[TableId],
    migration_id: str,
    *,
    schema: str = "cdcsync",
    lock_timeout_ms: int = 2000,
    attempts: int = 5,
) -> None:
    """Fence every table in one transaction; retry when writers hold locks too long."""
    tables = list(tables)
    for attempt in range(1, attempts + 1):
        try:
            with conn.transaction():
                conn.execute(
                    sql.SQL("SET LOCAL lock_timeout = {}").format(
                        sql.Literal(f"{lock_timeout_ms}ms")
                    )
                )
                ensure_function(conn, schema)
                for table in tables:
                    _install_one(conn, table, migration_id, schema)
            return
        except psycopg.errors.LockNotAvailable as exc:
            if attempt == attempts:
                raise AbortedSafely(
                    f"could not fence {len(tables)} table(s) within {attempts} tries of "
                    f"{lock_timeout_ms} ms: long-running writers hold locks ({exc})"
                ) from exc
            time.sleep(0.05 * attempt)


def _install_one(
    conn: psycopg.Connection[Any], table: TableId, migration_id: str, schema: str
) -> None:
    target = sql.Identifier(table.schema, table.name)
    func = sql.Identifier(schema, "fence")
    for name, events in ((TRIGGER, "INSERT OR UPDATE OR DELETE"), (TRUNCATE_TRIGGER, "TRUNCATE")):
        conn.execute(
            sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name), target)
        )
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER {} BEFORE " + events + " ON {} FOR EACH STATEMENT "
                "EXECUTE FUNCTION {}({})"
            ).format(sql.Identifier(name), target, func, sql.Literal(migration_id))
        )


def remove(conn: psycopg.Connection[Any], tables: Iterable[TableId]) -> None:
    """Lift the fence (idempotent)."""
    with conn.transaction():
        for table in tables:
            target = sql.Identifier(table.schema, table.name)
            for name in (TRIGGER, TRUNCATE_TRIGGER):
                conn.execute(
                    sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name), target)
                )


def fenced(conn: psycopg.Connection[Any], tables: Iterable[TableId]) -> dict[TableId, bool]:
    """Which tables carry the fence right now."""
    out: dict[TableId, bool] = {}
    for table in tables:
        row = conn.execute(
            "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s AND t.tgname = ANY(%s)",
            (table.schema, table.name, [TRIGGER, TRUNCATE_TRIGGER]),
        ).fetchone()
        out[table] = bool(row and row[0] == 2)
    return out
