"""Applying a compacted batch equals applying its events one by one (property test)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cdcsync.core.compaction import Delete, Upsert, plan_batch
from cdcsync.core.events import (
    UNAVAILABLE,
    Event,
    Op,
    Position,
    RowChange,
    SourceInfo,
    TableId,
    Truncate,
    Value,
)

T = TableId("public", "t")
COLS = ("k", "a", "b")
Model = dict[str, dict[str, Value]]


def change(op: Op, key: str, after: dict[str, Value] | None, n: int) -> RowChange:
    return RowChange(
        table=T,
        op=op,
        key={"k": key},
        before={"k": key} if op is Op.DELETE else None,
        after=after,
        source=SourceInfo(n, n, n),
        position=Position("p.public.t", 0, n),
    )


@st.composite
def histories(draw: Any) -> tuple[Model, list[Event]]:
    """A starting table and a valid sequence of changes to it."""
    keys = ["1", "2", "3"]
    start: Model = {}
    for k in keys:
        if draw(st.booleans()):
            start[k] = {"k": k, "a": draw(st.sampled_from(["x", "y", None])), "b": "big" + k}
    live = set(start)
    events: list[Event] = []
    for n in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["ins", "upd", "upd_toast", "del", "trunc"]))
        key = draw(st.sampled_from(keys))
        value = draw(st.sampled_from(["p", "q", None]))
        if kind == "trunc":
            events.append(Truncate(T, SourceInfo(n, n, n), Position("p.public.t", 0, n)))
            live.clear()
        elif kind == "ins" and key not in live:
            events.append(change(Op.INSERT, key, {"k": key, "a": value, "b": f"v{n}"}, n))
            live.add(key)
        elif kind == "upd" and key in live:
            events.append(change(Op.UPDATE, key, {"k": key, "a": value, "b": f"u{n}"}, n))
        elif kind == "upd_toast" and key in live:
            events.append(change(Op.UPDATE, key, {"k": key, "a": value, "b": UNAVAILABLE}, n))
        elif kind == "del" and key in live:
            events.append(change(Op.DELETE, key, None, n))
            live.discard(key)
    return start, events


def one_by_one(start: Model, events: list[Event]) -> Model:
    table = {k: dict(v) for k, v in start.items()}
    for e in events:
        if isinstance(e, Truncate):
            table.clear()
        elif isinstance(e, RowChange):
            key = str(e.key["k"])
            if e.op is Op.DELETE:
                table.pop(key, None)
            else:
                assert e.after is not None
                row = table.get(key, {})
                row.update({c: v for c, v in e.after.items() if v is not UNAVAILABLE})
                table[key] = row
    return table


def compacted(start: Model, events: list[Event]) -> Model:
    table = {k: dict(v) for k, v in start.items()}
    plan = plan_batch(events).get(T)
    if plan is None:
        return table
    if plan.truncate:
        table.clear()
    for step in plan.keyed.values():
        if isinstance(step, Delete):
            table.pop(str(step.key["k"]), None)
    for step in plan.keyed.values():
        if isinstance(step, Upsert):
            key = str(step.row["k"])
            if step.partial:
                assert key in table, "a partial upsert must find its row"
            merged = dict(table.get(key, {}))
            merged.update(step.row)
            table[key] = merged
    return table


@settings(max_examples=400, deadline=None)
@given(histories())
def test_compacted_batch_equals_one_by_one(history: tuple[Model, list[Event]]) -> None:
    start, events = history
    assert compacted(start, events) == one_by_one(start, events)


@given(histories())
def test_each_step_belongs_to_its_key(history: tuple[Model, list[Event]]) -> None:
    _start, events = history
    plan = plan_batch(events).get(T)
    if plan is not None:
        for key, step in plan.keyed.items():
            image = step.key if isinstance(step, Delete) else step.row
            assert (("k", image["k"]),) == key
            assert all(c in COLS for c in image)
            assert all(v is not UNAVAILABLE for v in image.values())


def test_toast_placeholder_never_written() -> None:
    events: list[Event] = [change(Op.UPDATE, "1", {"k": "1", "a": "x", "b": UNAVAILABLE}, 1)]
    (up,) = plan_batch(events)[T].upserts()
    assert "b" not in up.row and up.partial


def test_insert_then_toast_update_keeps_inserted_value() -> None:
    events: list[Event] = [
        change(Op.INSERT, "1", {"k": "1", "a": "x", "b": "big"}, 1),
        change(Op.UPDATE, "1", {"k": "1", "a": "y", "b": UNAVAILABLE}, 2),
    ]
    (up,) = plan_batch(events)[T].upserts()
    assert up.row == {"k": "1", "a": "y", "b": "big"} and not up.partial


def test_create_with_placeholder_after_key_change_is_refetched() -> None:
    events: list[Event] = [
        change(Op.DELETE, "1", None, 1),
        change(Op.INSERT, "2", {"k": "2", "a": "x", "b": UNAVAILABLE}, 2),
    ]
    plan = plan_batch(events)[T]
    (up,) = plan.upserts()
    assert up.refetch
    assert len(plan.deletes()) == 1


def test_keyless_changes_stay_in_order() -> None:
    nk = TableId("public", "nk")
    events: list[Event] = [
        RowChange(nk, Op.INSERT, {}, None, {"a": "1"}, SourceInfo(1, 1, 1), Position("x", 0, 1)),
        RowChange(
            nk, Op.UPDATE, {}, {"a": "1"}, {"a": "2"}, SourceInfo(2, 2, 2), Position("x", 0, 2)
        ),
        RowChange(nk, Op.DELETE, {}, {"a": "2"}, None, SourceInfo(3, 3, 3), Position("x", 0, 3)),
    ]
    plan = plan_batch(events)[nk]
    assert [op.op for op in plan.keyless] == [Op.INSERT, Op.UPDATE, Op.DELETE]
    assert not plan.keyed
