"""Apply a batch of events to a PostgreSQL database, set-based, inside the caller's transaction.

Per table: TRUNCATE when the batch truncated it, then one ``DELETE … USING`` for the
deleted keys, then per column set one COPY into a temporary table and one
``INSERT … ON CONFLICT … DO UPDATE`` (or ``UPDATE … FROM`` for partial images).
Keyless tables get one statement per change, matching exactly one row by its full
before image. The session runs with ``session_replication_role = replica``: foreign
keys (applied out of order across tables) and cdcsync's write fences (ordinary
triggers) do not fire for the applier.

When a set-based step fails, the batch is replayed event by event under savepoints to
name the event at fault; :class:`ApplyError` carries its Kafka position.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import psycopg
from psycopg import sql

from cdcsync.adapters.schema_follow import ColumnAdder, ColumnNotAddable
from cdcsync.core.compaction import Delete, KeylessOp, TablePlan, Upsert, plan_batch
from cdcsync.core.events import (
    UNAVAILABLE,
    Event,
    Op,
    Position,
    RowChange,
    TableId,
    Truncate,
    Value,
)
from cdcsync.errors import HaltedError

#: Reads current source rows by key: (table, key columns, keys) → {key values: row text}.
SourceFetch = Callable[
    [TableId, tuple[str, ...], list[tuple[Value, ...]]],
    dict[tuple[Value, ...], dict[str, Value]],
]

_stage_ids = itertools.count(1)


class ApplyError(HaltedError):
    """An event could not be applied; ``position`` says which (when known)."""

    def __init__(self, message: str, position: Position | None = None) -> None:
        where = f" at {position.topic}[{position.partition}]@{position.offset}" if position else ""
        super().__init__(f"{message}{where}")
        self.position = position


@dataclass(frozen=True)
class TableMeta:
    """What the applier needs to know about a target table."""

    table: TableId
    columns: dict[str, str]  # writable column → type as format_type prints it
    key: tuple[str, ...]
    no_equality: frozenset[str]  # columns whose type has no '=' operator


@dataclass
class ApplyStats:
    applied: dict[tuple[str, str], int] = field(default_factory=dict)
    rows_written: int = 0
    seconds: float = 0.0
    refetched: int = 0

    def count(self, table: TableId, op: str, n: int = 1) -> None:
        k = (str(table), op)
        self.applied[k] = self.applied.get(k, 0) + n


def read_meta(conn: psycopg.Connection[Any], table: TableId) -> TableMeta | None:
    """Columns (generated ones excluded), primary key and equality support."""
    rows = conn.execute(
        """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod),
               a.attnum = ANY (coalesce(i.indkey::int2[], '{}')),
               EXISTS (SELECT 1 FROM pg_operator o WHERE o.oprname = '='
                       AND o.oprleft = a.atttypid AND o.oprright = a.atttypid)
               OR EXISTS (SELECT 1 FROM pg_type t JOIN pg_operator o ON o.oprname = '='
                       AND o.oprleft = t.typbasetype AND o.oprright = t.typbasetype
                       WHERE t.oid = a.atttypid)
               OR EXISTS (SELECT 1 FROM pg_type t WHERE t.oid = a.atttypid
                       AND t.typtype IN ('e', 'r'))
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
        WHERE n.nspname = %s AND c.relname = %s AND a.attgenerated = ''
        ORDER BY a.attnum
        """,
        (table.schema, table.name),
    ).fetchall()
    if not rows:
        return None
    key_order = conn.execute(
        """
        SELECT a.attname FROM pg_index i
        JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
        WHERE n.nspname = %s AND c.relname = %s AND i.indisprimary ORDER BY k.ord
        """,
        (table.schema, table.name),
    ).fetchall()
    return TableMeta(
        table=table,
        columns={str(r[0]): str(r[1]) for r in rows},
        key=tuple(str(r[0]) for r in key_order),
        no_equality=frozenset(str(r[0]) for r in rows if not r[3]),
    )


#: A value's SQL on the target from the reference to its staged column.
ValueSql = Callable[[sql.Composable], sql.Composable]


class PgApplier:
    """Applies batches to one database; reads its catalog once per table."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        *,
        tables: set[TableId] | None = None,
        unknown_table: str = "halt",
        fetch_source: SourceFetch | None = None,
        add_columns: ColumnAdder | None = None,
        transforms: Mapping[TableId, Mapping[str, ValueSql]] | None = None,
        stage_types: Mapping[TableId, Mapping[str, str]] | None = None,
    ) -> None:
        self.conn = conn
        self.allowed = tables
        self.unknown_table = unknown_table
        self.fetch_source = fetch_source
        self.add_columns = add_columns  # None: a column the target lacks halts the applier
        # The plan's value transforms: SQL over the staged value, the same as the snapshot's.
        self.transforms = transforms or {}
        # Columns whose values arrive in another type than the table's (the reverse of a
        # plan's cast): staged in that type, then cast to the column's — PostgreSQL's
        # cast, so numeric 12.50 goes back into an integer column as 13, not as an error.
        self.stage_types = stage_types or {}
        self._meta: dict[TableId, TableMeta | None] = {}

    def prepare_session(self) -> None:
        """Bypass FK triggers and write fences for this session (needs superuser)."""
        self.conn.execute("SET session_replication_role = replica")

    def meta(self, table: TableId) -> TableMeta | None:
        if table not in self._meta:
            self._meta[table] = read_meta(self.conn, table)
        return self._meta[table]

    def forget(self) -> None:
        """Drop cached catalog facts (after DDL or a rolled-back transaction)."""
        self._meta.clear()

    # ------------------------------------------------------------------ entry
    def apply(self, events: Sequence[Event]) -> ApplyStats:
        """Apply ``events`` in the open transaction; raise :class:`ApplyError` on failure."""
        started = time.perf_counter()
        stats = ApplyStats()
        events = [e for e in events if self._wanted(e)]
        plans = plan_batch(events)
        try:
            with self.conn.transaction():
                for plan in plans.values():
                    self._apply_plan(plan, stats)
        except psycopg.Error:
            self.forget()
            self._pinpoint(events)
            # Each event applies on its own where the set-based form failed (for example
            # two rows swapping a unique value): apply them one by one for real.
            stats = ApplyStats()
            with self.conn.transaction():
                for event in events:
                    self._apply_one(event, stats)
        stats.seconds = time.perf_counter() - started
        return stats

    def _wanted(self, event: Event) -> bool:
        if not isinstance(event, RowChange | Truncate):
            return False
        if self.allowed is not None and event.table not in self.allowed:
            if self.unknown_table == "ignore":
                return False
            raise ApplyError(
                f"event for table {event.table}, which is not migrated", event.position
            )
        if self.meta(event.table) is None:
            if self.unknown_table == "ignore":
                return False
            raise ApplyError(f"table {event.table} does not exist on the target", event.position)
        return True

    # ---------------------------------------------------------- set-based path
    def _apply_plan(self, plan: TablePlan, stats: ApplyStats) -> None:
        meta = self.meta(plan.table)
        assert meta is not None
        target = sql.Identifier(plan.table.schema, plan.table.name)
        if plan.truncate:
            self.conn.execute(sql.SQL("TRUNCATE {}").format(target))
            stats.count(plan.table, "truncate")
        if plan.keyed:
            if not meta.key:
                raise ApplyError(f"table {plan.table} has no primary key on the target")
            deletes = plan.deletes()
            if deletes:
                self._delete_keys(meta, deletes)
                stats.count(plan.table, "delete", len(deletes))
            upserts = self._resolve_refetch(meta, plan.upserts(), stats)
            by_columns: dict[tuple[tuple[str, ...], bool], list[Upsert]] = {}
            for up in upserts:
                by_columns.setdefault((tuple(up.row), up.partial), []).append(up)
            for (columns, partial), group in by_columns.items():
                meta = self._check_columns(meta, columns, group[0].position)
                self._upsert(meta, columns, partial, group)
                stats.count(plan.table, "upsert", len(group))
                stats.rows_written += len(group)
        for op in plan.keyless:
            self._keyless(meta, op)
            stats.count(plan.table, op.op.name.lower())
            stats.rows_written += 1

    def _check_columns(self, meta: TableMeta, columns: Sequence[str], at: Position) -> TableMeta:
        """``meta`` if it has every column; else add them (when allowed) or halt."""
        missing = [c for c in columns if c not in meta.columns]
        if not missing:
            return meta
        if self.add_columns is None:
            raise ApplyError(
                f"column(s) {', '.join(missing)} of {meta.table} are not on the target "
                "(added on the source? set apply.add_new_columns or add them)",
                at,
            )
        try:
            for statement in self.add_columns(self.conn, meta.table, missing):
                self.conn.execute(statement)
        except ColumnNotAddable as exc:
            raise ApplyError(str(exc), at) from None
        self._meta.pop(meta.table, None)
        fresh = self.meta(meta.table)
        assert fresh is not None
        return fresh

    def _stage(
        self, meta: TableMeta, columns: Sequence[str], rows: list[tuple[Value, ...]]
    ) -> sql.Identifier:
        """COPY rows into a temporary table typed like the target's columns."""
        stage = sql.Identifier(f"cdcsync_stage_{next(_stage_ids)}")
        staged = self.stage_types.get(meta.table, {})
        self.conn.execute(
            sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA").format(
                stage,
                sql.SQL(", ").join(
                    sql.SQL("NULL::{} AS {}").format(sql.SQL(staged[c]), sql.Identifier(c))
                    if c in staged
                    else sql.Identifier(c)
                    for c in columns
                ),
                sql.Identifier(meta.table.schema, meta.table.name),
            )
        )
        with self.conn.cursor().copy(
            sql.SQL("COPY {} ({}) FROM STDIN").format(
                stage, sql.SQL(", ").join(map(sql.Identifier, columns))
            )
        ) as copy:
            for row in rows:
                copy.write_row(row)
        return stage

    def _delete_keys(self, meta: TableMeta, deletes: list[Delete]) -> None:
        rows = [tuple(d.key.get(k) for k in meta.key) for d in deletes]
        stage = self._stage(meta, meta.key, rows)
        self.conn.execute(
            sql.SQL("DELETE FROM {} t USING {} s WHERE {}").format(
                sql.Identifier(meta.table.schema, meta.table.name),
                stage,
                _match(meta.key),
            )
        )

    def _upsert(
        self, meta: TableMeta, columns: tuple[str, ...], partial: bool, group: list[Upsert]
    ) -> None:
        stage = self._stage(meta, columns, _project([up.row for up in group], columns))
        target = sql.Identifier(meta.table.schema, meta.table.name)
        cols = sql.SQL(", ").join(map(sql.Identifier, columns))
        planned = self.transforms.get(meta.table, {})
        staged = self.stage_types.get(meta.table, {})

        def value(c: str) -> sql.Composable:
            ref: sql.Composable = sql.SQL("s.{}").format(sql.Identifier(c))
            if c in staged:
                ref = sql.SQL("({})::{}").format(ref, sql.SQL(meta.columns[c]))
            return planned[c](ref) if c in planned else ref

        non_key = [c for c in columns if c not in meta.key]
        if partial:
            # Unchanged TOASTed columns are left out: the row must already be there.
            if non_key:
                done = self.conn.execute(
                    sql.SQL("UPDATE {} t SET {} FROM {} s WHERE {}").format(
                        target,
                        sql.SQL(", ").join(
                            sql.SQL("{} = {}").format(sql.Identifier(c), value(c)) for c in non_key
                        ),
                        stage,
                        _match(meta.key),
                    )
                )
                if done.rowcount != len(group):
                    raise ApplyError(
                        f"{meta.table}: {len(group) - done.rowcount} update(s) of unchanged "
                        "TOASTed rows found no row on the target",
                        group[0].position,
                    )
            return
        conflict = sql.SQL(", ").join(map(sql.Identifier, meta.key))
        if non_key:
            action: sql.Composable = sql.SQL("DO UPDATE SET {}").format(
                sql.SQL(", ").join(
                    sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(c), sql.Identifier(c))
                    for c in non_key
                )
            )
        else:
            action = sql.SQL("DO NOTHING")
        self.conn.execute(
            sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} s ON CONFLICT ({}) {}").format(
                target, cols, sql.SQL(", ").join(value(c) for c in columns), stage, conflict, action
            )
        )

    def _resolve_refetch(
        self, meta: TableMeta, upserts: list[Upsert], stats: ApplyStats
    ) -> list[Upsert]:
        """Replace images the event could not carry exactly with the source's current row."""
        need = [u for u in upserts if u.refetch]
        if not need:
            return upserts
        if self.fetch_source is None:
            up = need[0]
            raise ApplyError(
                f"{meta.table} key {_key_text(meta, up.row)}: a value the event cannot carry "
                "exactly needs a source connection to read it",
                up.position,
            )
        keys = [tuple(u.row.get(k) for k in meta.key) for u in need]
        current = self.fetch_source(meta.table, meta.key, keys)
        stats.refetched += len(need)
        out = [u for u in upserts if not u.refetch]
        for up, key in zip(need, keys, strict=True):
            row = current.get(key)
            if row is None:
                continue  # gone on the source: its delete follows in the stream
            out.append(Upsert(row, False, False, up.position))
        return out

    def _keyless(self, meta: TableMeta, op: KeylessOp) -> None:
        target = sql.Identifier(meta.table.schema, meta.table.name)
        if op.op in (Op.INSERT, Op.READ):
            assert op.after is not None
            self._insert_row(meta, dict(op.after), op.position)
            return
        assert op.before is not None
        if any(v is UNAVAILABLE for v in op.before.values()):
            raise ApplyError(
                f"{meta.table}: before image incomplete (REPLICA IDENTITY FULL?)", op.position
            )
        meta = self._check_columns(meta, list(op.before), op.position)
        where, params = self._match_image(meta, op.before)
        one = sql.SQL("ctid = (SELECT ctid FROM {} WHERE {} LIMIT 1)").format(target, where)
        if op.op is Op.DELETE:
            done = self.conn.execute(sql.SQL("DELETE FROM {} WHERE {}").format(target, one), params)
        else:
            assert op.after is not None
            after = {k: v for k, v in op.after.items() if v is not UNAVAILABLE}
            meta = self._check_columns(meta, list(after), op.position)
            sets = sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in after)
            done = self.conn.execute(
                sql.SQL("UPDATE {} SET {} WHERE {}").format(target, sets, one),
                [*after.values(), *params],
            )
        if done.rowcount != 1:
            raise ApplyError(
                f"{meta.table}: no row matches the before image of a keyless "
                f"{op.op.name.lower()} (the target diverged from the source)",
                op.position,
            )

    def _insert_row(self, meta: TableMeta, row: dict[str, Value], at: Position) -> None:
        row = {k: v for k, v in row.items() if v is not UNAVAILABLE}
        meta = self._check_columns(meta, list(row), at)
        self.conn.execute(
            sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                sql.Identifier(meta.table.schema, meta.table.name),
                sql.SQL(", ").join(map(sql.Identifier, row)),
                sql.SQL(", ").join(sql.Placeholder() * len(row)),
            ),
            list(row.values()),
        )

    def _match_image(
        self, meta: TableMeta, image: dict[str, Value] | Any
    ) -> tuple[sql.Composed, list[Value]]:
        parts: list[sql.Composable] = []
        params: list[Value] = []
        for column, value in image.items():
            if column not in meta.columns:
                continue
            ident = sql.Identifier(column)
            if column in meta.no_equality:
                # json, xml, point, … have no '=': compare canonical text forms.
                parts.append(
                    sql.SQL("{}::text IS NOT DISTINCT FROM CAST(%s AS {})::text").format(
                        ident, sql.SQL(meta.columns[column])
                    )
                )
            else:
                parts.append(sql.SQL("{} IS NOT DISTINCT FROM %s").format(ident))
            params.append(value)
        return sql.SQL(" AND ").join(parts), params

    # ---------------------------------------------------------- event by event
    def _pinpoint(self, events: Sequence[Event]) -> None:
        """Find the first event that fails on its own and raise with its position.

        Runs inside a savepoint that is always rolled back: nothing here stays applied.
        """
        failure: ApplyError | None = None
        with self.conn.transaction():
            for event in events:
                try:
                    with self.conn.transaction():
                        self._apply_one(event, ApplyStats())
                except psycopg.Error as exc:
                    failure = ApplyError(_describe(event, exc), event.position)
                    failure.__cause__ = exc
                    break
                except ApplyError as exc:
                    failure = exc
                    break
            raise psycopg.Rollback()
        if failure is not None:
            self.forget()
            raise failure

    def _apply_one(self, event: Event, stats: ApplyStats) -> None:
        if isinstance(event, Truncate):
            self._apply_plan(TablePlan(event.table, truncate=True), stats)
            return
        assert isinstance(event, RowChange)
        plans = plan_batch([event])
        for plan in plans.values():
            self._apply_plan(plan, stats)


