"""Avro events decode to exactly the events their JSON twins decode to, or to DecodeError.

Each case builds one change event twice, independently: as Connect's JSON converter
writes it (schema embedded, bytes as base64) and as the Avro converter writes it (a
writer schema with ``connect.*`` annotations, Confluent framing, fastavro's encoding).
"""

from __future__ import annotations

import base64
import io
import json
import math
import struct
from decimal import Decimal
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cdcsync.core.avro_decode import (
    AvroDecoder,
    WriterSchema,
    _body_reader,
    float32_text,
    unescape_name,
)
from cdcsync.core.debezium import Decoder
from cdcsync.core.events import Heartbeat, Position, RowChange, Tombstone
from cdcsync.errors import DecodeError, HaltedError

PREFIX = "av"
TOPIC = f"{PREFIX}.public.things"
_F32 = struct.Struct("<f")


def avro_escape(name: str) -> str:
    """The connector's field-name escaping (avro_unicode), written from its description."""
    out = []
    for i, ch in enumerate(name):
        ok = ch.isascii() and (ch.isalpha() or (i > 0 and ch.isdigit()))
        if ok:
            out.append(ch)
            continue
        units = ch.encode("utf-16-be")
        for j in range(0, len(units), 2):
            out.append(f"_u{int.from_bytes(units[j : j + 2], 'big'):04x}")
    return "".join(out)


# ------------------------------------------------------------------ column kinds
# Each kind: (Avro type as the Avro converter writes it, JSON converter schema,
# strategy of Python values for the Avro writer, value → JSON payload form).


def _params(pg: str) -> dict[str, str]:
    return {"__debezium.source.column.type": pg}


def _double_json(x: float) -> Any:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def _f32(x: float) -> float:
    """``x`` rounded to a 32-bit float (infinity past the largest one)."""
    try:
        return float(_F32.unpack(_F32.pack(x))[0])
    except OverflowError:
        return math.copysign(math.inf, x)


_text = st.text(st.characters(codec="utf-8"), max_size=20)
_POINT_AVRO = {
    "type": "record",
    "name": "Point",
    "namespace": "io.debezium.data.geometry",
    "fields": [
        {"name": "x", "type": "double"},
        {"name": "y", "type": "double"},
        {"name": "wkb", "type": ["null", "bytes"], "default": None},
        {"name": "srid", "type": ["null", "int"], "default": None},
    ],
    "connect.version": 1,
    "connect.doc": "Geometry (POINT)",
    "connect.name": "io.debezium.data.geometry.Point",
}
_POINT_JSON = {
    "type": "struct",
    "name": "io.debezium.data.geometry.Point",
    "version": 1,
    "fields": [
        {"field": "x", "type": "double", "optional": False},
        {"field": "y", "type": "double", "optional": False},
        {"field": "wkb", "type": "bytes", "optional": True},
        {"field": "srid", "type": "int32", "optional": True},
    ],
}
_finite = st.floats(allow_nan=False, allow_infinity=False)

