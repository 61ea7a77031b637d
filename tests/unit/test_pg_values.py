"""Schema-driven conversion of Debezium values to PostgreSQL text input form."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdcsync.core.events import UNAVAILABLE
from cdcsync.core.pg_values import (
    PLACEHOLDER,
    civil_from_days,
    convert,
    format_timestamp_us,
    iso_zoned,
)
from cdcsync.errors import DecodeError

EPOCH = dt.date(1970, 1, 1)


def schema(kind: str, name: str | None = None, stype: str = "", **params: str) -> dict[str, Any]:
    p = {"__debezium.source.column.type": stype, **params} if stype else dict(params)
    return {"type": kind, "name": name, "optional": True, "parameters": p}


@given(st.dates(min_value=dt.date(1, 1, 1), max_value=dt.date(9999, 12, 31)))
def test_civil_from_days_matches_python(day: dt.date) -> None:
    assert civil_from_days((day - EPOCH).days) == (day.year, day.month, day.day)


@given(st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31)))
def test_microtimestamp_matches_python(moment: dt.datetime) -> None:
    micros = (moment - dt.datetime(1970, 1, 1)) // dt.timedelta(microseconds=1)
    text = convert(micros, schema("int64", "io.debezium.time.MicroTimestamp", "TIMESTAMP"), "f")
    assert text.value == moment.strftime("%Y-%m-%d %H:%M:%S.%f").rjust(26, "0")


def test_bc_and_infinite_timestamps() -> None:
    # 0001-01-01 BC is year 0 astronomically: one day before 0001-01-01 AD.
    one_ad = (dt.datetime(1, 1, 1) - dt.datetime(1970, 1, 1)) // dt.timedelta(microseconds=1)
    assert format_timestamp_us(one_ad - 86_400_000_000) == "0001-12-31 00:00:00.000000 BC"
    assert format_timestamp_us(9_223_372_036_825_200_000) == "infinity"
    assert format_timestamp_us(-9_223_372_036_832_400_000) == "-infinity"
    assert iso_zoned("-0043-03-15T12:00:00Z") == "0044-03-15T12:00:00Z BC"
    assert iso_zoned("infinity") == "infinity"


@given(st.integers(1, 64), st.data())
def test_bits_roundtrip(length: int, data: st.DataObject) -> None:
    bits = data.draw(st.text(alphabet="01", min_size=length, max_size=length))
    raw = int(bits, 2).to_bytes((length + 7) // 8, "little")
    trimmed = raw.rstrip(b"\x00") or b""
    encoded = base64.b64encode(trimmed).decode()
    out = convert(encoded, schema("bytes", "io.debezium.data.Bits", "BIT", length=str(length)), "f")
    assert out.value == bits


@pytest.mark.parametrize(
    ("value", "sch", "expected"),
    [
        ("NAN", schema("string", None, "NUMERIC"), "NaN"),
        ("POSITIVE_INFINITY", schema("string", None, "NUMERIC"), "Infinity"),
        ("12.3400", schema("string", None, "NUMERIC"), "12.3400"),
        ("00ff", schema("string", None, "BYTEA"), "\\x00ff"),
        ("", schema("string", None, "BYTEA"), "\\x"),
        ("2831292c283029", schema("string", None, "BOX"), "(1),(0)"),
        (86_400_000_000, schema("int64", "io.debezium.time.MicroTime", "TIME"), "24:00:00.000000"),
        (19782, schema("int32", "io.debezium.time.Date", "DATE"), "2024-02-29"),
        ("NaN", schema("float", None, "FLOAT4"), "NaN"),
        ("2.5E300", schema("double", None, "FLOAT8"), "2.5E300"),
        (True, schema("boolean", None, "BOOL"), "t"),
        (
            {"x": "1.5", "y": "-2"},
            schema("struct", "io.debezium.data.geometry.Point", "POINT"),
            "(1.5,-2)",
        ),
    ],
)
def test_conversions(value: Any, sch: dict[str, Any], expected: str) -> None:
    out = convert(value, sch, "f")
    assert out.exact and out.value == expected


@pytest.mark.parametrize(
    ("value", "sch"),
    [
        ("02:59:00Z", schema("string", "io.debezium.time.ZonedTime", "TIMETZ")),
        ([1, None], schema("array", None, "_INT4")),
        (None, {"type": "string", "optional": False, "parameters": {}}),
        (None, schema("int32", "io.debezium.time.Date", "DATE")),
        (2_000_000_000, schema("int32", "io.debezium.time.Date", "DATE")),
        ("abcd", schema("string", None, "MYCOMPOSITE")),
    ],
)
def test_values_the_event_cannot_carry_are_inexact(value: Any, sch: dict[str, Any]) -> None:
    assert not convert(value, sch, "f").exact


def test_placeholder_is_unavailable() -> None:
    assert convert(PLACEHOLDER, schema("string", None, "TEXT"), "f").value is UNAVAILABLE
    assert convert(PLACEHOLDER, schema("string", None, "BYTEA"), "f").value is UNAVAILABLE


def test_wrong_json_types_name_the_field() -> None:
    with pytest.raises(DecodeError, match=r"after\.n"):
        convert(1.5, schema("string", None, "TEXT"), "after.n")
    with pytest.raises(DecodeError, match=r"after\.b"):
        convert("zz", schema("string", None, "BYTEA"), "after.b")


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (-62135596800000000, "0001-01-01 00:00:00.000000"),
        (-62135596800000001, "0001-12-31 23:59:59.999999 BC"),
        (253402300799999999, "9999-12-31 23:59:59.999999"),
        (253402300800000000, "10000-01-01 00:00:00.000000"),
        (-1, "1969-12-31 23:59:59.999999"),
    ],
)
def test_timestamp_formatting_at_the_edges_of_the_fast_path(micros: int, text: str) -> None:
    assert format_timestamp_us(micros) == text
