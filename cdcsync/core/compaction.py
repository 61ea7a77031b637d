"""Per-key compaction and apply planning: a batch of events → a few set-based steps.

For a table with a primary key only the last state of each key matters, so a batch
collapses to one *upsert* or one *delete* per key, applied with set-based SQL. Rules:

- insert/read/update then delete → delete; delete then insert → upsert of the new row;
- an update merges onto the key's pending image; a column sent as UNAVAILABLE (an
  unchanged TOASTed value) keeps the pending value, or — with none pending — is left
  out of the write so the target keeps its own value (a *partial* upsert, which must
  find the row);
- a truncate drops everything pending for the table and is applied first;
- columns the event cannot carry exactly (``inexact``) make the key's write a *refetch*:
  the row is read from the source by key.

Tables without a key cannot be compacted: their changes become an ordered list of
single-row operations matched by the full before image.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeAlias

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

KeyTuple: TypeAlias = tuple[tuple[str, Value], ...]


@dataclass(slots=True)
class Upsert:
    """The final image of a key; ``partial`` when some columns must keep target values."""

    row: Mapping[str, Value]
    partial: bool
    refetch: bool
    position: Position


@dataclass(slots=True)
class Delete:
    key: Mapping[str, Value]
    position: Position


@dataclass(slots=True)
class KeylessOp:
    """One change of a table without a key, applied to exactly one matching row."""

    op: Op
    before: Mapping[str, Value] | None
    after: Mapping[str, Value] | None
    position: Position


@dataclass
class TablePlan:
    """Everything one batch does to one table, in the order it must be done."""

    table: TableId
    truncate: bool = False
    keyed: dict[KeyTuple, Upsert | Delete] = field(default_factory=dict)
    keyless: list[KeylessOp] = field(default_factory=list)

    def deletes(self) -> list[Delete]:
        return [s for s in self.keyed.values() if isinstance(s, Delete)]

    def upserts(self) -> list[Upsert]:
        return [s for s in self.keyed.values() if isinstance(s, Upsert)]


def key_of(change: RowChange) -> KeyTuple:
    key = change.key
    if len(key) == 1:  # the common case: one column is already in order
        return tuple(key.items())
    return tuple(sorted(key.items()))


def _available(row: Mapping[str, Value]) -> Mapping[str, Value]:
    """``row`` without its unsent columns: itself when it has none (plans share the
    event's images and never change them)."""
    if UNAVAILABLE not in row.values():  # the common case, without a Python-level loop
        return row
    return {k: v for k, v in row.items() if v is not UNAVAILABLE}


def plan_batch(events: Iterable[Event]) -> dict[TableId, TablePlan]:
    """Compact a batch into per-table plans; events must be in order per key."""
    plans: dict[TableId, TablePlan] = {}
    for event in events:
        if type(event) is RowChange:
            table = event.table
            plan = plans.get(table)  # not setdefault: that would build a plan per event
            if plan is None:
                plan = plans[table] = TablePlan(table)
            if event.key:
                _apply_keyed(plan, event)
            else:
                plan.keyless.append(KeylessOp(event.op, event.before, event.after, event.position))
        elif isinstance(event, Truncate):
            plan = plans.setdefault(event.table, TablePlan(event.table))  # rare
            plan.truncate = True
            plan.keyed.clear()
            plan.keyless.clear()
        # tombstones, heartbeats and messages change no row
    return plans


def _apply_keyed(plan: TablePlan, change: RowChange) -> None:
    key = key_of(change)
    op = change.op
    if op is Op.DELETE:
        plan.keyed[key] = Delete(change.key, change.position)
        return
    after = change.after
    assert after is not None  # decoding guarantees an after image for c/r/u
    refetch = bool(change.inexact)
    pending = plan.keyed.get(key)
    if pending is None or op is not Op.UPDATE or type(pending) is Delete:
        row = _available(after)
        short = len(row) < len(after)
        if short and op is not Op.UPDATE:
            refetch = True  # a create carrying the TOAST placeholder (key change)
        plan.keyed[key] = Upsert(row, short and op is Op.UPDATE, refetch, change.position)
        return
    assert type(pending) is Upsert
    merged = dict(pending.row)
    merged.update(_available(after))
    plan.keyed[key] = Upsert(
        merged,
        pending.partial and len(merged) < len(after),
        pending.refetch or refetch,
        change.position,
    )
