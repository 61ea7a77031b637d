"""Write fences: statement triggers that reject writes to a table with SQLSTATE CDC01.

A fence is an ordinary trigger, so it fires in every session except those with
``session_replication_role = replica`` — cdcsync's own (the snapshot's workers and the
applier) — and stops applications and operators while cdcsync's writes pass. The
message names the table and the migration; the hint says what to do.

A partitioned table is fenced on every member of its partition tree: statement
triggers of a parent do not fire for statements that name a partition directly.

Installing takes SHARE ROW EXCLUSIVE on each table (CREATE TRIGGER does), which waits
for transactions that already wrote to it: once the fence is in, no transaction that
could still write there is running. The wait is bounded by ``lock_timeout`` and
retried, so a long writer delays the fence instead of queueing every other session
behind it indefinitely.

Tables are named as the source names them. A table the plan renames on the target is
found there through the rename registry its rename recorded in the state schema
(:data:`cdcsync.core.plan.RENAME_REGISTRY`), so the fence covers it under its new name.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg import sql

from cdcsync.core.events import TableId
from cdcsync.core.plan import RENAME_REGISTRY
from cdcsync.errors import AbortedSafely

SQLSTATE = "CDC01"
TRIGGER = "cdcsync_fence"
TRUNCATE_TRIGGER = "cdcsync_fence_truncate"
_TRIGGERS = (TRIGGER, TRUNCATE_TRIGGER)


def is_fence_error(exc: BaseException) -> bool:
    """Whether a database error is a fence rejecting a write."""
    return isinstance(exc, psycopg.Error) and exc.sqlstate == SQLSTATE


def ensure_function(conn: psycopg.Connection[Any], schema: str) -> None:
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
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


def renamed(conn: psycopg.Connection[Any], schema: str = "cdcsync") -> dict[TableId, TableId]:
    """Source name → name in this database, for the tables the plan renamed here.

    A record whose table no longer exists (left by an earlier snapshot) is ignored.
    """
    registry = sql.Identifier(schema, RENAME_REGISTRY).as_string(conn)
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (registry,)).fetchone()
    if not (row and row[0]):
        return {}
    rows = conn.execute(
        sql.SQL(
            "SELECT source_schema, source_name, target_schema, target_name FROM {} "
            "WHERE to_regclass(format('%I.%I', target_schema, target_name)) IS NOT NULL"
        ).format(sql.Identifier(schema, RENAME_REGISTRY))
    ).fetchall()
    return {TableId(str(a), str(b)): TableId(str(c), str(d)) for a, b, c, d in rows}


def resolve(
    conn: psycopg.Connection[Any], tables: Iterable[TableId], schema: str = "cdcsync"
) -> list[TableId]:
    """``tables`` (the source's names) as this database names them."""
    wanted = list(tables)
    names = renamed(conn, schema) if wanted else {}
    return [names.get(t, t) for t in wanted]


def members(
    conn: psycopg.Connection[Any], tables: Iterable[TableId], *, schema: str = "cdcsync"
) -> list[TableId]:
    """The tables (renamed ones under their name here) and, for partitioned ones, every
    member of their partition tree.

    Few round trips for all of them: fencing runs inside the cutover's write freeze.
    """
    return _members(conn, resolve(conn, tables, schema))


def _members(conn: psycopg.Connection[Any], wanted: list[TableId]) -> list[TableId]:
    """:func:`members` of tables already named as this database names them."""
    if not wanted:
        return []
    names = [sql.Identifier(t.schema, t.name).as_string(conn) for t in wanted]
    rows = conn.execute(
        "SELECT w.ord, n.nspname, c.relname FROM unnest(%s::text[]) WITH ORDINALITY w(name, ord) "
        "CROSS JOIN LATERAL pg_partition_tree(to_regclass(w.name)) p "
        "JOIN pg_class c ON c.oid = p.relid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "ORDER BY w.ord, p.level, 2, 3",
        (names,),
    ).fetchall()
    found: dict[int, list[TableId]] = {}
    for ord_, schema, name in rows:
        found.setdefault(int(ord_), []).append(TableId(str(schema), str(name)))
    out: list[TableId] = []
    seen: set[TableId] = set()
    for i, table in enumerate(wanted, start=1):
        for member in found.get(i) or [table]:
            if member not in seen:
                seen.add(member)
                out.append(member)
    return out


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
                # One round trip for every table: this runs inside the write freeze.
                batch = [
                    _install_sql(t, migration_id, schema)
                    for t in members(conn, tables, schema=schema)
                ]
                if batch:
                    conn.execute(sql.SQL("; ").join(batch))
            return
        except psycopg.errors.LockNotAvailable as exc:
            if attempt == attempts:
                raise AbortedSafely(
                    f"could not fence {len(tables)} table(s) within {attempts} tries of "
                    f"{lock_timeout_ms} ms: long-running writers hold locks ({exc}); nothing "
                    "was fenced"
                ) from exc
            time.sleep(0.05 * attempt)


def _install_sql(table: TableId, migration_id: str, schema: str) -> sql.Composed:
    """DROP and CREATE of both fence triggers on one table, as one statement batch."""
    target = sql.Identifier(table.schema, table.name)
    func = sql.Identifier(schema, "fence")
    parts: list[sql.Composable] = []
    for name, events in ((TRIGGER, "INSERT OR UPDATE OR DELETE"), (TRUNCATE_TRIGGER, "TRUNCATE")):
        parts.append(
            sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name), target)
        )
        parts.append(
            sql.SQL(
                "CREATE TRIGGER {} BEFORE " + events + " ON {} FOR EACH STATEMENT "
                "EXECUTE FUNCTION {}({})"
            ).format(sql.Identifier(name), target, func, sql.Literal(migration_id))
        )
    return sql.SQL("; ").join(parts)


def remove(
    conn: psycopg.Connection[Any], tables: Iterable[TableId], *, schema: str = "cdcsync"
) -> None:
    """Lift the fence (idempotent)."""
    with conn.transaction():
        drops = [
            sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                sql.Identifier(name), sql.Identifier(table.schema, table.name)
            )
            for table in members(conn, tables, schema=schema)
            for name in _TRIGGERS
        ]
        if drops:
            conn.execute(sql.SQL("; ").join(drops))


def fenced(
    conn: psycopg.Connection[Any], tables: Iterable[TableId], *, schema: str = "cdcsync"
) -> dict[TableId, bool]:
    """Which tables carry the complete fence right now (a partitioned one: on every member);
    keyed by the names given."""
    out: dict[TableId, bool] = {}
    names = renamed(conn, schema)
    for table in tables:
        ok = True
        for member in _members(conn, [names.get(table, table)]):
            row = conn.execute(
                "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s AND c.relname = %s AND t.tgname = ANY(%s) "
                "AND t.tgenabled = 'O'",
                (member.schema, member.name, list(_TRIGGERS)),
            ).fetchone()
            ok = ok and bool(row and row[0] == len(_TRIGGERS))
        out[table] = ok
    return out


def check(
    conn: psycopg.Connection[Any], tables: Iterable[TableId], *, schema: str = "cdcsync"
) -> list[TableId]:
    """Tables that are not (completely) fenced; empty when the fence is whole."""
    return [table for table, ok in fenced(conn, tables, schema=schema).items() if not ok]
