"""The migration plan: which tables move, and how their columns land on the target.

An operator reviews and commits the plan file (YAML), so every choice is visible and
versioned. Per table: ``include``, a row ``filter`` (SQL over the source's columns),
and per column a ``rename``, a ``cast`` to a target type, ``drop``, and value
``transform``s; ``add`` lists new required columns with their default; ``rename``
lands the table on the target under another name (``name``) and/or schema
(``schema.name``).

A renamed table is copied under its source name, then renamed by :meth:`TablePlan.ddl`
with the column DDL, after post-data (its indexes, constraints, triggers and owned
sequences follow it: a ``SET SCHEMA`` moves owned sequences too, under their own
names). The same statements record the rename in the target's state schema
(``table_rename``), so what only knows the migrated tables by their source names —
the write fence — finds the table on the target. Events are mapped by
:meth:`Plan.map_event` onto the target's table, and :meth:`Plan.reverse_event` maps
the target table's events back onto the source's.

Every mapping is carried out by PostgreSQL, the same way in each path, so the snapshot,
the streaming apply and verification cannot disagree: a cast is the target type's input
function applied to the source value's text (``value::text::type``, what COPY does), a
transform is a built-in SQL function over the column, a filter is the publication's row
filter on the source (so updates moving a row in or out of it arrive as inserts and
deletes) and the snapshot's WHERE clause. The plan's text is operator input, like a
configuration file: filters, defaults and types are SQL written by whoever commits the
plan, checked by PostgreSQL when the snapshot starts, never built from replicated data.

The one exception is a ``hook`` transform, ``{hook: "package.module:function"}``, for
values SQL built-ins cannot express: a Python function, imported from ``sys.path`` when
the plan is read, called with each value's text form (``None`` for NULL) and returning
the text to store (or ``None``; anything else is stored as its ``str``). PostgreSQL
cannot run it, so each path runs it in Python: the snapshot rewrites the hooked columns
by primary key after the copy, in the transaction of the plan's DDL; the streaming apply
runs it on each row change's images in :meth:`TablePlan.map_event` (an unchanged TOASTed
value is left as not sent); verification leaves hooked columns out and says so, and a
repair refuses them. A hook is its column's only step and never on a key column or a
table without a primary key (rows are found by key). It is one-way: after a cutover the
target's values go back to the source as they are. The fingerprint covers the hook's
name, not its code: an operator who changes the function re-snapshots.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from psycopg import sql

from cdcsync.core.events import UNAVAILABLE, Column, Event, RowChange, TableId, Truncate
from cdcsync.errors import ConfigError

#: Built-in transforms without an argument, as SQL over the column.
SIMPLE_TRANSFORMS = {"trim": "btrim", "lower": "lower", "upper": "upper"}
#: The table, in the state schema on the target, that records each table renamed there.
RENAME_REGISTRY = "table_rename"
_TYPE = re.compile(r"^[A-Za-z_][A-Za-z0-9_ .]*(\(\s*\d+(\s*,\s*\d+)?\s*\))?(\[\])*$")
_SQL_TEXT = re.compile(r"^[^;]*$")


@dataclass(frozen=True)
class Transform:
    """One step of a column's transform chain: ``trim``, ``lower``, ``upper``,
    ``map`` (value → value, others unchanged), ``default_if_null`` or ``hook`` (a
    Python function, ``hook`` naming it as ``module:function``)."""

    kind: str
    mapping: tuple[tuple[str, str | None], ...] = ()
    default: str | None = None
    hook: str | None = None
    function: Callable[[Any], Any] | None = field(default=None, compare=False, repr=False)

    def apply(self, value: Any) -> Any:
        """A hook's result for one value: text or None; a value not sent stays so."""
        assert self.function is not None
        if value is UNAVAILABLE:
            return value
        out = self.function(value)
        return out if out is None or isinstance(out, str) else str(out)

    def sql(self, inner: sql.Composable) -> sql.Composable:
        if self.kind == "hook":
            raise ConfigError(
                f"the plan's hook {self.hook} runs in Python: it has no SQL form "
                "(hooked columns cannot be re-copied or compared in the database)"
            )
        if self.kind in SIMPLE_TRANSFORMS:
            return sql.SQL("{}({})").format(sql.SQL(SIMPLE_TRANSFORMS[self.kind]), inner)
        if self.kind == "map":
            whens = sql.SQL(" ").join(
                sql.SQL("WHEN {} THEN {}").format(sql.Literal(k), sql.Literal(v))
                for k, v in self.mapping
            )
            return sql.SQL("(CASE ({})::text {} ELSE ({})::text END)").format(inner, whens, inner)
        return sql.SQL("coalesce({}, {})").format(inner, sql.Literal(self.default))


