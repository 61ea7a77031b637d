"""The plan model: parsing with errors that name the key, event mapping both ways, DDL."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdcsync.core import plan as plan_mod
from cdcsync.core.events import Column, Op, Position, RowChange, SourceInfo, TableId
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