def _project(rows: list[Mapping[str, Value]], columns: Sequence[str]) -> list[tuple[Value, ...]]:
    """``columns`` of each row, as tuples (itemgetter: no generator per row)."""
    if len(columns) == 1:
        only = columns[0]
        return [(row[only],) for row in rows]
    get = itemgetter(*columns)
    return [get(row) for row in rows]


def _match(key: Sequence[str]) -> sql.Composed:
    return sql.SQL(" AND ").join(
        sql.SQL("t.{} = s.{}").format(sql.Identifier(k), sql.Identifier(k)) for k in key
    )


def _key_text(meta: TableMeta, row: Mapping[str, Value]) -> str:
    return ", ".join(f"{k}={row.get(k)!r}" for k in meta.key)


def _describe(event: Event, exc: psycopg.Error) -> str:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(event, RowChange):
        key = ", ".join(f"{k}={v!r}" for k, v in event.key.items()) or "(no key)"
        return f"{event.table} key {key}: {event.op.name.lower()} failed: {detail}"
    if isinstance(event, Truncate):
        return f"{event.table}: truncate failed: {detail}"
    return f"event failed: {detail}"


def fetch_rows_by_key(source: psycopg.Connection[Any]) -> SourceFetch:
    """A :data:`SourceFetch` reading current rows (as text) from the source.

    A lost source connection is no fault of the event being applied: it halts the
    stream (retried from the stored offsets), never an :class:`ApplyError`, which
    would dead-letter a valid event under ``apply.on_error=dead-letter``.
    """

    def fetch(
        table: TableId, key: tuple[str, ...], keys: list[tuple[Value, ...]]
    ) -> dict[tuple[Value, ...], dict[str, Value]]:
        try:
            return read(table, key, keys)
        except psycopg.OperationalError as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise HaltedError(
                f"source connection lost while reading {table} by key: {detail}"
            ) from exc

    def read(
        table: TableId, key: tuple[str, ...], keys: list[tuple[Value, ...]]
    ) -> dict[tuple[Value, ...], dict[str, Value]]:
        meta = read_meta(source, table)
        if meta is None:
            raise ApplyError(f"table {table} not found on the source")
        columns = list(meta.columns)
        query = sql.SQL("SELECT {} FROM {} WHERE {}").format(
            sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in columns),
            sql.Identifier(table.schema, table.name),
            sql.SQL(" AND ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in key),
        )
        out: dict[tuple[Value, ...], dict[str, Value]] = {}
        with source.transaction():
            for values in keys:
                row = source.execute(query, list(values)).fetchone()
                if row is not None:
                    out[values] = dict(zip(columns, row, strict=True))
        return out

    return fetch
