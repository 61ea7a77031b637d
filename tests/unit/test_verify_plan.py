"""Verification's per-side reading of a table under the plan (pure SQL building)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg import sql

from cdcsync.core import plan as plan_mod
from cdcsync.core import verify_plan as vp
from cdcsync.core.events import TableId

T = TableId("public", "customers")
COLUMNS = {"id": "bigint", "email": "text", "status": "text", "amount": "integer", "legacy": "text"}
RAW: dict[str, Any] = {
    "tables": {
        "public.customers": {
            "filter": "NOT deleted",
            "columns": {
                "id": {"rename": "customer_id"},
                "email": {"rename": "email_address", "transform": ["trim", "lower"]},
                "status": {"transform": [{"map": {"A": "active", "B": "A"}}]},
                "amount": {"cast": "numeric(12,2)"},
                "legacy": {"drop": True},
            },
            "add": {"region": {"type": "text", "default": "'eu'"}},
        }
    }
}


def _mapping(reverse: bool = False) -> vp.Mapping:
    plan = plan_mod.parse(RAW).table(T)
    return vp.build(T, plan, COLUMNS, ("id",), reverse=reverse)


def test_no_plan_is_the_identity() -> None:
    m = vp.build(T, None, COLUMNS, ("id",))
    assert m.identity
    assert [(p.source, p.target, p.mapped) for p in m.pairs] == [(c, c, False) for c in COLUMNS]
    assert m.source_key == m.target_key == ("id",)
    assert m.source_where(None).as_string(None) == ""


def test_plan_pairs_columns_keys_and_filter() -> None:
    m = _mapping()
    assert not m.identity
    assert [(p.source, p.target) for p in m.pairs] == [
        ("id", "customer_id"),
        ("email", "email_address"),
        ("status", "status"),
        ("amount", "amount"),
    ]
    by = {p.source: p for p in m.pairs}
    assert by["amount"].cast and by["amount"].mapped
    assert by["id"].source_value.as_string(None) == '"id"'
    assert by["id"].target_value.as_string(None) == '"customer_id"'
    assert by["email"].source_value.as_string(None) == 'lower(btrim("email"))'
    assert by["amount"].source_value.as_string(None) == '("amount")::text::numeric(12,2)'
    assert m.source_key == ("id",) and m.target_key == ("customer_id",)
    assert m.source_where(None).as_string(None) == " WHERE (NOT deleted)"
    assert m.target_where(None).as_string(None) == ""
    assert m.added == (("region", "'eu'"),)
    assert any("legacy" in s for s in m.skipped)


def test_reverse_filters_both_sides_and_skips_what_cannot_round_trip() -> None:
    m = _mapping(reverse=True)
    # status maps B -> A and A -> active: applying it twice differs, so not compared.
    assert [p.target for p in m.pairs] == ["customer_id", "email_address", "amount"]
    assert m.uncompared == ("status",)
    assert m.target_filter is not None
    where = m.target_where(None).as_string(None)
    # The target's row under the source's names, cast back; transformed columns not offered.
    assert '"public"."customers"."customer_id" AS "id"' in where
    assert '("public"."customers"."amount")::text::integer AS "amount"' in where
    assert "email" not in where and "legacy" not in where
    assert "(NOT deleted)" in where


def test_dropped_key_column_is_refused() -> None:
    plan = plan_mod.TablePlan(T, columns={"id": plan_mod.ColumnPlan("id", drop=True)})
    with pytest.raises(ValueError, match="key column id"):
        vp.build(T, plan, COLUMNS, ("id",))


def test_where_clause_joins_parts() -> None:
    assert vp.where_clause(None, None).as_string(None) == ""
    assert vp.where_clause(sql.SQL("a"), None).as_string(None) == " WHERE a"
    assert vp.where_clause(sql.SQL("a"), sql.SQL("(b)")).as_string(None) == " WHERE a AND (b)"


VALUES = st.sampled_from(["A", "B", "C", "a", " a ", "", "x"])
STEPS = st.one_of(
    st.sampled_from([plan_mod.Transform(k) for k in ("trim", "lower", "upper")]),
    st.builds(
        lambda m: plan_mod.Transform("map", mapping=tuple(sorted(m.items()))),
        st.dictionaries(VALUES, st.one_of(st.none(), VALUES), min_size=1, max_size=4),
    ),
    st.builds(lambda d: plan_mod.Transform("default_if_null", default=d), VALUES),
)


def _apply(chain: list[plan_mod.Transform], value: str | None) -> str | None:
    """What the SQL of each step computes, for ASCII text (btrim trims spaces)."""
    for step in chain:
        if value is None and step.kind != "default_if_null":
            continue
        if step.kind == "trim":
            value = value.strip(" ") if value is not None else None
        elif step.kind == "lower":
            value = value.lower() if value is not None else None
        elif step.kind == "upper":
            value = value.upper() if value is not None else None
        elif step.kind == "map":
            value = dict(step.mapping).get(value, value) if value is not None else None
        else:
            value = step.default if value is None else value
    return value


@given(st.lists(STEPS, min_size=1, max_size=3), st.one_of(st.none(), VALUES))
def test_chains_shown_idempotent_are_idempotent(
    chain: list[plan_mod.Transform], value: str | None
) -> None:
    if vp.idempotent(chain):
        once = _apply(chain, value)
        assert _apply(chain, once) == once


def test_known_chains() -> None:
    t = plan_mod.Transform
    assert vp.idempotent([t("trim"), t("lower")])
    assert not vp.idempotent([t("lower"), t("upper")])
    assert vp.idempotent([t("map", mapping=(("A", "active"), ("I", "inactive")))])
    assert not vp.idempotent([t("map", mapping=(("A", "B"), ("B", "C")))])
    assert vp.idempotent(
        [t("map", mapping=(("A", "active"),)), t("default_if_null", default="unknown")]
    )
    assert not vp.idempotent([t("map", mapping=(("u", "v"),)), t("default_if_null", default="u")])
    assert not vp.idempotent([t("lower"), t("default_if_null", default="X")])


def test_a_renamed_table_is_read_on_the_target_under_its_new_name() -> None:
    moved = TableId("crm", "clients")
    only_renamed = plan_mod.parse({"tables": {"public.customers": {"rename": "crm.clients"}}})
    m = vp.build(T, only_renamed.table(T), COLUMNS, ("id",))
    assert not m.identity, "a renamed table is not compared under its source name"
    assert (m.table, m.target_table) == (T, moved)
    assert [(p.source, p.target, p.mapped) for p in m.pairs] == [(c, c, False) for c in COLUMNS]
    raw = {
        "tables": {
            "public.customers": {**RAW["tables"]["public.customers"], "rename": "crm.clients"}
        }
    }
    m = vp.build(T, plan_mod.parse(raw).table(T), COLUMNS, ("id",), reverse=True)
    assert m.target_table == moved
    assert m.target_filter is not None
    text = m.target_filter.as_string(None)
    assert '"crm"."clients"."customer_id" AS "id"' in text
    assert '"public"."customers"' not in text
    assert vp.build(T, None, COLUMNS, ("id",)).target_table == T