@dataclass(frozen=True)
class ColumnPlan:
    """What becomes of one source column."""

    name: str
    rename: str | None = None
    cast: str | None = None
    drop: bool = False
    transforms: tuple[Transform, ...] = ()

    @property
    def target(self) -> str | None:
        return None if self.drop else (self.rename or self.name)

    @property
    def hook(self) -> Transform | None:
        """The column's Python hook, when its transform is one (then its only step)."""
        return self.transforms[0] if self.transforms and self.transforms[0].kind == "hook" else None


@dataclass(frozen=True)
class NewColumn:
    """A column only the target has: required, filled by its default."""

    name: str
    type: str
    default: str


@dataclass(frozen=True)
class TablePlan:
    table: TableId
    include: bool = True
    filter: str | None = None
    columns: Mapping[str, ColumnPlan] = field(default_factory=dict)
    add: tuple[NewColumn, ...] = ()
    rename: TableId | None = None  # the table's name on the target (None: the same)

    @property
    def target_table(self) -> TableId:
        """The table's name on the target."""
        return self.rename or self.table

    @property
    def maps_columns(self) -> bool:
        """Whether events and rows need mapping: columns changed or the table renamed."""
        return bool(self.columns or self.add or self.rename)

    def target_of(self, column: str) -> str | None:
        """The target column ``column`` lands in (None: dropped)."""
        found = self.columns.get(column)
        return column if found is None else found.target

    def source_of(self, column: str) -> str | None:
        """The source column a target column comes from (None: added on the target)."""
        for c in self.columns.values():
            if c.target == column:
                return c.name
        if column in self.columns or any(a.name == column for a in self.add):
            return None
        return column

    def transformed(self) -> dict[str, tuple[Transform, ...]]:
        """Target column → its SQL transform chain, for the columns that have one (hooked
        columns are not: their values arrive already hooked)."""
        return {
            c.target: c.transforms
            for c in self.columns.values()
            if c.transforms and c.target and c.hook is None
        }

    def hooks(self) -> dict[str, Transform]:
        """Source column → its Python hook, for the hooked columns."""
        return {c.name: h for c in self.columns.values() if (h := c.hook) is not None}

    def value_sql(self, column: str, ref: sql.Composable, *, cast: bool = True) -> sql.Composable:
        """A source column's value as it lands on the target (``ref`` names it)."""
        plan = self.columns.get(column)
        out = ref
        if plan is not None:
            for step in plan.transforms:
                out = step.sql(out)
            if plan.cast and cast:
                out = sql.SQL("({})::text::{}").format(out, sql.SQL(plan.cast))
        return out

    def ddl(self, state_schema: str = "cdcsync") -> list[sql.Composed]:
        """Statements that turn the source-shaped table on the target into the planned one.

        In an order that is valid from the copied shape: values first (transforms,
        casts), then drops, column renames and the new columns, then the table's own
        rename (``RENAME TO``, then ``SET SCHEMA`` into a schema created if missing) and
        its record in ``state_schema``'s rename registry.
        """
        t = sql.Identifier(self.table.schema, self.table.name)
        out: list[sql.Composed] = []
        sets = [
            sql.SQL("{} = {}").format(
                sql.Identifier(c.name),
                self.value_sql(c.name, sql.Identifier(c.name), cast=False),
            )
            for c in self.columns.values()
            if c.transforms and not c.drop and c.hook is None
        ]
        if sets:
            out.append(sql.SQL("UPDATE {} SET {}").format(t, sql.SQL(", ").join(sets)))
        for c in self.columns.values():
            if c.cast and not c.drop:
                out.append(
                    sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE {} USING ({})::text::{}").format(
                        t,
                        sql.Identifier(c.name),
                        sql.SQL(c.cast),
                        sql.Identifier(c.name),
                        sql.SQL(c.cast),
                    )
                )
        for c in self.columns.values():
            if c.drop:
                out.append(
                    sql.SQL("ALTER TABLE {} DROP COLUMN {}").format(t, sql.Identifier(c.name))
                )
        for c in self.columns.values():
            if c.rename and not c.drop:
                out.append(
                    sql.SQL("ALTER TABLE {} RENAME COLUMN {} TO {}").format(
                        t, sql.Identifier(c.name), sql.Identifier(c.rename)
                    )
                )
        for a in self.add:
            out.append(
                sql.SQL("ALTER TABLE {} ADD COLUMN {} {} NOT NULL DEFAULT {}").format(
                    t, sql.Identifier(a.name), sql.SQL(a.type), sql.SQL(a.default)
                )
            )
        if self.rename is not None:
            out.extend(self._rename_ddl(state_schema))
        return out

    def hook_sql(self, key: tuple[str, ...]) -> tuple[sql.Composed, sql.Composed]:
        """The snapshot's rewrite of the hooked columns, on the table as copied (the
        source's names), rows found by ``key``: a query of the key and the hooked columns
        as text, and an UPDATE taking the new values then the key (text parameters, each
        parsed by its column's input function)."""
        t = sql.Identifier(self.table.schema, self.table.name)
        hooked = list(self.hooks())
        select = sql.SQL("SELECT {} FROM {}").format(
            sql.SQL(", ").join(
                sql.SQL("{}::text").format(sql.Identifier(c)) for c in key + tuple(hooked)
            ),
            t,
        )
        update = sql.SQL("UPDATE {} SET {} WHERE {}").format(
            t,
            sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in hooked),
            sql.SQL(" AND ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in key),
        )
        return select, update

    def hook_row(self, key: tuple[str, ...], row: tuple[Any, ...]) -> tuple[Any, ...]:
        """One row read by :meth:`hook_sql`'s query as its UPDATE's parameters."""
        values = row[len(key) :]
        hooked = [h.apply(v) for h, v in zip(self.hooks().values(), values, strict=True)]
        return (*hooked, *row[: len(key)])

    def _rename_ddl(self, state_schema: str) -> list[sql.Composed]:
        assert self.rename is not None
        src, dst = self.table, self.rename
        out: list[sql.Composed] = []
        if dst.name != src.name:
            out.append(
                sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                    sql.Identifier(src.schema, src.name), sql.Identifier(dst.name)
                )
            )
        if dst.schema != src.schema:
            out.append(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(dst.schema)))
            out.append(
                sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
                    sql.Identifier(src.schema, dst.name), sql.Identifier(dst.schema)
                )
            )
        registry = sql.Identifier(state_schema, RENAME_REGISTRY)
        out.append(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(state_schema)))
        out.append(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (source_schema text NOT NULL, "
                "source_name text NOT NULL, target_schema text NOT NULL, "
                "target_name text NOT NULL, PRIMARY KEY (source_schema, source_name))"
            ).format(registry)
        )
        out.append(
            sql.SQL(
                "INSERT INTO {} VALUES ({}, {}, {}, {}) ON CONFLICT (source_schema, source_name) "
                "DO UPDATE SET target_schema = excluded.target_schema, "
                "target_name = excluded.target_name"
            ).format(
                registry,
                sql.Literal(src.schema),
                sql.Literal(src.name),
                sql.Literal(dst.schema),
                sql.Literal(dst.name),
            )
        )
        return out

    def map_event(self, event: RowChange) -> RowChange:
        """A source row change in the target's table and column names (values as the
        source sent them, hooked columns' through their hook)."""
        if not self.columns:
            if self.rename is None:
                return event
            return dataclasses.replace(event, table=self.rename)
        return dataclasses.replace(
            event,
            table=self.target_table,
            key=self._row(event.key),
            before=None if event.before is None else self._row(event.before),
            after=None if event.after is None else self._row(event.after),
            columns=tuple(
                dataclasses.replace(c, name=target)
                for c in event.columns
                if (target := self.target_of(c.name)) is not None
            ),
            inexact=frozenset(t for n in event.inexact if (t := self.target_of(n)) is not None),
        )

    def _row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for name, value in row.items():
            target = self.target_of(name)
            if target is not None:
                col = self.columns.get(name)
                hook = None if col is None else col.hook
                out[target] = value if hook is None else hook.apply(value)
        return out

    def reverse_event(self, event: RowChange) -> RowChange:
        """A target row change in the source's column names: renames undone, added
        columns left out (dropped columns stay as the source has them). Transforms and
        hooks are one-way: the value written back is the transformed one."""
        if not self.maps_columns:
            return event

        def row(r: Mapping[str, Any]) -> dict[str, Any]:
            return {s: v for n, v in r.items() if (s := self.source_of(n)) is not None}

        cols: list[Column] = [
            dataclasses.replace(c, name=s) for c in event.columns if (s := self.source_of(c.name))
        ]
        return dataclasses.replace(
            event,
            table=self.table,
            key=row(event.key),
            before=None if event.before is None else row(event.before),
            after=None if event.after is None else row(event.after),
            columns=tuple(cols),
            inexact=frozenset(s for n in event.inexact if (s := self.source_of(n)) is not None),
        )


