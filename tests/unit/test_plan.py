"""The plan model: parsing with errors that name the key, event mapping both ways, DDL."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdcsync.core import plan as plan_mod
from cdcsync.core.events import (
    UNAVAILABLE,
    Column,
    Op,
    Position,
    RowChange,
    SourceInfo,
    TableId,
    Truncate,
    Value,
)
from cdcsync.errors import ConfigError

T = TableId("public", "t")
NAMES = st.sampled_from(["a", "b", "c", "d", "e", "f"])


def change(row: dict[str, Any], key: tuple[str, ...] = ("a",)) -> RowChange:
    return RowChange(
        table=T,
        op=Op.UPDATE,
        key={k: row[k] for k in key if k in row},
        before=dict(row),
        after=dict(row),
        source=SourceInfo(1, 1, 1),
        position=Position("x.public.t", 0, 1),
        columns=tuple(Column(n, True) for n in row),
        inexact=frozenset(list(row)[:1]),
    )


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"tabels": {}}, "unknown key(s) ['tabels']"),
        ({"tables": {"t": {}}}, "'t' must be schema.table"),
        ({"tables": {"public.t": {"colums": {}}}}, "tables.public.t: unknown key(s)"),
        ({"tables": {"public.t": {"columns": {"a": {"cast": "int; drop"}}}}}, "columns.a.cast"),
        ({"tables": {"public.t": {"columns": {"a": {"drop": True, "rename": "b"}}}}}, "dropped"),
        (
            {"tables": {"public.t": {"columns": {"a": {"cast": "text", "transform": "trim"}}}}},
            "not both",
        ),
        ({"tables": {"public.t": {"columns": {"a": {"transform": ["rot13"]}}}}}, "rot13"),
        ({"tables": {"public.t": {"filter": "true; DROP TABLE x"}}}, "filter"),
        ({"tables": {"public.t": {"add": {"n": {"type": "text"}}}}}, "needs a default"),
        (
            {"tables": {"public.t": {"columns": {"a": {"rename": "b"}, "b": {"rename": "c"}}}}},
            None,
        ),
        ({"version": 2}, "version 2"),
        ({"verify": "sometimes"}, "verify must be"),
    ],
)
def test_bad_plans_name_the_key(raw: dict[str, Any], needle: str | None) -> None:
    if needle is None:
        plan_mod.parse(raw)  # a chain of renames is fine
        return
    with pytest.raises(ConfigError) as exc:
        plan_mod.parse(raw)
    assert needle in str(exc.value)


def test_a_rename_onto_a_kept_column_is_refused() -> None:
    with pytest.raises(ConfigError, match="land in"):
        plan_mod.parse(
            {"tables": {"public.t": {"columns": {"a": {"rename": "b"}, "b": {"cast": "text"}}}}}
        )


@given(
    st.dictionaries(NAMES, st.one_of(st.none(), st.integers(), st.text(max_size=5)), min_size=1),
    st.permutations(["a", "b", "c", "d", "e", "f"]),
)
def test_renames_round_trip(row: dict[str, Any], order: list[str]) -> None:
    """Forward then reverse mapping of a rename-only plan gives the event back."""
    names = ["a", "b", "c", "d", "e", "f"]
    renames = {n: f"{o}_new" for n, o in zip(names, order, strict=True)}
    plan = plan_mod.parse(
        {"tables": {"public.t": {"columns": {n: {"rename": r} for n, r in renames.items()}}}}
    )
    event = change(row)
    mapped = plan.map_event(event)
    assert isinstance(mapped, RowChange)
    assert mapped.after == {renames[k]: v for k, v in row.items()}
    assert [c.name for c in mapped.columns] == [renames[k] for k in row]
    assert mapped.inexact == frozenset(renames[k] for k in event.inexact)
    assert plan.reverse_event(mapped) == event


@given(st.dictionaries(NAMES, st.integers(), min_size=1))
def test_drops_and_adds(row: dict[str, Any]) -> None:
    plan = plan_mod.parse(
        {
            "tables": {
                "public.t": {
                    "columns": {"b": {"drop": True}},
                    "add": {"z": {"type": "text", "default": "'v'"}},
                }
            }
        }
    )
    mapped = plan.map_event(change(row))
    assert isinstance(mapped, RowChange)
    assert mapped.after == {k: v for k, v in row.items() if k != "b"}
    # Back on the source: the target-only column is left out, the dropped one absent.
    with_new = change({**(mapped.after or {}), "z": "v"})
    back = plan.reverse_event(with_new)
    assert isinstance(back, RowChange)
    assert back.after == {k: v for k, v in row.items() if k != "b"}


def test_other_tables_and_events_pass_through() -> None:
    plan = plan_mod.parse({"tables": {"public.t": {"columns": {"a": {"rename": "x"}}}}})
    other = RowChange(
        table=TableId("public", "u"),
        op=Op.INSERT,
        key={"a": "1"},
        before=None,
        after={"a": "1"},
        source=SourceInfo(1, 1, 1),
        position=Position("x.public.u", 0, 1),
    )
    assert plan.map_event(other) is other


def test_ddl_in_order_and_quoted() -> None:
    plan = plan_mod.parse(
        {
            "tables": {
                "public.t": {
                    "columns": {
                        "E mail": {"rename": "email", "transform": ["trim", "lower"]},
                        "amount": {"cast": "numeric(12,2)"},
                        "old": {"drop": True},
                        "s": {"transform": [{"map": {"A": "on"}}, {"default_if_null": "x"}]},
                    },
                    "add": {"region": {"type": "text", "default": "'eu'"}},
                }
            }
        }
    )
    text = [s.as_string(None) for s in plan.table(T).ddl()]
    assert text[0].startswith('UPDATE "public"."t" SET "E mail" = lower(btrim("E mail"))')
    assert "coalesce((CASE (\"s\")::text WHEN 'A' THEN 'on'" in text[0]
    assert text[1] == (
        'ALTER TABLE "public"."t" ALTER COLUMN "amount" TYPE numeric(12,2) '
        'USING ("amount")::text::numeric(12,2)'
    )
    assert text[2] == 'ALTER TABLE "public"."t" DROP COLUMN "old"'
    assert text[3] == 'ALTER TABLE "public"."t" RENAME COLUMN "E mail" TO "email"'
    assert text[4] == 'ALTER TABLE "public"."t" ADD COLUMN "region" text NOT NULL DEFAULT \'eu\''


def test_fingerprint_follows_content() -> None:
    a = plan_mod.parse({"tables": {"public.t": {"filter": "x > 1"}}})
    b = plan_mod.parse({"tables": {"public.t": {"filter": "x > 2"}}})
    assert a.fingerprint() != b.fingerprint()
    knobs = plan_mod.parse({"tables": {"public.t": {"filter": "x > 1"}}, "parallelism": 2})
    assert knobs.fingerprint() == a.fingerprint(), "run knobs do not need a new snapshot"
    assert (
        a.fingerprint()
        == plan_mod.parse({"tables": {"public.t": {"filter": "x > 1"}}}).fingerprint()
    )


def test_validation_against_the_source() -> None:
    plan = plan_mod.parse(
        {
            "tables": {
                "public.t": {
                    "columns": {"id": {"drop": True}, "nope": {"rename": "x"}, "w": {"rename": "v"}}
                },
                "public.k": {"columns": {"v": {"transform": "trim"}}},
                "public.gone": {},
            }
        }
    )
    problems = plan_mod.validate_against(
        plan,
        {T: ("id", "v", "w"), TableId("public", "k"): ("v",)},
        {T: ("id",), TableId("public", "k"): ()},
    )
    text = "\n".join(problems)
    assert "public.t has no column nope" in text
    assert "public.t.id is part of the primary key" in text
    assert "public.k has no primary key" in text
    assert "plan names public.gone" in text
    assert "public.t.w would land on the kept column v" in text


def test_the_plans_knobs_reach_the_settings(tmp_path: Any) -> None:
    from cdcsync.config import load_settings

    path = tmp_path / "plan.yaml"
    path.write_text("parallelism: 3\nverify: rows\ncutover: {max_lag: 7, freeze_timeout: 4.5}\n")
    s = load_settings(source_dsn="x", target_dsn="y", plan=path)
    assert s.workers == 3
    assert s.cutover.verify == "checksum"  # a switch verifies by checksum at most
    assert (s.cutover.max_lag_seconds, s.cutover.freeze_timeout_seconds) == (7.0, 4.5)
    path.write_text("cutover: {freeze_timeout: -1}\n")
    with pytest.raises(ConfigError, match=r"cutover\.freeze_timeout"):
        load_settings(source_dsn="x", target_dsn="y", plan=path)


def test_copy_order_goes_first() -> None:
    from cdcsync.snapshot.chunking import Chunk, schedule

    def chunk(name: str, number: int, size: int) -> Chunk:
        t = TableId("public", name)
        return Chunk(t, number, t, "whole", None, None, size)

    chunks = [
        chunk("big", 0, 900),
        chunk("small", 0, 10),
        chunk("mid", 0, 500),
        chunk("mid", 1, 50),
    ]
    order = schedule(chunks, (TableId("public", "mid"), TableId("public", "small")))
    assert [(c.table.name, c.number) for c in order] == [
        ("mid", 0),
        ("mid", 1),
        ("small", 0),
        ("big", 0),
    ]
    assert [c.table.name for c in schedule(chunks)] == ["big", "mid", "mid", "small"]


# table renames ------------------------------------------------------------------------

SCHEMAS = st.sampled_from(["public", "sales", "Odd Schema"])
TABLES = st.sampled_from(["t", "u", "orders", "Mixed Case"])


def truncate(table: TableId) -> Truncate:
    return Truncate(table, SourceInfo(1, 1, 1), Position("x.t", 0, 1))


@given(
    st.dictionaries(NAMES, st.one_of(st.none(), st.integers(), st.text(max_size=5)), min_size=1),
    SCHEMAS,
    TABLES,
    st.booleans(),
)
def test_table_renames_round_trip(
    row: dict[str, Any], schema: str, name: str, with_columns: bool
) -> None:
    """A renamed table's events land on its target name and come back onto the source's;
    column renames of the same entry travel with it, other tables pass through."""
    target = TableId(schema, name)
    spec: dict[str, Any] = {"rename": f"{schema}.{name}"}
    if with_columns:
        spec["columns"] = {"a": {"rename": "a_new"}}
    plan = plan_mod.parse({"tables": {"public.t": spec}})
    event = change(row)
    mapped = plan.map_event(event)
    assert isinstance(mapped, RowChange)
    assert mapped.table == target
    if with_columns and "a" in row:
        assert "a_new" in (mapped.after or {})
    assert plan.reverse_event(mapped) == event
    assert plan.target_table(T) == target
    assert plan.source_table(target) == T
    for e in (truncate(T),):
        there = plan.map_event(e)
        assert isinstance(there, Truncate) and there.table == target
        assert plan.reverse_event(there) == e
    other = dataclasses.replace(event, table=TableId("public", "other"))
    if target != other.table:
        assert plan.map_event(other) is other
        assert plan.reverse_event(other) is other


def test_a_rename_without_schema_keeps_the_schema_and_the_same_name_is_no_rename() -> None:
    plan = plan_mod.parse({"tables": {"sales.t": {"rename": "t2"}, "public.t": {"rename": "t"}}})
    assert plan.target_table(TableId("sales", "t")) == TableId("sales", "t2")
    assert plan.table(T).rename is None
    assert plan.renames == {TableId("sales", "t"): TableId("sales", "t2")}
    assert plan.maps_columns  # events of a renamed table need mapping


def test_a_table_renamed_away_is_not_mapped_back_from_its_old_name() -> None:
    plan = plan_mod.parse({"tables": {"public.t": {"rename": "t2"}}})
    event = change({"a": 1})
    assert plan.reverse_event(event) is event


@pytest.mark.parametrize(
    ("tables", "needle"),
    [
        (
            {"public.a": {"rename": "x"}, "public.b": {"rename": "public.x"}},
            "tables.public.b.rename: public.a is renamed onto public.x too",
        ),
        ({"public.a": {"rename": "b"}, "public.b": {}}, "tables.public.a.rename: public.b is a"),
        (
            {"public.a": {"rename": "b"}, "public.b": {"rename": "c"}},
            "tables.public.a.rename: public.b is a migrated table",
        ),
        ({"public.a": {"rename": "s.b.c"}}, "tables.public.a.rename: 's.b.c' must be"),
        ({"public.a": {"rename": ".b"}}, "must be a table name"),
        ({"public.a": {"rename": 7}}, "must be a table name"),
        ({"public.a": {"rename": "x" * 64}}, "63-byte"),
    ],
)
def test_bad_table_renames_name_the_plan_location(tables: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        plan_mod.parse({"tables": tables})
    assert needle in str(exc.value)


def test_renames_onto_an_excluded_table_or_from_one_are_fine() -> None:
    plan = plan_mod.parse(
        {
            "tables": {
                "public.a": {"rename": "b"},
                "public.b": {"include": False},
                "public.c": {"include": False, "rename": "b"},
            }
        }
    )
    assert plan.renames == {TableId("public", "a"): TableId("public", "b")}


def test_a_rename_onto_a_table_the_plan_does_not_list_is_a_problem_against_the_source() -> None:
    plan = plan_mod.parse({"tables": {"public.t": {"rename": "u"}}})
    u = TableId("public", "u")
    problems = plan_mod.validate_against(plan, {T: ("a",), u: ("a",)}, {T: ("a",), u: ("a",)})
    assert problems == [
        "plan: tables.public.t.rename: public.u is a migrated table: a table cannot be "
        "renamed onto another migrated table"
    ]
    assert plan_mod.validate_against(plan, {T: ("a",)}, {T: ("a",)}) == []


def test_fingerprint_changes_with_a_rename() -> None:
    base = {"tables": {"public.t": {"columns": {"a": {"rename": "b"}}}}}
    renamed = {"tables": {"public.t": {"columns": {"a": {"rename": "b"}}, "rename": "t2"}}}
    other = {"tables": {"public.t": {"columns": {"a": {"rename": "b"}}, "rename": "s.t2"}}}
    prints = {plan_mod.parse(p).fingerprint() for p in (base, renamed, other)}
    assert len(prints) == 3


def test_rename_ddl_comes_last_moves_the_schema_and_records_the_rename() -> None:
    plan = plan_mod.parse(
        {
            "tables": {
                "public.t": {
                    "rename": "Sales.Orders",
                    "columns": {"a": {"rename": "b"}},
                }
            }
        }
    )
    text = [s.as_string(None) for s in plan.table(T).ddl("state")]
    assert text[0] == 'ALTER TABLE "public"."t" RENAME COLUMN "a" TO "b"'
    assert text[1] == 'ALTER TABLE "public"."t" RENAME TO "Orders"'
    assert text[2] == 'CREATE SCHEMA IF NOT EXISTS "Sales"'
    assert text[3] == 'ALTER TABLE "public"."Orders" SET SCHEMA "Sales"'
    assert text[4] == 'CREATE SCHEMA IF NOT EXISTS "state"'
    assert text[5].startswith('CREATE TABLE IF NOT EXISTS "state"."table_rename"')
    assert text[6].startswith(
        "INSERT INTO \"state\".\"table_rename\" VALUES ('public', 't', 'Sales', 'Orders')"
    )
    same_name = plan_mod.parse({"tables": {"public.t": {"rename": "other.t"}}})
    moves = [s.as_string(None) for s in same_name.table(T).ddl()]
    assert not any("RENAME TO" in m for m in moves)
    assert 'ALTER TABLE "public"."t" SET SCHEMA "other"' in moves


def test_owned_sequences_follow_a_table_into_its_new_schema_and_back() -> None:
    plan = plan_mod.parse(
        {
            "tables": {
                "public.orders": {"rename": "sales.orders_v2"},
                "public.notes": {"rename": "n2"},
            }
        }
    )
    orders, notes, plain = (TableId("public", n) for n in ("orders", "notes", "plain"))
    seq = {n: TableId("public", f"{n}_id_seq") for n in ("orders", "notes", "plain")}
    owners = {seq["orders"]: orders, seq["notes"]: notes, seq["plain"]: plain}
    there = plan.sequence_names(owners)
    assert there == {seq["orders"]: TableId("sales", "orders_id_seq")}
    back = plan.sequence_names(
        {
            TableId("sales", "orders_id_seq"): TableId("sales", "orders_v2"),
            seq["notes"]: TableId("public", "n2"),
        },
        from_target=True,
    )
    assert back == {TableId("sales", "orders_id_seq"): seq["orders"]}


def test_the_applier_finds_a_renamed_tables_transforms_and_rows_by_its_target_name() -> None:
    """Forward events carry the target's table name: the transforms are keyed by it, and
    rows read by key come from the source's table in the source's column names."""
    from cdcsync.engine.stream import Endpoint, _mapped_fetch, _transforms

    plan = plan_mod.parse(
        {
            "tables": {
                "public.t": {
                    "rename": "s.t2",
                    "columns": {"a": {"rename": "a2"}, "b": {"transform": "trim"}},
                }
            }
        }
    )
    moved = TableId("s", "t2")
    assert set(_transforms(plan)) == {moved}
    assert set(_transforms(plan)[moved]) == {"b"}
    calls: list[tuple[TableId, tuple[str, ...]]] = []

    def fetch(
        table: TableId, key: tuple[str, ...], keys: list[tuple[Value, ...]]
    ) -> dict[tuple[Value, ...], dict[str, Value]]:
        calls.append((table, key))
        first = "a2" if table == moved else "a"  # each side's own column names
        return {k: {first: k[0], "b": "x"} for k in keys}

    forward = _mapped_fetch(fetch, plan, Endpoint("forward", "p", "t", "s"))
    assert forward(moved, ("a2",), [("1",)]) == {("1",): {"a2": "1", "b": "x"}}
    reverse = _mapped_fetch(fetch, plan, Endpoint("reverse", "p", "s", "t"))
    assert reverse(T, ("a",), [("2",)]) == {("2",): {"a": "2", "b": "x"}}
    assert calls == [(T, ("a",)), (moved, ("a2",))]


HOOK = "tests.integration.plan_hooks:mask_email"


def _hooked(**column: Any) -> plan_mod.Plan:
    spec = {"transform": [{"hook": HOOK}], **column}
    return plan_mod.parse({"tables": {"public.t": {"columns": {"b": spec}}}})


def test_a_hook_maps_event_images_and_leaves_the_toast_placeholder() -> None:
    from tests.integration.plan_hooks import mask_email

    tp = _hooked(rename="mail").table(T)
    assert tp.hooks()["b"].hook == HOOK and tp.transformed() == {}
    out = tp.map_event(change({"a": "1", "b": "Ann@Example.COM", "c": "x"}))
    assert out.after == {"a": "1", "mail": mask_email("Ann@Example.COM"), "c": "x"}
    assert out.before == out.after and out.key == {"a": "1"}
    assert out.after["mail"] != "Ann@Example.COM"
    assert tp.map_event(change({"a": "1", "b": None})).after == {"a": "1", "mail": None}
    unsent = tp.map_event(change({"a": "1", "b": UNAVAILABLE}))
    assert unsent.after == {"a": "1", "mail": UNAVAILABLE}
    # One-way: the target's value goes back as it is.
    back = tp.reverse_event(dataclasses.replace(out, table=T))
    assert back.after == {"a": "1", "b": mask_email("Ann@Example.COM"), "c": "x"}


@given(st.one_of(st.none(), st.text()))
def test_a_hook_is_called_with_the_value_and_its_result_kept_as_text(value: str | None) -> None:
    seen: list[Any] = []

    def hook(v: Any) -> Any:
        seen.append(v)
        return None if v is None else len(v)

    step = plan_mod.Transform("hook", hook="m:f", function=hook)
    assert step.apply(value) == (None if value is None else str(len(value)))
    assert seen == [value]
    assert step.apply(UNAVAILABLE) is UNAVAILABLE and seen == [value]


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"transform": ["trim", {"hook": HOOK}]}, "only transform step"),
        ({"transform": [{"hook": HOOK}, "lower"]}, "only transform step"),
        ({"transform": [{"hook": HOOK}], "cast": "text"}, "not both"),
        ({"transform": [{"hook": HOOK}], "drop": True}, "dropped column"),
        ({"transform": {"hook": "no_such_module_zz:f"}}, "cannot import module"),
        ({"transform": {"hook": "tests.integration.plan_hooks:nope"}}, "has no 'nope'"),
        ({"transform": {"hook": "tests.integration.plan_hooks:NOT_CALLABLE"}}, "not callable"),
        ({"transform": {"hook": "no_colon"}}, "package.module:function"),
        ({"transform": {"hook": ["x"]}}, "package.module:function"),
    ],
)
def test_bad_hooks_are_refused_naming_the_plan_location(spec: Any, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        plan_mod.parse({"tables": {"public.t": {"columns": {"b": spec}}}}, "p.yaml")
    assert "p.yaml: tables.public.t.columns.b" in str(err.value), err.value
    assert needle in str(err.value), err.value


def test_hooks_on_a_key_column_or_a_keyless_table_are_problems() -> None:
    on_key = plan_mod.parse(
        {"tables": {"public.t": {"columns": {"a": {"transform": {"hook": HOOK}}}}}}
    )
    problems = plan_mod.validate_against(on_key, {T: ("a", "b")}, {T: ("a",)})
    assert any("part of the primary key" in p for p in problems), problems
    problems = plan_mod.validate_against(_hooked(), {T: ("a", "b")}, {})
    assert any("no primary key" in p for p in problems), problems
    assert plan_mod.validate_against(_hooked(), {T: ("a", "b")}, {T: ("a",)}) == []


def test_hooked_columns_have_no_sql_and_are_rewritten_by_key() -> None:
    from psycopg import sql

    from tests.integration.plan_hooks import mask_email

    raw = {"b": {"transform": {"hook": HOOK}}, "c": {"transform": "trim"}}
    tp = plan_mod.parse({"tables": {"public.t": {"columns": raw}}}).table(T)
    assert list(tp.transformed()) == ["c"]  # the applier's SQL transforms
    ddl = [s.as_string(None) for s in tp.ddl()]
    assert ddl == ['UPDATE "public"."t" SET "c" = btrim("c")'], ddl
    with pytest.raises(ConfigError, match="runs in Python"):
        tp.value_sql("b", sql.Identifier("b"))
    select, update = tp.hook_sql(("a", "k"))
    assert select.as_string(None) == 'SELECT "a"::text, "k"::text, "b"::text FROM "public"."t"'
    assert update.as_string(None) == 'UPDATE "public"."t" SET "b" = %s WHERE "a" = %s AND "k" = %s'
    assert tp.hook_row(("a", "k"), ("1", "2", "x@y")) == (mask_email("x@y"), "1", "2")
    assert tp.hook_row(("a", "k"), ("1", "2", None)) == (None, "1", "2")


def test_verification_leaves_hooked_columns_out_and_says_so() -> None:
    from cdcsync.core import verify_plan

    tp = _hooked().table(T)
    for reverse in (False, True):
        m = verify_plan.build(
            T, tp, {"a": "bigint", "b": "text", "c": "text"}, ("a",), reverse=reverse
        )
        assert [p.target for p in m.pairs] == ["a", "c"]
        assert m.uncompared == ("b",) and not m.identity
        assert any("b: computed by the Python hook" in n and "not compared" in n for n in m.skipped)
