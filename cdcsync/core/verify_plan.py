"""How verification reads one table on each side under the migration plan (pure: no I/O).

The source side is read as the plan maps it — each compared column's value is the SQL
of :meth:`TablePlan.value_sql` (transforms, then the ``::text::type`` cast), its rows
restricted by the plan's filter — and the target side as it is, under the target's
column names, in the table the plan renames it to (:attr:`Mapping.target_table`). A
:class:`Mapping` pairs the two: the compared columns in the source's
column order, the key named per side (a key column can be renamed, never cast or
transformed, so ranges are cut on the same key values), and each side's filter.
Dropped columns are not compared, nor are columns a Python hook computes (the database
cannot compute them on the source side; the report names them). Columns the plan adds
on the target are left out of the row hash: their values are the target's own (a
default evaluated when the row was written, then whatever the application writes after
the cutover); verification counts the rows where they differ from the default
expression as a note.

Once the target has been the primary (after a cutover, and for a rollback's
verification), rows written there came back to the source through the reverse stream,
renamed back, cast back by the source's input functions, their transformed values as
they are. Two things follow, and ``reverse`` says they apply:

- the filter holds for the target's rows too: a row the application wrote on the target
  outside the filter is on both sides and is compared on neither. On the target the
  filter is evaluated over the target's columns under their source names (cast back to
  the source's types; columns the plan transforms or drops are not offered, so a filter
  that reads one fails in the database, naming the column);
- a transformed column compares ``T(source)`` with the target's value, which holds for
  a row written back only when ``T(v) = v`` for the values ``T`` produces, i.e. when
  the transform chain is idempotent. A chain that cannot be shown idempotent
  (:func:`idempotent`) is not compared in reverse, and the report says so.
"""

from __future__ import annotations

from collections.abc import Mapping as MappingT
from collections.abc import Sequence
from dataclasses import dataclass

from psycopg import sql

from cdcsync.core.events import TableId
from cdcsync.core.plan import SIMPLE_TRANSFORMS, TablePlan, Transform

_CASE = frozenset({"lower", "upper"})


@dataclass(frozen=True)
class Pair:
    """One compared column: its name and value expression on each side."""

    source: str
    target: str
    source_value: sql.Composable
    target_value: sql.Composable
    cast: bool = False  # the source value is cast to the target's type
    mapped: bool = False  # computed (cast or transformed): compared by its text


@dataclass(frozen=True)
class Mapping:
    """Everything verification reads of one table on each side."""

    table: TableId
    pairs: tuple[Pair, ...]
    source_key: tuple[str, ...]
    target_key: tuple[str, ...]
    source_filter: sql.Composable | None = None
    target_filter: sql.Composable | None = None
    #: Target columns deliberately not compared (added by the plan), and the reasons.
    added: tuple[tuple[str, str], ...] = ()  # (column, its default expression)
    skipped: tuple[str, ...] = ()  # notes: columns left out, and why
    uncompared: tuple[str, ...] = ()  # target columns left out on purpose (not added ones)
    renamed: TableId | None = None  # the table's name on the target, when the plan renames it

    @property
    def target_table(self) -> TableId:
        return self.renamed or self.table

    @property
    def identity(self) -> bool:
        return (
            self.renamed is None
            and self.source_filter is None
            and self.target_filter is None
            and not self.added
            and not self.skipped
            and all(p.source == p.target and not p.mapped for p in self.pairs)
        )

    def source_where(self, predicate: sql.Composable | None) -> sql.Composable:
        return where_clause(predicate, self.source_filter)

    def target_where(self, predicate: sql.Composable | None) -> sql.Composable:
        return where_clause(predicate, self.target_filter)


def where_clause(*parts: sql.Composable | None) -> sql.Composable:
    kept = [p for p in parts if p is not None]
    if not kept:
        return sql.SQL("")
    return sql.SQL(" WHERE {}").format(sql.SQL(" AND ").join(kept))