@dataclass(frozen=True)
class Plan:
    """The whole plan; an empty plan migrates every table as it is."""

    tables: Mapping[TableId, TablePlan] = field(default_factory=dict)
    copy_order: tuple[TableId, ...] = ()
    parallelism: int | None = None
    verify_level: str | None = None
    cutover: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""  # the canonical text the fingerprint is computed from

    def table(self, table: TableId) -> TablePlan:
        return self.tables.get(table) or TablePlan(table)

    def target_table(self, table: TableId) -> TableId:
        """Where the source's ``table`` lands on the target."""
        found = self.tables.get(table)
        return table if found is None else found.target_table

    def on_target(self, tables: list[TableId]) -> list[TableId]:
        """``tables`` (the source's names) as the target names them."""
        return [self.target_table(t) for t in tables]

    def source_table(self, table: TableId) -> TableId:
        """The source table a target table comes from (itself unless renamed onto)."""
        return self._by_target.get(table, table)

    @property
    def renames(self) -> dict[TableId, TableId]:
        """Source name → target name, for the included tables the plan renames."""
        return {t: p.rename for t, p in self.tables.items() if p.include and p.rename}

    @property
    def _by_target(self) -> dict[TableId, TableId]:
        return {v: k for k, v in self.renames.items()}

    def sequence_names(
        self, owners: Mapping[TableId, TableId], *, from_target: bool = False
    ) -> dict[TableId, TableId]:
        """Sequence → its name on the other side, for the sequences whose owning table the
        plan moves into another schema (``SET SCHEMA`` moves owned sequences along, under
        their own names; a rename within a schema leaves them where they are).

        ``owners`` maps each sequence to the table owning it, both as the side read
        names them: the source's (the default) or the target's (``from_target``).
        """
        out: dict[TableId, TableId] = {}
        for seq, owner in owners.items():
            source = self.source_table(owner) if from_target else owner
            target = self.target_table(source)
            there = source if from_target else target
            here = target if from_target else source
            if there.schema != here.schema and seq.schema == here.schema:
                out[seq] = TableId(there.schema, seq.name)
        return out

    def included(self, tables: list[TableId]) -> list[TableId]:
        return [t for t in tables if self.table(t).include]

    def filters(self) -> dict[TableId, str]:
        return {t: p.filter for t, p in self.tables.items() if p.include and p.filter}

    @property
    def maps_columns(self) -> bool:
        return any(p.maps_columns for p in self.tables.values() if p.include)

    def fingerprint(self) -> str:
        """Changes with anything that changes what lands on the target, and only that."""
        return hashlib.sha256(self.source.encode()).hexdigest()[:16]

    def map_event(self, event: Event) -> Event:
        """A source event in the target's names (table and columns)."""
        if isinstance(event, RowChange) and event.table in self.tables:
            return self.tables[event.table].map_event(event)
        if isinstance(event, Truncate) and event.table in self.tables:
            return dataclasses.replace(event, table=self.tables[event.table].target_table)
        return event

    def reverse_event(self, event: Event) -> Event:
        """A target event in the source's names: a renamed table's events arrive under
        its target name and are mapped back onto the source table."""
        if not isinstance(event, RowChange | Truncate):
            return event
        source = self._by_target.get(event.table)
        if source is None:
            if event.table in self.renames:
                return event  # renamed away: nothing on the target carries this name
            source = event.table
        tp = self.tables.get(source)
        if tp is None:
            return event
        if isinstance(event, Truncate):
            return dataclasses.replace(event, table=source)
        return tp.reverse_event(event)