KINDS: dict[str, tuple[dict[str, Any], dict[str, Any], st.SearchStrategy[Any], Any]] = {
    "int4": (
        {"type": "int", "connect.parameters": _params("INT4")},
        {"type": "int32", "parameters": _params("INT4")},
        st.integers(-(2**31), 2**31 - 1),
        lambda v: v,
    ),
    "int2": (
        {"type": "int", "connect.type": "int16"},
        {"type": "int16"},
        st.integers(-(2**15), 2**15 - 1),
        lambda v: v,
    ),
    "int8": ({"type": "long"}, {"type": "int64"}, st.integers(-(2**63), 2**63 - 1), lambda v: v),
    "text": (
        {"type": "string", "connect.parameters": _params("TEXT")},
        {"type": "string", "parameters": _params("TEXT")},
        _text,
        lambda v: v,
    ),
    "numeric": (
        {"type": "string", "connect.parameters": _params("NUMERIC")},
        {"type": "string", "parameters": _params("NUMERIC")},
        st.one_of(
            st.decimals(allow_nan=False, allow_infinity=False).map(str),
            st.sampled_from(["NAN", "POSITIVE_INFINITY", "NEGATIVE_INFINITY"]),
        ),
        lambda v: v,
    ),
    "bool": ({"type": "boolean"}, {"type": "boolean"}, st.booleans(), lambda v: v),
    "float8": (
        {"type": "double"},
        {"type": "double"},
        st.floats(),
        _double_json,
    ),
    "float4": (
        {"type": "float"},
        {"type": "float"},
        st.floats(width=32),
        lambda v: _double_json(v) if not math.isfinite(v) else float(float32_text(v)),
    ),
    "date": (
        {"type": "int", "connect.version": 1, "connect.name": "io.debezium.time.Date"},
        {"type": "int32", "name": "io.debezium.time.Date", "version": 1},
        st.integers(-3_000_000, 3_000_000),
        lambda v: v,
    ),
    "timestamp": (
        {"type": "long", "connect.version": 1, "connect.name": "io.debezium.time.MicroTimestamp"},
        {"type": "int64", "name": "io.debezium.time.MicroTimestamp", "version": 1},
        st.integers(-(2**62), 2**62),
        lambda v: v,
    ),
    "timestamptz": (
        {"type": "string", "connect.version": 1, "connect.name": "io.debezium.time.ZonedTimestamp"},
        {"type": "string", "name": "io.debezium.time.ZonedTimestamp", "version": 1},
        st.sampled_from(["2024-02-29T07:04:56.789012Z", "infinity", "-infinity"]),
        lambda v: v,
    ),
    "bytea": (
        {"type": "string", "connect.parameters": _params("BYTEA")},
        {"type": "string", "parameters": _params("BYTEA")},
        st.binary(max_size=16).map(bytes.hex),
        lambda v: v,
    ),
    "bit": (
        {
            "type": "bytes",
            "connect.version": 1,
            "connect.parameters": {"length": "12", **_params("BIT")},
            "connect.name": "io.debezium.data.Bits",
        },
        {
            "type": "bytes",
            "name": "io.debezium.data.Bits",
            "version": 1,
            "parameters": {"length": "12", **_params("BIT")},
        },
        st.integers(0, 4095).map(lambda n: n.to_bytes(2, "little").rstrip(b"\0")),
        lambda v: base64.b64encode(v).decode(),
    ),
    "point": (
        _POINT_AVRO,
        _POINT_JSON,
        st.fixed_dictionaries({"x": _finite, "y": _finite, "wkb": st.none(), "srid": st.none()}),
        lambda v: {**v, "x": v["x"], "y": v["y"]},
    ),
}

_name_chars = st.characters(codec="utf-8", exclude_characters="\0").filter(
    lambda c: ord(c) < 0x100 or ord(c) >= 0x1000
)
column_names = st.text(_name_chars, min_size=1, max_size=8)


@st.composite
def tables(draw: st.DrawFn) -> list[tuple[str, str, bool]]:
    """(column name, kind, optional) for a table keyed by ``id``."""
    names = draw(st.lists(column_names, min_size=1, max_size=5, unique_by=avro_escape))
    names = [n for n in names if n != "id" and avro_escape(n) != "id"]
    return [(n, draw(st.sampled_from(sorted(KINDS))), draw(st.booleans())) for n in names]


# -------------------------------------------------------------- message builders
_SOURCE_AVRO = {
    "type": "record",
    "name": "Source",
    "namespace": "io.debezium.connector.postgresql",
    "fields": [
        {"name": "version", "type": "string"},
        {"name": "connector", "type": "string"},
        {"name": "name", "type": "string"},
        {"name": "ts_ms", "type": "long"},
        {
            "name": "snapshot",
            "type": [
                {
                    "type": "string",
                    "connect.version": 1,
                    "connect.parameters": {"allowed": "true,first,last,false,incremental"},
                    "connect.default": "false",
                    "connect.name": "io.debezium.data.Enum",
                },
                "null",
            ],
            "default": "false",
        },
        {"name": "db", "type": "string"},
        {"name": "schema", "type": "string"},
        {"name": "table", "type": "string"},
        {"name": "txId", "type": ["null", "long"], "default": None},
        {"name": "lsn", "type": ["null", "long"], "default": None},
    ],
    "connect.name": "io.debezium.connector.postgresql.Source",
}
_SOURCE_JSON = {
    "type": "struct",
    "name": "io.debezium.connector.postgresql.Source",
    "optional": False,
    "field": "source",
    "fields": [
        {"field": "version", "type": "string", "optional": False},
        {"field": "connector", "type": "string", "optional": False},
        {"field": "name", "type": "string", "optional": False},
        {"field": "ts_ms", "type": "int64", "optional": False},
        {
            "field": "snapshot",
            "type": "string",
            "optional": True,
            "name": "io.debezium.data.Enum",
            "version": 1,
            "parameters": {"allowed": "true,first,last,false,incremental"},
            "default": "false",
        },
        {"field": "db", "type": "string", "optional": False},
        {"field": "schema", "type": "string", "optional": False},
        {"field": "table", "type": "string", "optional": False},
        {"field": "txId", "type": "int64", "optional": True},
        {"field": "lsn", "type": "int64", "optional": True},
    ],
}
SOURCE = {
    "version": "3.5.0.Final",
    "connector": "postgresql",
    "name": PREFIX,
    "ts_ms": 1_700_000_000_000,
    "snapshot": "false",
    "db": "src",
    "schema": "public",
    "table": "things",
    "txId": 771,
    "lsn": 123456,
}


