"""The DDL that reproduces a source column on the target, and the missing-value parser."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdcsync.adapters.schema_follow import (
    ColumnNotAddable,
    SourceColumn,
    parse_single_element,
    statements,
)
from cdcsync.core.events import TableId

T = TableId("public", "Items")


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_quoted_elements_round_trip(value: str) -> None:
    assert parse_single_element("{" + _quote(value) + "}") == value


def test_plain_and_null_elements() -> None:
    assert parse_single_element("{5}") == "5"
    assert parse_single_element("{NULL}") is None
    assert parse_single_element('{"NULL"}') == "NULL"
    with pytest.raises(ValueError):
        parse_single_element("5")


def _text(col: SourceColumn, populated: bool = True) -> list[str]:
    return [s.as_string(None) for s in statements(T, col, populated)]


def test_missing_value_then_default_then_not_null() -> None:
    col = SourceColumn("note", "text", True, "'n/a'::text", "n/a", True, False)
    assert _text(col) == [
        """ALTER TABLE "public"."Items" ADD COLUMN IF NOT EXISTS "note" text DEFAULT 'n/a'::text""",
        """ALTER TABLE "public"."Items" ALTER COLUMN "note" SET DEFAULT 'n/a'::text""",
        """ALTER TABLE "public"."Items" ALTER COLUMN "note" SET NOT NULL""",
    ]


def test_plain_nullable_column() -> None:
    col = SourceColumn("price", "numeric(10,2)", False, None, None, False, False)
    assert _text(col) == [
        'ALTER TABLE "public"."Items" ADD COLUMN IF NOT EXISTS "price" numeric(10,2)'
    ]


def test_rewritten_rows_and_generated_columns_refuse() -> None:
    volatile = SourceColumn("r", "double precision", False, "random()", None, False, False)
    with pytest.raises(ColumnNotAddable, match="rewrote the existing rows"):
        statements(T, volatile, populated=True)
    assert statements(T, volatile, populated=False)  # an empty table has no old rows
    generated = SourceColumn("g", "integer", False, None, None, False, True)
    with pytest.raises(ColumnNotAddable, match="generated"):
        statements(T, generated, populated=False)