EMPTY = Plan()


def load(path: Path) -> Plan:
    """Read and check a plan file; errors name the file and the key."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"plan {path}: cannot read it: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"plan {path}: not valid YAML: {exc}") from None
    return parse(raw, str(path))


def parse(raw: Any, where: str = "plan") -> Plan:
    """A plan from its parsed YAML (a mapping); :class:`ConfigError` names what is wrong."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the plan must be a mapping")
    _only(raw, {"version", "tables", "copy_order", "parallelism", "verify", "cutover"}, where)
    if raw.get("version", 1) != 1:
        raise ConfigError(f"{where}: version {raw.get('version')!r} is not supported (1 is)")
    tables: dict[TableId, TablePlan] = {}
    for name, body in (raw.get("tables") or {}).items():
        table = _table_id(name, f"{where}: tables")
        tables[table] = _table(table, body or {}, f"{where}: tables.{name}")
    _check_renames(tables, where)
    order = tuple(_table_id(n, f"{where}: copy_order") for n in raw.get("copy_order") or [])
    parallelism = raw.get("parallelism")
    if parallelism is not None and (not isinstance(parallelism, int) or parallelism < 1):
        raise ConfigError(f"{where}: parallelism must be a positive integer")
    level = raw.get("verify")
    if level is not None and level not in ("none", "counts", "checksum", "rows"):
        raise ConfigError(f"{where}: verify must be none, counts, checksum or rows")
    cutover = raw.get("cutover") or {}
    if not isinstance(cutover, dict):
        raise ConfigError(f"{where}: cutover must be a mapping")
    _only(cutover, {"max_lag", "freeze_timeout"}, f"{where}: cutover")
    for key, value in cutover.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{where}: cutover.{key} must be a positive number of seconds")
    # What shapes the target's data; run knobs (parallelism, verify, cutover) may change.
    canonical = json.dumps(raw.get("tables") or {}, sort_keys=True, default=str)
    return Plan(tables, order, parallelism, level, cutover, canonical)