def _optional_avro(spec: Any, optional: bool) -> Any:
    return ["null", spec] if optional else spec


def schemas(columns: list[tuple[str, str, bool]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Avro writer schema, JSON converter schema) of the envelope and of the key."""
    avro_fields: list[dict[str, Any]] = [{"name": "id", "type": "long"}]
    json_fields: list[dict[str, Any]] = [{"field": "id", "type": "int64", "optional": False}]
    defined: set[str] = set()
    for name, kind, optional in columns:
        avro_type, json_type, _, _ = KINDS[kind]
        if avro_type.get("type") == "record":
            # A named type is defined once; later uses refer to it by its full name.
            full = f"{avro_type['namespace']}.{avro_type['name']}"
            avro_type = full if full in defined else avro_type  # type: ignore[assignment]
            defined.add(full)
        field: dict[str, Any] = {"name": avro_escape(name)}
        field["type"] = _optional_avro(avro_type, optional)
        if optional:
            field["default"] = None
        avro_fields.append(field)
        json_fields.append({"field": name, **json_type, "optional": optional})
    row_avro = {
        "type": "record",
        "name": "Value",
        "namespace": TOPIC,
        "fields": avro_fields,
        "connect.name": f"{TOPIC}.Value",
    }
    envelope_avro = {
        "type": "record",
        "name": "Envelope",
        "namespace": TOPIC,
        "fields": [
            {"name": "before", "type": ["null", row_avro], "default": None},
            {"name": "after", "type": ["null", "Value"], "default": None},
            {"name": "source", "type": _SOURCE_AVRO},
            {"name": "op", "type": "string"},
            {"name": "ts_ms", "type": ["null", "long"], "default": None},
        ],
        "connect.version": 2,
        "connect.name": f"{TOPIC}.Envelope",
    }
    row_json = {"type": "struct", "fields": json_fields, "optional": True, "name": f"{TOPIC}.Value"}
    envelope_json = {
        "type": "struct",
        "name": f"{TOPIC}.Envelope",
        "version": 2,
        "optional": False,
        "fields": [
            {**row_json, "field": "before"},
            {**row_json, "field": "after"},
            _SOURCE_JSON,
            {"field": "op", "type": "string", "optional": False},
            {"field": "ts_ms", "type": "int64", "optional": True},
        ],
    }
    return envelope_avro, envelope_json


KEY_AVRO = {
    "type": "record",
    "name": "Key",
    "namespace": TOPIC,
    "fields": [{"name": "id", "type": "long"}],
    "connect.name": f"{TOPIC}.Key",
}
KEY_JSON = {
    "type": "struct",
    "name": f"{TOPIC}.Key",
    "optional": False,
    "fields": [{"field": "id", "type": "int64", "optional": False}],
}


def framed(schema_id: int, schema: dict[str, Any], record: Any) -> bytes:
    buffer = io.BytesIO()
    buffer.write(b"\0" + schema_id.to_bytes(4, "big"))
    schemaless_writer(buffer, parse_schema(schema), record)
    return buffer.getvalue()


def json_message(schema: dict[str, Any], payload: Any) -> bytes:
    return json.dumps({"schema": schema, "payload": payload}).encode()


class Registry:
    """Schemas by id, as a registry would serve them."""

    def __init__(self) -> None:
        self.by_id: dict[int, str] = {}
        self.asked: list[int] = []

    def add(self, schema_id: int, schema: dict[str, Any]) -> None:
        self.by_id[schema_id] = json.dumps(schema)

    def __call__(self, schema_id: int) -> str:
        self.asked.append(schema_id)
        if schema_id not in self.by_id:
            raise DecodeError(f"schema id {schema_id} is not in the registry")
        return self.by_id[schema_id]


def twins(
    columns: list[tuple[str, str, bool]], rows: list[dict[str, Any] | None], op: str
) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes], Registry]:
    """The same event as (key, value) in Avro and in JSON, and the registry it needs."""
    envelope_avro, envelope_json = schemas(columns)
    before, after = rows
    registry = Registry()
    registry.add(1, KEY_AVRO)
    registry.add(2, envelope_avro)

    def avro_row(row: dict[str, Any] | None) -> Any:
        if row is None:
            return None
        return {"id": row["id"], **{avro_escape(n): row[n] for n, _, _ in columns}}

    def json_row(row: dict[str, Any] | None) -> Any:
        if row is None:
            return None
        out = {"id": row["id"]}
        for name, kind, _ in columns:
            out[name] = None if row[name] is None else KINDS[kind][3](row[name])
        return out

    key_id = (after or before or {"id": 0})["id"]
    value = {"before": None, "after": None, "source": SOURCE, "op": op, "ts_ms": 1}
    avro = (
        framed(1, KEY_AVRO, {"id": key_id}),
        framed(2, envelope_avro, {**value, "before": avro_row(before), "after": avro_row(after)}),
    )
    js = (
        json_message(KEY_JSON, {"id": key_id}),
        json_message(
            envelope_json, {**value, "before": json_row(before), "after": json_row(after)}
        ),
    )
    return avro, js, registry


@st.composite
def rows_for(draw: st.DrawFn, columns: list[tuple[str, str, bool]]) -> dict[str, Any]:
    row: dict[str, Any] = {"id": draw(st.integers(-(2**63), 2**63 - 1))}
    for name, kind, optional in columns:
        value = draw(KINDS[kind][2])
        row[name] = None if optional and draw(st.booleans()) else value
    return row


# ------------------------------------------------------------------------ tests
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), columns=tables(), op=st.sampled_from(["c", "r", "u", "d"]))
def test_avro_event_equals_its_json_twin(
    data: st.DataObject, columns: list[tuple[str, str, bool]], op: str
) -> None:
    row = data.draw(rows_for(columns))
    before = row if op in ("u", "d") else None
    after = None if op == "d" else {**data.draw(rows_for(columns)), "id": row["id"]}
    if op == "u":
        after = {**(after or {}), "id": row["id"]}
    (akey, avalue), (jkey, jvalue), registry = twins(columns, [before, after], op)
    expected = Decoder().decode(TOPIC, 3, 9, jkey, jvalue, topic_prefix=PREFIX)
    decoder = AvroDecoder(registry)
    got = decoder.decode(TOPIC, 3, 9, akey, avalue, topic_prefix=PREFIX)
    assert got == expected
    # The compiled shortcut read it, and the payload path alone agrees.
    assert decoder.payload_path == 0
    reference = AvroDecoder(registry, shortcut=False)
    assert reference.decode(TOPIC, 3, 9, akey, avalue, topic_prefix=PREFIX) == expected
    assert isinstance(got, RowChange)
    assert [c.name for c in got.columns] == ["id", *[n for n, _, _ in columns]]


def test_schemas_are_fetched_once_per_id() -> None:
    columns = [("Mixed Case", "text", True), ("a_b", "int4", False)]
    row = {"id": 5, "Mixed Case": "x", "a_b": 1}
    (key, value), _, registry = twins(columns, [None, row], "c")
    decoder = AvroDecoder(registry)
    for offset in range(5):
        event = decoder.decode(TOPIC, 0, offset, key, value, topic_prefix=PREFIX)
        assert isinstance(event, RowChange)
        assert event.after == {"id": "5", "Mixed Case": "x", "a_b": "1"}
    assert sorted(registry.asked) == [1, 2]


def test_tombstone_and_heartbeat() -> None:
    registry = Registry()
    beat = {
        "type": "record",
        "name": "PartitionValue",
        "namespace": "io.debezium.connector.common.Heartbeat",
        "fields": [{"name": "ts_ms", "type": "long"}],
    }
    registry.add(7, beat)
    decoder = AvroDecoder(registry)
    tombstone = decoder.decode(TOPIC, 0, 1, b"\0\0\0\0\1", None, topic_prefix=PREFIX)
    assert tombstone == Tombstone(Position(TOPIC, 0, 1))
    topic = f"__debezium-heartbeat.{PREFIX}"
    event = decoder.decode(topic, 0, 2, None, framed(7, beat, {"ts_ms": 42}), topic_prefix=PREFIX)
    assert isinstance(event, Heartbeat) and event.ts_ms == 42


def test_bad_magic_byte_unknown_id_and_registry_down_are_named() -> None:
    columns = [("v", "text", True)]
    (key, value), (jkey, jvalue), registry = twins(columns, [None, {"id": 1, "v": "x"}], "c")
    decoder = AvroDecoder(registry)
    with pytest.raises(DecodeError, match="magic byte 0 \\(got 0x7b\\)"):
        decoder.decode(TOPIC, 0, 1, jkey, jvalue, topic_prefix=PREFIX)
    unknown = value[:1] + (99).to_bytes(4, "big") + value[5:]
    with pytest.raises(DecodeError, match="schema id 99"):
        decoder.decode(TOPIC, 0, 1, key, unknown, topic_prefix=PREFIX)
    with pytest.raises(DecodeError, match="bytes after its Avro record"):
        decoder.decode(TOPIC, 0, 1, key, value + b"\0", topic_prefix=PREFIX)

    def down(schema_id: int) -> str:
        raise HaltedError(f"registry did not answer for schema id {schema_id}")

    with pytest.raises(HaltedError, match=r"things\[4\] at offset 17: registry did not answer"):
        AvroDecoder(down).decode(TOPIC, 4, 17, key, value, topic_prefix=PREFIX)


@settings(max_examples=300, deadline=None)
@given(
    key=st.none() | st.binary(max_size=40),
    value=st.none() | st.binary(max_size=80),
    schema_id=st.sampled_from([1, 2, 3]),
    mutate=st.booleans(),
)
def test_any_bytes_decode_or_raise_decode_error(
    key: bytes | None, value: bytes | None, schema_id: int, mutate: bool
) -> None:
    columns = [("v", "text", True), ("n", "float8", False), ("b", "bit", True)]
    (good_key, good_value), _, registry = twins(
        columns, [None, {"id": 1, "v": "x", "n": 1.5, "b": b"\1"}], "c"
    )
    registry.add(3, {"type": "record", "name": "X", "fields": [{"name": "q", "type": "int"}]})
    if mutate and value is not None:
        # A valid frame around random or truncated bodies reaches the Avro reader.
        value = b"\0" + schema_id.to_bytes(4, "big") + (value or good_value[5:])[: len(value)]
    outcomes = []
    for shortcut in (True, False):
        decoder = AvroDecoder(registry, shortcut=shortcut)
        try:
            event = decoder.decode(TOPIC, 0, 0, key or good_key, value, topic_prefix=PREFIX)
            outcomes.append(repr(event))
        except DecodeError as exc:
            outcomes.append(f"DecodeError: {exc}")
    # The shortcut gives the payload path's event, or its very error.
    assert outcomes[0] == outcomes[1]


@example(3.4025001647762064e38)  # rounding to fewer digits passes the largest float32
@given(st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_float32_text_is_the_shortest_exact_text(x: float) -> None:
    text = float32_text(x)
    assert _f32(float(text)) == x
    digits = len(Decimal(text).normalize().as_tuple().digits)
    # No text with fewer significant digits reads back as the same float.
    assert all(_f32(float(f"{x:.{p}g}")) != x for p in range(1, digits))


@given(column_names)
def test_escaped_names_come_back(name: str) -> None:
    assert unescape_name(avro_escape(name)) == name


def test_envelope_names_without_escapes_stay() -> None:
    for name in ("ts_ms", "ts_us", "txId", "total_order", "data_collection_order"):
        assert unescape_name(name) == name
    assert unescape_name("Mixed_u0020Case") == "Mixed Case"
    assert unescape_name("a_u005fb") == "a_b"
    assert unescape_name("_ud83d_ude00") == "\U0001f600"


# ------------------------------------------------------------ compiled reader
_SHAPES = {
    "type": "record",
    "name": "Shapes",
    "namespace": "ns",
    "fields": [
        {"name": "b", "type": "boolean"},
        {"name": "i", "type": {"type": "int", "connect.type": "int16"}},
        {"name": "l", "type": ["null", "long"]},
        {"name": "f", "type": "float"},
        {"name": "d", "type": ["double", "null"]},
        {"name": "s", "type": "string"},
        {"name": "y", "type": "bytes"},
        {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["A", "B", "C"]}},
        {"name": "x", "type": {"type": "fixed", "name": "F", "size": 3}},
        {"name": "a", "type": {"type": "array", "items": ["null", "string"]}},
        {"name": "m", "type": {"type": "map", "values": "E"}},
        {"name": "u", "type": ["null", "long", "string"]},
        {
            "name": "n",
            "type": [
                "null",
                {
                    "type": "record",
                    "name": "Node",
                    "fields": [
                        {"name": "v", "type": "long"},
                        {"name": "next", "type": ["null", "Node"]},
                    ],
                },
            ],
        },
        {"name": "again", "type": ["null", "F"]},
    ],
}
_longs = st.integers(-(2**63), 2**63 - 1)
_nodes = st.recursive(
    st.none(), lambda inner: st.fixed_dictionaries({"v": _longs, "next": inner}), max_leaves=4
)
_shape_values = st.fixed_dictionaries(
    {
        "b": st.booleans(),
        "i": st.integers(-(2**15), 2**15 - 1),
        "l": st.none() | _longs,
        "f": st.floats(width=32),
        "d": st.none() | st.floats(),
        "s": _text,
        "y": st.binary(max_size=12),
        "e": st.sampled_from(["A", "B", "C"]),
        "x": st.binary(min_size=3, max_size=3),
        "a": st.lists(st.none() | _text, max_size=3),
        "m": st.dictionaries(_text, st.sampled_from(["A", "C"]), max_size=3),
        "u": st.none() | _longs | _text,
        "n": _nodes,
        "again": st.none() | st.binary(min_size=3, max_size=3),
    }
)


@settings(max_examples=200, deadline=None)
@given(record=_shape_values, cut=st.integers(0, 400), flip=st.integers(0, 400))
def test_compiled_reader_reads_what_fastavro_reads(record: Any, cut: int, flip: int) -> None:
    """Whole: the same values; truncated or with a byte changed: the same, or it raises."""
    schema = WriterSchema(5, parse_schema(_SHAPES), {}, lambda v: v)
    read = _body_reader(schema)
    assert read is not None
    data = framed(5, _SHAPES, record)

    def fastavro_read(data: bytes) -> Any:
        buffer = io.BytesIO(data[5:])
        got = schemaless_reader(buffer, schema.parsed, None)
        assert buffer.tell() == len(data) - 5
        return got

    assert repr(read(data)) == repr(fastavro_read(data))
    damaged = bytearray(data[: 5 + cut % max(1, len(data) - 5)])
    if len(damaged) > 5:
        damaged[5 + flip % (len(damaged) - 5)] ^= 0x5A
    try:
        mine = repr(read(bytes(damaged)))
    except Exception:
        return  # the decoder then asks fastavro, through the payload path
    assert mine == repr(fastavro_read(bytes(damaged)))


def test_projection_keeps_only_the_members_asked_for() -> None:
    schema = WriterSchema(5, parse_schema(_SHAPES), {}, lambda v: v)
    record = {
        "b": True,
        "i": 1,
        "l": 2,
        "f": 0.5,
        "d": None,
        "s": "é",
        "y": b"",
        "e": "B",
        "x": b"abc",
        "a": ["q", None],
        "m": {"k": "C"},
        "u": "t",
        "n": {"v": 3, "next": {"v": 4, "next": None}},
        "again": b"xyz",
    }
    read = _body_reader(schema, {"s": True, "n": {"v": True}, "u": True})
    assert read is not None
    assert read(framed(5, _SHAPES, record)) == {"s": "é", "u": "t", "n": {"v": 3}}
