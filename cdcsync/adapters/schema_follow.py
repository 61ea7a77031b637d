"""Columns added on the source, added on the target the way the source has them.

Debezium emits no DDL: a new column just appears in later events. With
``apply.add_new_columns`` the applier adds it on the target before applying those
events, from the source's own catalog: the exact type (``format_type``), NOT NULL,
the default expression, and — what makes existing rows equal — the value rows that
existed before the ``ADD COLUMN`` read for it (PostgreSQL keeps it as the column's
"missing value"). When the source rewrote those rows instead (a volatile default),
their values are in no event, so the applier halts naming table and column rather
than guess.

The type and default go into the DDL as the source server prints them (``format_type``
quotes what needs quoting, ``pg_get_expr`` prints valid SQL), the way pg_dump does;
the missing value goes in as a literal.

A table the plan renames on the target is known to the applier by the name it writes
to, and to the side the events come from by that side's own name. The two are paired
through the rename registry the snapshot recorded in the state schema on the target
(:func:`cdcsync.adapters.fence.renamed`): forward, the registry is on the database
written to; in reverse, on the one read from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from cdcsync.adapters import fence
from cdcsync.core.events import TableId

#: (table, missing columns) → statements that add them on the target, in order.
ColumnAdder = Callable[[psycopg.Connection[Any], TableId, Sequence[str]], list[sql.Composed]]


class ColumnNotAddable(Exception):
    """The source's column cannot be reproduced on the target; the message says why."""


@dataclass(frozen=True)
class SourceColumn:
    name: str
    type: str  # format_type(atttypid, atttypmod)
    not_null: bool
    default: str | None  # pg_get_expr of the default, as the source prints it
    missing: str | None  # the value rows older than the column read, as text
    has_missing: bool
    generated: bool


def parse_single_element(literal: str) -> str | None:
    """The element of a one-element array literal (``{5}``, ``{"a b"}``, ``{NULL}``)."""
    if not (literal.startswith("{") and literal.endswith("}")):
        raise ValueError(f"not an array literal: {literal!r}")
    inner = literal[1:-1]
    if inner == "NULL":
        return None
    if inner.startswith('"') and inner.endswith('"') and len(inner) >= 2:
        out: list[str] = []
        escaped = False
        for ch in inner[1:-1]:
            if escaped:
                out.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            else:
                out.append(ch)
        return "".join(out)
    return inner


def read_source_columns(
    source: psycopg.Connection[Any], table: TableId, names: Sequence[str]
) -> dict[str, SourceColumn]:
    rows = source.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, "
        "pg_get_expr(d.adbin, d.adrelid), a.attmissingval::text, a.atthasmissing, "
        "a.attgenerated <> '' FROM pg_attribute a "
        "LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
        "WHERE a.attrelid = to_regclass(%s) AND a.attname = ANY(%s) AND NOT a.attisdropped "
        "AND a.attnum > 0",
        (sql.Identifier(table.schema, table.name).as_string(source), list(names)),
    ).fetchall()
    source.rollback()
    out: dict[str, SourceColumn] = {}
    for name, typ, not_null, default, missing, has_missing, generated in rows:
        out[str(name)] = SourceColumn(
            str(name),
            str(typ),
            bool(not_null),
            None if default is None else str(default),
            None if missing is None else parse_single_element(str(missing)),
            bool(has_missing),
            bool(generated),
        )
    return out


def source_name(
    source: psycopg.Connection[Any],
    target: psycopg.Connection[Any],
    table: TableId,
    schema: str = "cdcsync",
) -> TableId:
    """The name ``source`` has for the table ``target`` names ``table``: they differ when
    the plan renamed it (recorded in ``schema``'s rename registry on either side)."""
    for source_side, target_side in fence.renamed(target, schema).items():
        if target_side == table:
            return source_side  # forward: written under its new name
    return fence.renamed(source, schema).get(table, table)  # reverse: read under it


def column_adder(source: psycopg.Connection[Any], *, state_schema: str = "cdcsync") -> ColumnAdder:
    """A :data:`ColumnAdder` that reads definitions from ``source`` (``state_schema``:
    where the rename registry is, see the module's docstring)."""

    def add(
        target: psycopg.Connection[Any], table: TableId, names: Sequence[str]
    ) -> list[sql.Composed]:
        there = source_name(source, target, table, state_schema)
        found = read_source_columns(source, there, names)
        absent = [n for n in names if n not in found]
        if absent:
            named = "" if there == table else f" ({there} there)"
            raise ColumnNotAddable(
                f"column(s) {', '.join(absent)} of {table} are in the events but not on the "
                f"source{named} (dropped again since?): add them on the target by hand"
            )
        row = target.execute(
            sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(
                sql.Identifier(table.schema, table.name)
            )
        ).fetchone()
        populated = bool(row and row[0])
        return [s for n in names for s in statements(table, found[n], populated)]

    return add


def statements(table: TableId, col: SourceColumn, populated: bool) -> list[sql.Composed]:
    """ALTER TABLE statements that give ``table`` the source's column ``col``."""
    target = sql.Identifier(table.schema, table.name)
    ident = sql.Identifier(col.name)
    if col.generated:
        raise ColumnNotAddable(
            f"{table}.{col.name} is a generated column: add it on the target with its "
            "expression (events never carry generated values)"
        )
    if populated and col.default is not None and not col.has_missing:
        raise ColumnNotAddable(
            f"{table}.{col.name} was added on the source with a default ({col.default}) that "
            "rewrote the existing rows: their values are in no event. Add the column on the "
            "target with the same values (or re-snapshot the table), then the applier resumes"
        )
    add = sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
        target, ident, sql.SQL(col.type)
    )
    if col.has_missing and col.missing is not None:
        # Rows older than the column read this value on the source: give them the same.
        add = sql.SQL("{} DEFAULT {}::{}").format(add, sql.Literal(col.missing), sql.SQL(col.type))
    out = [add]
    if col.default is not None:
        out.append(
            sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT {}").format(
                target, ident, sql.SQL(col.default)
            )
        )
    elif col.has_missing:
        out.append(sql.SQL("ALTER TABLE {} ALTER COLUMN {} DROP DEFAULT").format(target, ident))
    if col.not_null:
        out.append(sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL").format(target, ident))
    return out