def _check_renames(tables: Mapping[TableId, TablePlan], where: str) -> None:
    """Every migrated table lands on a name of its own: no two renames onto one name, no
    rename onto a table the plan migrates (under its own name, or renamed away: a chain
    or a swap of names would need an order of renames the snapshot does not keep)."""
    taken: dict[TableId, TableId] = {}
    for table, tp in tables.items():
        if not tp.include or tp.rename is None:
            continue
        at = f"{where}: tables.{table}.rename"
        other = taken.get(tp.rename)
        if other is not None:
            raise ConfigError(
                f"{at}: {other} is renamed onto {tp.rename} too "
                f"(tables.{other}.rename): two tables cannot land in one"
            )
        onto = tables.get(tp.rename)
        if onto is not None and onto.include:
            raise ConfigError(
                f"{at}: {tp.rename} is a migrated table (tables.{tp.rename}): "
                "a table cannot be renamed onto another migrated table"
            )
        taken[tp.rename] = table


def _only(raw: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} (known: {sorted(allowed)})")


def _table_id(name: Any, where: str) -> TableId:
    if not isinstance(name, str) or name.count(".") != 1:
        raise ConfigError(f"{where}: {name!r} must be schema.table")
    schema, table = name.split(".")
    return TableId(schema, table)


def _sql_text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip() or not _SQL_TEXT.match(value):
        raise ConfigError(f"{where}: must be one SQL expression (no ';')")
    return value.strip()