def idempotent(chain: Sequence[Transform]) -> bool:
    """Whether applying ``chain`` twice gives what applying it once gives (conservatively).

    Shown for: one ``trim``, ``lower``, ``upper`` or ``default_if_null``; ``trim``s with
    at most one case step (they commute); a ``map`` whose every output is not a key, or
    maps to itself; such a ``map`` then a ``default_if_null`` whose default the map
    keeps. Anything else is treated as not idempotent.
    """
    kinds = [t.kind for t in chain]
    if not chain:
        return True
    if all(k in SIMPLE_TRANSFORMS for k in kinds):
        return sum(k in _CASE for k in kinds) <= 1
    if kinds == ["default_if_null"]:
        return True
    if kinds == ["map"]:
        return _map_idempotent(chain[0])
    if kinds == ["map", "default_if_null"]:
        m = dict(chain[0].mapping)
        d = chain[1].default
        return _map_idempotent(chain[0]) and (d not in m or m[d] in (d, None))
    return False


def _map_idempotent(step: Transform) -> bool:
    m = dict(step.mapping)
    return all(v is None or v not in m or m[v] == v for v in m.values())


def build(
    table: TableId,
    plan: TablePlan | None,
    source_columns: MappingT[str, str],
    source_key: Sequence[str],
    *,
    reverse: bool = False,
) -> Mapping:
    """The comparison of ``table``: ``source_columns`` (name → type, in order) and key
    as the source has them, the plan's mapping (None: none), ``reverse`` as above."""
    if plan is None or (not plan.maps_columns and plan.filter is None):  # renames map too
        pairs = tuple(Pair(c, c, sql.Identifier(c), sql.Identifier(c)) for c in source_columns)
        return Mapping(table, pairs, tuple(source_key), tuple(source_key))
    out: list[Pair] = []
    skipped: list[str] = []
    uncompared: list[str] = []
    for name in source_columns:
        target = plan.target_of(name)
        if target is None:
            skipped.append(f"{name}: dropped by the plan, not compared")
            continue
        col = plan.columns.get(name)
        if col is not None and col.hook is not None:
            skipped.append(
                f"{target}: computed by the Python hook {col.hook.hook}, which the database "
                "cannot run: not compared"
            )
            uncompared.append(target)
            continue
        chain = col.transforms if col is not None else ()
        cast = bool(col is not None and col.cast)
        if reverse and not idempotent(chain):
            skipped.append(
                f"{target}: its transform is not idempotent, and the target has been the "
                "primary (values written there come back transformed): not compared"
            )
            uncompared.append(target)
            continue
        out.append(
            Pair(
                name,
                target,
                plan.value_sql(name, sql.Identifier(name)),
                sql.Identifier(target),
                cast=cast,
                mapped=cast or bool(chain),
            )
        )
    target_key = []
    for k in source_key:
        t = plan.target_of(k)
        if t is None:  # the plan refuses this; never compare on half a key
            raise ValueError(f"{table}: key column {k} is dropped by the plan")
        target_key.append(t)
    source_filter = None if plan.filter is None else sql.SQL("({})").format(sql.SQL(plan.filter))
    target_filter = None
    if reverse and plan.filter is not None:
        target_filter = reverse_filter(table, plan, source_columns)
    return Mapping(
        table,
        tuple(out),
        tuple(source_key),
        tuple(target_key),
        source_filter,
        target_filter,
        tuple((a.name, a.default) for a in plan.add),
        tuple(skipped),
        tuple(uncompared),
        plan.rename,
    )


def reverse_filter(
    table: TableId, plan: TablePlan, source_columns: MappingT[str, str]
) -> sql.Composable:
    """The plan's filter evaluated on a target row: over the target's columns under their
    source names, cast back to the source's types (what the reverse stream writes).

    A correlated scalar subquery, so the rest of the query keeps the target's names.
    Transformed and dropped columns are not offered.
    """
    assert plan.filter is not None
    on_target = plan.target_table
    rel = (on_target.schema, on_target.name)
    exprs: list[sql.Composable] = []
    for name, typ in source_columns.items():
        col = plan.columns.get(name)
        target = plan.target_of(name)
        if target is None or (col is not None and col.transforms):
            continue
        ref: sql.Composable = sql.Identifier(*rel, target)
        if col is not None and col.cast:
            ref = sql.SQL("({})::text::{}").format(ref, sql.SQL(typ))
        exprs.append(sql.SQL("{} AS {}").format(ref, sql.Identifier(name)))
    if not exprs:
        exprs.append(sql.SQL("NULL AS {}").format(sql.Identifier("?column?")))
    return sql.SQL("(SELECT ({}) FROM (SELECT {}) AS {})").format(
        sql.SQL(plan.filter), sql.SQL(", ").join(exprs), sql.Identifier("cdcsync_row")
    )