def _type(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _TYPE.match(value.strip()):
        raise ConfigError(f"{where}: {value!r} is not a type name")
    return value.strip()


def _table(table: TableId, body: Any, where: str) -> TablePlan:
    if not isinstance(body, dict):
        raise ConfigError(f"{where}: must be a mapping")
    _only(body, {"include", "filter", "columns", "add", "rename"}, where)
    include = body.get("include", True)
    if not isinstance(include, bool):
        raise ConfigError(f"{where}.include: must be true or false")
    rename = _table_rename(table, body.get("rename"), f"{where}.rename")
    flt = body.get("filter")
    columns: dict[str, ColumnPlan] = {}
    for name, spec in (body.get("columns") or {}).items():
        col = _column(str(name), spec or {}, f"{where}.columns.{name}")
        if col != ColumnPlan(str(name)):
            columns[str(name)] = col
    add = []
    for name, spec in (body.get("add") or {}).items():
        w = f"{where}.add.{name}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{w}: must be a mapping with type and default")
        _only(spec, {"type", "default"}, w)
        if "default" not in spec:
            raise ConfigError(f"{w}: a new required column needs a default")
        default = _sql_text(str(spec["default"]), f"{w}.default")
        add.append(NewColumn(str(name), _type(spec.get("type"), f"{w}.type"), default))
    targets = [c.target for c in columns.values() if c.target]
    names = [a.name for a in add]
    clash = {n for n in targets + names if (targets + names).count(n) > 1}
    renamed_onto = {c.rename for c in columns.values() if c.rename} & (
        set(names) | {n for n in columns if columns[n].target == n}
    )
    if clash or renamed_onto:
        raise ConfigError(f"{where}: two columns would land in {sorted(clash | renamed_onto)}")
    return TablePlan(
        table,
        include,
        None if flt is None else _sql_text(flt, f"{where}.filter"),
        columns,
        tuple(add),
        rename,
    )


def _table_rename(table: TableId, value: Any, where: str) -> TableId | None:
    """``name`` (same schema) or ``schema.name``; None when absent or the same name."""
    if value is None:
        return None
    if not isinstance(value, str) or not value or value.count(".") > 1 or "" in value.split("."):
        raise ConfigError(f"{where}: {value!r} must be a table name or schema.name")
    schema, _, name = value.rpartition(".")
    target = TableId(schema or table.schema, name)
    if max(len(target.schema.encode()), len(target.name.encode())) > 63:
        raise ConfigError(f"{where}: {value!r} is longer than PostgreSQL's 63-byte names")
    return None if target == table else target


def _column(name: str, spec: Any, where: str) -> ColumnPlan:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be a mapping")
    _only(spec, {"rename", "cast", "drop", "transform"}, where)
    drop = spec.get("drop", False)
    if not isinstance(drop, bool):
        raise ConfigError(f"{where}.drop: must be true or false")
    rename = spec.get("rename")
    if rename is not None and (not isinstance(rename, str) or not rename):
        raise ConfigError(f"{where}.rename: must be a column name")
    cast = None if spec.get("cast") is None else _type(spec["cast"], f"{where}.cast")
    steps = spec.get("transform") or []
    if not isinstance(steps, list):
        steps = [steps]
    transforms = tuple(_transform(s, f"{where}.transform[{i}]") for i, s in enumerate(steps))
    if len(transforms) > 1 and any(t.kind == "hook" for t in transforms):
        raise ConfigError(
            f"{where}.transform: a hook must be the column's only transform step "
            "(do the rest inside the hook)"
        )
    if drop and (rename or cast or transforms):
        raise ConfigError(f"{where}: a dropped column cannot also be renamed, cast or transformed")
    if cast and transforms:
        raise ConfigError(f"{where}: cast or transform a column, not both")
    return ColumnPlan(name, rename if rename != name else None, cast, drop, transforms)


def _transform(step: Any, where: str) -> Transform:
    if isinstance(step, str):
        if step in SIMPLE_TRANSFORMS:
            return Transform(step)
        raise ConfigError(
            f"{where}: unknown transform {step!r} (trim, lower, upper, map, default_if_null, hook)"
        )
    if isinstance(step, dict) and len(step) == 1:
        ((kind, arg),) = step.items()
        if kind == "map" and isinstance(arg, dict) and arg:
            return Transform(
                "map",
                mapping=tuple(
                    (str(k), None if v is None else str(v))
                    for k, v in sorted(arg.items(), key=lambda kv: str(kv[0]))
                ),
            )
        if kind == "default_if_null" and arg is not None:
            return Transform("default_if_null", default=str(arg))
        if kind == "hook":
            return Transform("hook", hook=str(arg), function=_load_hook(arg, f"{where}.hook"))
    raise ConfigError(
        f"{where}: {step!r} is not a transform "
        "(trim, lower, upper, {map: {…}}, {default_if_null: …}, {hook: module:function})"
    )


def _load_hook(name: Any, where: str) -> Callable[[Any], Any]:
    """The function ``package.module:function`` names, imported now so a wrong name fails
    when the plan is read, not at the first row."""
    if not isinstance(name, str) or name.count(":") != 1 or "" in name.split(":"):
        raise ConfigError(f"{where}: {name!r} must be package.module:function")
    module_name, attr = name.split(":")
    try:
        found: Any = importlib.import_module(module_name)
    except Exception as exc:  # a missing module, or one failing as it is imported
        raise ConfigError(f"{where}: cannot import module {module_name!r}: {exc}") from None
    for part in attr.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise ConfigError(f"{where}: module {module_name!r} has no {attr!r}")
    if not callable(found):
        raise ConfigError(f"{where}: {name!r} is not callable")
    function: Callable[[Any], Any] = found
    return function


def validate_against(
    plan: Plan, columns: Mapping[TableId, tuple[str, ...]], keys: Mapping[TableId, tuple[str, ...]]
) -> list[str]:
    """What in ``plan`` does not fit the source's tables: each problem as a sentence."""
    problems = []
    for table, tp in plan.tables.items():
        if table not in columns:
            problems.append(f"plan names {table}, which is not a migrated table")
            continue
        have = set(columns[table])
        key = set(keys.get(table, ()))
        for c in tp.columns.values():
            if c.name not in have:
                problems.append(f"plan: {table} has no column {c.name}")
            elif c.name in key and (c.drop or c.transforms or c.cast):
                problems.append(
                    f"plan: {table}.{c.name} is part of the primary key: it can be renamed, "
                    "not dropped, cast or transformed"
                )
        if tp.columns and not key and any(c.transforms or c.cast for c in tp.columns.values()):
            problems.append(
                f"plan: {table} has no primary key: its rows are matched by their full image, "
                "so its columns cannot be cast or transformed"
            )
        for c in tp.columns.values():
            if c.rename and c.rename in have and tp.target_of(c.rename) == c.rename:
                problems.append(f"plan: {table}.{c.name} would land on the kept column {c.rename}")
        for a in tp.add:
            if a.name in have and tp.target_of(a.name) == a.name:
                problems.append(f"plan: {table} already has a column {a.name}")
        if tp.include and tp.rename is not None and tp.rename in columns:
            problems.append(
                f"plan: tables.{table}.rename: {tp.rename} is a migrated table: "
                "a table cannot be renamed onto another migrated table"
            )
    return problems
