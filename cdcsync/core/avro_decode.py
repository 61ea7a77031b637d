"""Decode Debezium events written by an Avro converter, with the JSON path's fidelity.

The converter frames each key and value as magic byte ``0``, a 4-byte big-endian schema
id and the Avro body (Confluent's wire format). The writer schema carries Connect's
schema in annotations (``connect.name``, ``connect.parameters``, ``connect.type``), so
each schema is translated once into the Connect schema the JSON converter would have
embedded, and each record into the payload the JSON converter would have written: bytes
as base64, floats as their shortest exact text. From there the JSON decoder's own code
(:class:`cdcsync.core.debezium.Decoder`) decides everything, so both formats yield the
same events, value for value.

That payload path is the reference. Row changes take a shortcut compiled once per
schema id: a reader generated from the schema reads the Avro bytes by index (fastavro
reads each primitive through a file object, most of its cost), keeping only what an
event uses, and each column's Avro value goes straight to the JSON path's converter
(with the payload transform fused in where one is needed). Whatever the shortcut does
not handle exactly as the payload path would (truncates, logical messages, odd schemas,
any error) is decoded by the payload path, which also words every error.

Avro names allow only letters, digits and ``_``; the connector escapes other characters
(and ``_`` itself) as ``_uXXXX``, which is undone here. Debezium writes code points
0x100–0xFFF with three hex digits, which the reverse mapping cannot tell apart from a
four-digit escape followed by a hex letter: such a column gets a wrong name, which the
target rejects loudly rather than silently.

Only :class:`DecodeError` (bad input) and :class:`HaltedError` (the schema source could
not answer: the registry is down, not the message bad) leave :meth:`AvroDecoder.decode`.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastavro import parse_schema, schemaless_reader

from cdcsync.core.debezium import (
    _NONE_INEXACT,
    _OPS,
    HEARTBEAT_TOPIC_PREFIX,
    MAX_MESSAGE_BYTES,
    Decoder,
    _KeyPlan,
    _RowPlan,
    _source,
    _ValuePlan,
)
from cdcsync.core.events import (
    UNAVAILABLE,
    Column,
    Event,
    Heartbeat,
    Op,
    Position,
    RowChange,
    SourceInfo,
    Value,
)
from cdcsync.core.pg_values import INEXACT_MARK, Converter
from cdcsync.errors import DecodeError, HaltedError

MAGIC = 0
HEADER_BYTES = 5

#: Schema id → the writer schema's JSON text. Raises :class:`DecodeError` for an id the
#: registry does not know, :class:`HaltedError` when it cannot be asked.
SchemaSource = Callable[[int], str]

_ESCAPE = re.compile(r"_u([0-9a-fA-F]{4})")
_CACHE_LIMIT = 4096
_FLOAT = struct.Struct("<f")


def unescape_name(name: str) -> str:
    """Undo the connector's ``_uXXXX`` escapes (UTF-16 units, as Java writes them)."""
    if "_u" not in name:
        return name
    text = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), name)
    # Characters beyond the BMP were escaped as two surrogates: join them.
    return text.encode("utf-16", "surrogatepass").decode("utf-16")


def double_text(value: float) -> str:
    """A double as the JSON converter's text means it: exact, NaN/Infinity as words."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(value)


def float32_text(value: float) -> str:
    """The shortest text that reads back as the same 32-bit float (as Java prints it)."""
    if math.isnan(value) or math.isinf(value):
        return double_text(value)
    for digits in range(1, 10):
        text = f"{value:.{digits}g}"
        try:
            if _FLOAT.unpack(_FLOAT.pack(float(text)))[0] == value:
                return repr(float(text))
        except OverflowError:
            continue  # rounded past the largest float32 (values near 3.4e38)
    return repr(value)


def _bytes_text(value: Any) -> Any:
    return base64.b64encode(value).decode("ascii") if isinstance(value, bytes) else value


def _float32(value: Any) -> Any:
    return float32_text(value) if isinstance(value, float) else value


def _double(value: Any) -> Any:
    return double_text(value) if isinstance(value, float) else value


def _same(value: Any) -> Any:
    return value


_Transform = Callable[[Any], Any]


class _Translator:
    """One writer schema → (Connect schema as JSON, record → JSON-converter payload)."""

    def __init__(self) -> None:
        self.named: dict[str, dict[str, Any]] = {}

    def resolve(self, spec: Any, namespace: str) -> Any:
        """A named-type reference by its full name, or relative to the enclosing namespace."""
        if isinstance(spec, str) and spec not in _PRIMITIVES:
            for name in (spec, f"{namespace}.{spec}" if namespace else spec):
                if name in self.named:
                    return self.named[name]
            raise DecodeError(f"Avro schema refers to unknown type {spec!r}")
        return spec

    def translate(self, spec: Any, namespace: str, where: str) -> tuple[dict[str, Any], _Transform]:
        spec = self.resolve(spec, namespace)
        if isinstance(spec, list):
            branches = [b for b in spec if b != "null"]
            if len(branches) != 1 or len(spec) != 2:
                raise DecodeError(f"unsupported Avro union {json.dumps(spec)[:80]}", where)
            present, inner = self.translate(branches[0], namespace, where)
            present["optional"] = True
            # None passes through the identity unchanged: no wrapper needed.
            return present, inner if inner is _same else _Nullable(inner)
        if isinstance(spec, str):
            spec = {"type": spec}
        if not isinstance(spec, dict):
            raise DecodeError(f"malformed Avro schema {str(spec)[:80]}", where)
        kind = spec.get("type")
        if isinstance(kind, (list, dict)) or (isinstance(kind, str) and kind not in _ALL_KINDS):
            # {"type": <a schema>} wraps a schema (or names a type): unwrap it.
            wrapped, unwrap = self.translate(kind, namespace, where)
            return self._annotate(wrapped, spec), unwrap
        schema: dict[str, Any]
        transform: _Transform = _same
        if kind == "record":
            schema, transform = self._record(spec, namespace, where)
        elif kind == "array":
            items, item = self.translate(spec.get("items"), namespace, f"{where}[]")
            schema = {"type": "array", "items": items}
            transform = _list_of(item)
        elif kind == "map":
            values, value = self.translate(spec.get("values"), namespace, f"{where}{{}}")
            schema = {"type": "map", "keys": {"type": "string", "optional": False}}
            schema["values"] = values
            transform = _map_of(value)
        elif kind == "int":
            connect_type = spec.get("connect.type")
            schema = {"type": connect_type if connect_type in ("int8", "int16") else "int32"}
        elif kind == "long":
            schema = {"type": "int64"}
        elif kind == "float":
            schema, transform = {"type": "float"}, _float32
        elif kind == "double":
            schema, transform = {"type": "double"}, _double
        elif kind in ("bytes", "fixed"):
            if kind == "fixed":
                self._define(spec, namespace)
            schema, transform = {"type": "bytes"}, _bytes_text
        elif kind == "enum":
            self._define(spec, namespace)
            schema = {"type": "string"}
        elif kind in ("string", "boolean"):
            schema = {"type": kind}
        else:
            raise DecodeError(f"unsupported Avro type {kind!r}", where)
        schema["optional"] = False
        return self._annotate(schema, spec), transform

    @staticmethod
    def _annotate(schema: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
        name = spec.get("connect.name")
        if isinstance(name, str):
            schema["name"] = name
        params = spec.get("connect.parameters")
        if isinstance(params, dict):
            schema["parameters"] = {str(k): str(v) for k, v in params.items()}
        version = spec.get("connect.version")
        if isinstance(version, int):
            schema["version"] = version
        return schema

    def _define(self, spec: dict[str, Any], namespace: str) -> str:
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise DecodeError("named Avro type without a name")
        space = spec.get("namespace")
        if "." in name:
            full = name
        elif isinstance(space, str) and space:
            full = f"{space}.{name}"
        else:
            full = f"{namespace}.{name}" if namespace else name
        self.named[full] = spec
        return full

    def _record(
        self, spec: dict[str, Any], namespace: str, where: str
    ) -> tuple[dict[str, Any], _Transform]:
        full = self._define(spec, namespace)
        inner_space = full.rpartition(".")[0]
        fields = spec.get("fields")
        if not isinstance(fields, list):
            raise DecodeError("Avro record without fields", where)
        members: list[dict[str, Any]] = []
        plan: list[tuple[str, str, _Transform]] = []
        for member in fields:
            if not isinstance(member, dict) or not isinstance(member.get("name"), str):
                raise DecodeError("Avro record field without a name", where)
            avro_name: str = member["name"]
            name = unescape_name(avro_name)
            schema, transform = self.translate(member.get("type"), inner_space, f"{where}.{name}")
            members.append({"field": name, **schema})
            plan.append((avro_name, name, transform))

        return {"type": "struct", "fields": members}, _Record(tuple(plan))


class _Nullable:
    """A union with null: None stays None, anything else goes through ``inner``."""

    __slots__ = ("inner",)

    def __init__(self, inner: _Transform) -> None:
        self.inner = inner

    def __call__(self, value: Any) -> Any:
        return None if value is None else self.inner(value)


class _Record:
    """A record → the JSON converter's object; ``plan`` is (Avro name, name, transform)."""

    __slots__ = ("identity", "plan")

    def __init__(self, plan: tuple[tuple[str, str, _Transform], ...]) -> None:
        self.plan = plan
        # fastavro yields every field in schema order: such a record needs no copy.
        self.identity = all(a == n and t is _same for a, n, t in plan) and len(
            {n for _, n, _ in plan}
        ) == len(plan)

    def __call__(self, value: Any) -> Any:
        if self.identity or not isinstance(value, dict):
            return value
        return {name: transform(value.get(avro_name)) for avro_name, name, transform in self.plan}


def _list_of(item: _Transform) -> _Transform:
    def transform(value: Any) -> Any:
        return [item(v) for v in value] if isinstance(value, list) else value

    return transform


def _map_of(item: _Transform) -> _Transform:
    def transform(value: Any) -> Any:
        return {k: item(v) for k, v in value.items()} if isinstance(value, dict) else value

    return transform


_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
_ALL_KINDS = _PRIMITIVES | {"record", "enum", "array", "map", "fixed"}


def _without_logical_types(spec: Any) -> Any:
    """The schema with ``logicalType`` dropped: values stay in their raw Avro form.

    The Connect annotations say what a value means; letting fastavro turn decimals and
    timestamps into Python objects would only have to be undone.
    """
    if isinstance(spec, dict):
        return {k: _without_logical_types(v) for k, v in spec.items() if k != "logicalType"}
    if isinstance(spec, list):
        return [_without_logical_types(v) for v in spec]
    return spec


@dataclass(frozen=True, slots=True)
class WriterSchema:
    """A registry schema compiled once: fastavro's parsed form, Connect's view, a transform."""

    schema_id: int
    parsed: Any
    connect: dict[str, Any]
    to_payload: _Transform


def compile_schema(schema_id: int, text: str) -> WriterSchema:
    """Parse and translate a writer schema; any problem is a :class:`DecodeError`."""
    where = f"schema id {schema_id}"
    try:
        spec = json.loads(text)
    except ValueError as exc:
        raise DecodeError(f"registry schema is not JSON: {str(exc)[:80]}", where) from None
    try:
        parsed = parse_schema(_without_logical_types(spec))
    except Exception as exc:  # fastavro raises several types for a bad schema
        raise DecodeError(
            f"not a valid Avro schema ({type(exc).__name__}: {str(exc)[:80]})", where
        ) from None
    connect, to_payload = _Translator().translate(spec, "", where)
    return WriterSchema(schema_id, parsed, connect, to_payload)


def split_frame(data: bytes, what: str) -> tuple[int, bytes]:
    """(schema id, Avro body) of a framed key or value."""
    if len(data) < HEADER_BYTES:
        raise DecodeError(f"{what} is {len(data)} bytes, too short for the registry framing")
    if data[0] != MAGIC:
        raise DecodeError(
            f"{what} does not start with the registry's magic byte 0 (got 0x{data[0]:02x}): "
            "not an Avro message (is kafka.format right?)"
        )
    return int.from_bytes(data[1:HEADER_BYTES], "big"), data[HEADER_BYTES:]


def read_record(schema: WriterSchema, body: bytes, what: str) -> Any:
    """The Avro body as the JSON converter's payload; trailing bytes are an error too."""
    buffer = io.BytesIO(body)
    try:
        record = schemaless_reader(buffer, schema.parsed, None)
    except Exception as exc:  # truncated or corrupt bodies raise many types
        raise DecodeError(
            f"{what} is not a valid Avro record for schema id {schema.schema_id} "
            f"({type(exc).__name__}: {str(exc)[:80]})"
        ) from None
    if buffer.tell() != len(body):
        raise DecodeError(
            f"{what} has {len(body) - buffer.tell()} bytes after its Avro record "
            f"(schema id {schema.schema_id})"
        )
    return schema.to_payload(record)


def _body_reader(schema: WriterSchema, need: Any = True) -> Callable[[bytes], Any] | None:
    """Framed bytes → the raw Avro record, as fastavro reads it; any problem raises.

    fastavro reads every primitive through the file object's ``read``: for an event of
    some 40 small fields that per-call cost dominates. This reader works on the bytes by
    index instead, generated once per schema. ``need`` projects records: ``True`` reads
    a value whole, a dict keeps only the record members it names (the others are still
    parsed and checked, strings decoded, but not kept). It accepts less than fastavro (a
    boolean byte other than 0 or 1, a varint past 64 bits): such input raises, and the
    caller falls back to :func:`read_record`, which also words every error.
    """
    parsed = schema.parsed
    named = parsed.get("__named_schemas") if isinstance(parsed, dict) else None
    try:
        return _generate_reader(parsed, named or {}, need)
    except (LookupError, TypeError, ValueError, RecursionError):
        return None  # a shape fastavro reads but this reader does not know


class _Source:
    """Python source of one schema's reader: straight-line code, one local per value."""

    def __init__(self, named: dict[str, Any]) -> None:
        self.named = named
        self.lines: list[str] = []
        self.helpers: dict[str, Any] = {}
        self.count = 0
        self.inlining: list[str] = []

    def local(self) -> str:
        self.count += 1
        return f"v{self.count}"

    def emit(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)

    def helper(self, reader: _Reader) -> str:
        name = f"h{len(self.helpers)}"
        self.helpers[name] = reader
        return name

    def varint(self, indent: int, target: str) -> None:
        self.emit(indent, "b = data[pos]")
        self.emit(indent, "if b < 128:")
        self.emit(indent + 1, f"{target} = (b >> 1) ^ -(b & 1)")
        self.emit(indent + 1, "pos += 1")
        self.emit(indent, "else:")
        self.emit(indent + 1, f"{target}, pos = read_long(data, pos)")

    def value(self, spec: Any, indent: int, need: Any = True) -> str:
        """Emit code reading ``spec`` at ``pos``; returns the local holding the value.

        ``need`` None only moves ``pos`` past the value (the local stays unset).
        """
        target = self.local() if need is not None else "_"
        if isinstance(spec, dict) and spec.get("type") not in ("record", "enum", "fixed"):
            if spec.get("type") in ("array", "map"):
                self.emit(indent, f"{target}, pos = {self.helper(self.reader(spec))}(data, pos)")
                return target
            return self.value_into(spec["type"], indent, target, need)
        return self.value_into(spec, indent, target, need)

    def reader(self, spec: Any) -> _Reader:
        return _compile_reader(spec, self.named, {})

    def value_into(self, spec: Any, indent: int, target: str, need: Any = True) -> str:
        if isinstance(spec, str) and spec not in _PRIMITIVE_READERS:
            if spec in self.inlining:  # a recursive type: read it with the closures
                self.emit(indent, f"{target}, pos = {self.helper(self.reader(spec))}(data, pos)")
                return target
            return self.value_into(self.named[spec], indent, target, need)
        if isinstance(spec, list):
            if len(spec) == 2 and "null" in spec:
                null_byte = 0 if spec[0] == "null" else 2
                inner = spec[1] if null_byte == 0 else spec[0]
                self.emit(indent, "b = data[pos]")
                self.emit(indent, "pos += 1")
                self.emit(indent, f"if b == {null_byte}:")
                self.emit(indent + 1, f"{target} = None" if need is not None else "pass")
                self.emit(indent, f"elif b == {2 - null_byte}:")
                got = self.value(inner, indent + 1, need)
                self.emit(indent + 1, f"{target} = {got}" if need is not None else "pass")
                self.emit(indent, "else:")
                self.emit(indent + 1, "raise ValueError('bad union branch')")
                return target
            self.emit(indent, f"{target}, pos = {self.helper(self.reader(spec))}(data, pos)")
            return target
        kind = spec if isinstance(spec, str) else spec["type"]
        if kind in ("int", "long") and need is None:
            self.emit(indent, "pos = varint_end(data, pos).end()")
        elif kind in ("int", "long"):
            self.varint(indent, target)
        elif kind in ("string", "bytes"):
            self.varint(indent, "n")
            self.emit(indent, "end = pos + n")
            self.emit(indent, "if n < 0 or end > size:")
            self.emit(indent + 1, "raise ValueError('runs past the message')")
            decode = ".decode('utf-8')" if kind == "string" else ""
            self.emit(indent, f"{target} = data[pos:end]{decode}")
            self.emit(indent, "pos = end")
        elif kind == "record":
            self.inlining.append(spec["name"])
            members = []
            for member in spec["fields"]:
                name = member["name"]
                part = need if not isinstance(need, dict) else need.get(name)
                members.append((name, self.value(member["type"], indent, part)))
            self.inlining.pop()
            if need is not None:
                kept = [(n, local) for n, local in members if local != "_"]
                items = ", ".join(f"{name!r}: {local}" for name, local in kept)
                self.emit(indent, f"{target} = {{{items}}}")
        elif kind in _PRIMITIVE_READERS or kind in ("enum", "fixed"):
            self.emit(indent, f"{target}, pos = {self.helper(self.reader(spec))}(data, pos)")
        else:
            raise ValueError(f"unknown type {kind!r}")
        return target


def _generate_reader(parsed: Any, named: dict[str, Any], need: Any) -> Callable[[bytes], Any]:
    """One function reading a whole framed record, generated from the schema's shape.

    Only the shape goes into the source: names appear as ``repr`` literals, so no
    schema text is ever run. Complex and rare shapes call the closure readers.
    """
    source = _Source(named)
    source.emit(1, f"pos = {HEADER_BYTES}")
    source.emit(1, "size = len(data)")
    result = source.value(parsed, 1, need)
    source.emit(1, "if pos != size:")
    source.emit(2, "raise ValueError('trailing bytes')")
    source.emit(1, f"return {result}")
    text = "def read(data):\n" + "\n".join(source.lines) + "\n"
    namespace: dict[str, Any] = {"read_long": _read_long, "varint_end": _VARINT_END}
    namespace.update(source.helpers)
    exec(compile(text, "<avro reader>", "exec"), namespace)  # noqa: S102 - see docstring
    read: Callable[[bytes], Any] = namespace["read"]
    return read


_INT64 = 1 << 64
#: The bytes of one varint (at most 10, as for any 64-bit value); no match raises.
_VARINT_END = re.compile(rb"[\x80-\xff]{0,9}[\x00-\x7f]").match
_Reader = Callable[[bytes, int], tuple[Any, int]]
_UNPACK_FLOAT = struct.Struct("<f").unpack_from
_UNPACK_DOUBLE = struct.Struct("<d").unpack_from


def _read_long(data: bytes, pos: int) -> tuple[int, int]:
    """A zig-zag varint at ``pos`` → (value, next position); beyond 64 bits raises.

    The loop is unrolled 4 bytes deep: timestamps take 6 to 9 bytes.
    """
    byte = data[pos]
    number = byte & 0x7F
    if byte < 0x80:
        return (number >> 1) ^ -(number & 1), pos + 1
    byte = data[pos + 1]
    number |= (byte & 0x7F) << 7
    if byte < 0x80:
        return (number >> 1) ^ -(number & 1), pos + 2
    byte = data[pos + 2]
    number |= (byte & 0x7F) << 14
    if byte < 0x80:
        return (number >> 1) ^ -(number & 1), pos + 3
    byte = data[pos + 3]
    number |= (byte & 0x7F) << 21
    shift = 28
    pos += 4
    while byte & 0x80:
        byte = data[pos]
        pos += 1
        number |= (byte & 0x7F) << shift
        shift += 7
        if shift > 70:
            raise ValueError("varint too long")
    if number >= _INT64:
        raise ValueError("varint beyond 64 bits")
    return (number >> 1) ^ -(number & 1), pos


def _read_null(data: bytes, pos: int) -> tuple[Any, int]:
    return None, pos


def _read_boolean(data: bytes, pos: int) -> tuple[Any, int]:
    byte = data[pos]
    if byte > 1:
        raise ValueError("boolean byte is neither 0 nor 1")
    return byte == 1, pos + 1


def _read_float(data: bytes, pos: int) -> tuple[Any, int]:
    return _UNPACK_FLOAT(data, pos)[0], pos + 4


def _read_double(data: bytes, pos: int) -> tuple[Any, int]:
    return _UNPACK_DOUBLE(data, pos)[0], pos + 8


def _read_bytes(data: bytes, pos: int) -> tuple[Any, int]:
    size, pos = _read_long(data, pos)
    end = pos + size
    if size < 0 or end > len(data):
        raise ValueError("bytes run past the message")
    return data[pos:end], end


def _read_string(data: bytes, pos: int) -> tuple[Any, int]:
    size, pos = _read_long(data, pos)
    end = pos + size
    if size < 0 or end > len(data):
        raise ValueError("string runs past the message")
    return data[pos:end].decode("utf-8"), end


_PRIMITIVE_READERS: dict[str, _Reader] = {
    "null": _read_null,
    "boolean": _read_boolean,
    "int": _read_long,
    "long": _read_long,
    "float": _read_float,
    "double": _read_double,
    "bytes": _read_bytes,
    "string": _read_string,
}


def _compile_reader(spec: Any, named: dict[str, Any], done: dict[str, _Reader]) -> _Reader:
    """A reader for one parsed (fastavro) schema: (bytes, position) → (value, position)."""
    if isinstance(spec, str):
        primitive = _PRIMITIVE_READERS.get(spec)
        if primitive is not None:
            return primitive
        if spec in done:
            return done[spec]
        if spec not in named:
            raise ValueError(f"unknown type {spec!r}")
        cell: list[_Reader] = []

        def later(data: bytes, pos: int) -> tuple[Any, int]:
            return cell[0](data, pos)  # a recursive type, compiled after this use

        done[spec] = later
        cell.append(_compile_reader(named[spec], named, done))
        done[spec] = cell[0]
        return cell[0]
    if isinstance(spec, list):
        return _union_reader([_compile_reader(b, named, done) for b in spec])
    kind = spec["type"]
    if kind == "record":
        fields = tuple(
            (member["name"], _compile_reader(member["type"], named, done))
            for member in spec["fields"]
        )

        def record(data: bytes, pos: int) -> tuple[Any, int]:
            out = {}
            for field_name, read in fields:
                out[field_name], pos = read(data, pos)
            return out, pos

        return record
    if kind == "enum":
        symbols = tuple(spec["symbols"])

        def enum(data: bytes, pos: int) -> tuple[Any, int]:
            index, pos = _read_long(data, pos)
            if index < 0:
                raise ValueError("negative enum index")
            return symbols[index], pos

        return enum
    if kind == "fixed":
        size = int(spec["size"])

        def fixed(data: bytes, pos: int) -> tuple[Any, int]:
            end = pos + size
            if end > len(data):
                raise ValueError("fixed runs past the message")
            return data[pos:end], end

        return fixed
    if kind == "array":
        item = _compile_reader(spec["items"], named, done)

        def array(data: bytes, pos: int) -> tuple[Any, int]:
            out: list[Any] = []
            while True:
                count, pos = _read_long(data, pos)
                if count == 0:
                    return out, pos
                if count < 0:
                    count = -count
                    _size, pos = _read_long(data, pos)
                for _ in range(count):
                    value, pos = item(data, pos)
                    out.append(value)

        return array
    if kind == "map":
        values = _compile_reader(spec["values"], named, done)

        def mapping(data: bytes, pos: int) -> tuple[Any, int]:
            out: dict[str, Any] = {}
            while True:
                count, pos = _read_long(data, pos)
                if count == 0:
                    return out, pos
                if count < 0:
                    count = -count
                    _size, pos = _read_long(data, pos)
                for _ in range(count):
                    key, pos = _read_string(data, pos)
                    out[key], pos = values(data, pos)

        return mapping
    return _compile_reader(kind, named, done)


def _union_reader(branches: list[_Reader]) -> _Reader:
    if len(branches) == 2 and _read_null in branches:
        # A nullable field: the branch index is one byte, 0x00 (index 0) or 0x02 (1).
        null_byte = 0 if branches[0] is _read_null else 2
        inner = branches[1] if null_byte == 0 else branches[0]
        value_byte = 2 - null_byte

        def nullable(data: bytes, pos: int) -> tuple[Any, int]:
            byte = data[pos]
            if byte == null_byte:
                return None, pos + 1
            if byte == value_byte:
                return inner(data, pos + 1)
            raise ValueError("bad union branch")

        return nullable
    options = tuple(branches)

    def union(data: bytes, pos: int) -> tuple[Any, int]:
        index, pos = _read_long(data, pos)
        if index < 0:
            raise ValueError("negative union branch")
        return options[index](data, pos)

    return union


#: (Avro field name, field name, converter from the raw Avro value) per column.
_Fused = tuple[tuple[str, str, Converter], ...]


def _fuse(transform: _Transform, converter: Converter) -> Converter:
    """The payload transform and the field's converter as one call."""
    if transform is _same or (isinstance(transform, _Record) and transform.identity):
        return converter

    def fused(value: Any) -> Any:
        return converter(transform(value))

    return fused


def _fused_row(transform: _Transform, plan: Any) -> _Fused | None:
    """Per-column converters of a row record, or None if the payload path must decide."""
    record = transform.inner if isinstance(transform, _Nullable) else transform
    if not isinstance(record, _Record) or not isinstance(plan, _RowPlan):
        return None
    names = [name for _, name, _ in record.plan]
    if names != [name for name, _ in plan.converters] or len(set(names)) != len(names):
        return None
    converters = dict(plan.converters)
    return tuple((a, n, _fuse(t, converters[n])) for a, n, t in record.plan)


def _read_row(record: Any, fields: _Fused) -> tuple[dict[str, Value], set[str] | None]:
    """A row straight from the Avro record, as ``debezium._row`` makes it from the payload."""
    row: dict[str, Value] = {}
    inexact: set[str] | None = None
    for avro_name, name, convert in fields:
        got = convert(record[avro_name])
        if got is INEXACT_MARK:
            if inexact is None:
                inexact = set()
            inexact.add(name)
            got = None
        row[name] = got
    return row, inexact


@dataclass(frozen=True, slots=True)
class _Shortcut:
    """A value schema's envelope, compiled to read change events without the payload.

    Built only where it provably gives the payload path's result; ``None`` members of
    the rows mean the envelope has no such field.
    """

    read: Callable[[bytes], Any]
    op: tuple[str, _Transform | None]
    source: tuple[str, _Transform | None]
    before: tuple[str, _Fused] | None
    after: tuple[str, _Fused] | None
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class _KeyShortcut:
    read: Callable[[bytes], Any]
    fields: _Fused


def _plain(transform: _Transform) -> _Transform | None:
    """None for a transform that leaves the value as it is."""
    if transform is _same or (isinstance(transform, _Record) and transform.identity):
        return None
    return transform


_SOURCE_MEMBERS = ("schema", "table", "lsn", "txId", "ts_ms", "snapshot")


def _value_shortcut(schema: WriterSchema, plan: _ValuePlan) -> _Shortcut | None:
    top = schema.to_payload
    if not isinstance(top, _Record) or not isinstance(plan.columns, tuple):
        return None
    members = {name: (avro_name, t) for avro_name, name, t in top.plan}
    if len(members) != len(top.plan) or "op" not in members or "source" not in members:
        return None
    rows: list[tuple[str, _Fused] | None] = []
    for part, row_plan in (("before", plan.before), ("after", plan.after)):
        if part not in members:
            rows.append(None)
            continue
        avro_name, transform = members[part]
        fused = _fused_row(transform, row_plan)
        if fused is None:
            return None
        rows.append((avro_name, fused))
    op_name, op_t = members["op"]
    source_name, source_t = members["source"]
    need: dict[str, Any] = {op_name: True, source_name: True}
    if _plain(source_t) is None:
        # Only what Decoder._table and debezium._source look at is kept.
        need[source_name] = dict.fromkeys(_SOURCE_MEMBERS, True)
    for row in rows:
        if row is not None:
            need[row[0]] = True
    read = _body_reader(schema, need)
    if read is None:
        return None
    return _Shortcut(
        read,
        (op_name, _plain(op_t)),
        (source_name, _plain(source_t)),
        rows[0],
        rows[1],
        plan.columns,
    )


def _key_shortcut(schema: WriterSchema, plan: _KeyPlan) -> _KeyShortcut | None:
    fused = _fused_row(schema.to_payload, plan.rows)
    read = _body_reader(schema)
    if fused is None or read is None or isinstance(schema.to_payload, _Nullable):
        return None
    return _KeyShortcut(read, fused)


def _source_info(source: Any, envelope: dict[str, Any]) -> SourceInfo:
    """``debezium._source`` for the plain types Avro yields; anything else goes to it."""
    lsn, tx_id = source.get("lsn"), source.get("txId")
    ts_ms, snapshot = source.get("ts_ms"), source.get("snapshot")
    if (
        (lsn is None or type(lsn) is int)
        and (tx_id is None or type(tx_id) is int)
        and (ts_ms is None or type(ts_ms) is int)
        and (snapshot is None or type(snapshot) is str)
    ):
        return SourceInfo(lsn, tx_id, ts_ms, snapshot not in (None, "false"))
    return _source(envelope)


class _Fallback(Exception):
    """The shortcut does not apply to this message: the payload path decides."""


class _SchemaError(Exception):
    """The registry refused a schema id: the payload path would raise the same error."""

    def __init__(self, error: DecodeError) -> None:
        super().__init__(error.reason)
        self.error = error


class AvroDecoder(Decoder):
    """:class:`Decoder` for Avro messages: same envelope logic, documents read from Avro.

    Compiled schemas and the plans derived from them are cached by schema id: an id
    names one immutable schema in a registry.
    """

    def __init__(self, schemas: SchemaSource, *, shortcut: bool = True) -> None:
        """``shortcut=False`` decodes through the JSON-shaped payload only: the reference."""
        super().__init__()
        self._source = schemas
        self._schemas: dict[int, WriterSchema] = {}
        self._plans: dict[tuple[int, bool], Any] = {}
        self._shortcut = shortcut
        #: Messages under the prefix the shortcut handed to the payload path (truncates,
        #: logical messages, bad input): a count that tells whether it is in use.
        self.payload_path = 0
        self._shortcuts: dict[int, _Shortcut | None] = {}
        self._key_shortcuts: dict[int, _KeyShortcut | None] = {}

    def schema(self, schema_id: int) -> WriterSchema:
        found = self._schemas.get(schema_id)
        if found is None:
            found = compile_schema(schema_id, self._source(schema_id))
            if len(self._schemas) >= _CACHE_LIMIT:
                self._schemas.clear()
                self._plans.clear()
                self._shortcuts.clear()
                self._key_shortcuts.clear()
            self._schemas[schema_id] = found
        return found

    def decode(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        topic_prefix: str,
    ) -> Event:
        """One Kafka message → one event. Raises only DecodeError or HaltedError."""
        position = Position(topic, partition, offset)
        try:
            return self._decode(topic, position, key, value, topic_prefix, _unused_parser)
        except DecodeError:
            raise
        except HaltedError as exc:
            raise HaltedError(f"{topic}[{partition}] at offset {offset}: {exc}") from exc
        except Exception as exc:  # anything unexpected in a message is bad input too
            raise DecodeError(
                f"malformed message ({type(exc).__name__}: {str(exc)[:80]})"
            ) from None

    def _decode(
        self,
        topic: str,
        position: Position,
        key: bytes | None,
        value: bytes | None,
        prefix: str,
        parse: Callable[[bytes], Any],
    ) -> Event:
        if topic.startswith(f"{HEARTBEAT_TOPIC_PREFIX}."):
            if value is None:
                return Heartbeat(position, None, None)
            _plan, payload = self._document(topic, False, value, parse)
            ts = payload.get("ts_ms") if isinstance(payload, dict) else None
            return Heartbeat(position, None, ts if type(ts) is int else None)
        if (
            self._shortcut
            and value is not None
            and topic.startswith(f"{prefix}.")
            and topic != f"{prefix}.transaction"
        ):
            try:
                return self._change(position, key, value)
            except HaltedError:
                raise
            except _SchemaError as exc:
                # The payload path would stop at the same lookup: do not ask twice.
                raise exc.error from None
            except Exception:  # the payload path words the error
                self.payload_path += 1
        return super()._decode(topic, position, key, value, prefix, parse)

    def _plan(self, schema_id: int, is_key: bool) -> Any:
        slot = (schema_id, is_key)
        plan = self._plans.get(slot)
        if plan is None:
            schema = self.schema(schema_id)
            plan = _KeyPlan(schema.connect) if is_key else _ValuePlan(schema.connect)
            self._plans[slot] = plan
        return plan

    def _lookup(self, schema_id: int) -> WriterSchema:
        try:
            return self.schema(schema_id)
        except DecodeError as exc:
            raise _SchemaError(exc) from None

    def _envelope_shortcut(self, data: bytes) -> _Shortcut:
        if len(data) > MAX_MESSAGE_BYTES:
            raise _Fallback
        schema_id, _body = split_frame(data, "value")
        try:
            found = self._shortcuts[schema_id]
        except KeyError:
            schema = self._lookup(schema_id)
            found = _value_shortcut(schema, self._plan(schema_id, False))
            self._shortcuts[schema_id] = found
        if found is None:
            raise _Fallback
        return found

    def _key_row(self, data: bytes) -> dict[str, Value]:
        if len(data) > MAX_MESSAGE_BYTES or len(data) < HEADER_BYTES or data[0] != MAGIC:
            raise _Fallback
        schema_id = int.from_bytes(data[1:HEADER_BYTES], "big")
        try:
            found = self._key_shortcuts[schema_id]
        except KeyError:
            schema = self._lookup(schema_id)
            found = _key_shortcut(schema, self._plan(schema_id, True))
            self._key_shortcuts[schema_id] = found
        if found is None:
            raise _Fallback
        record = found.read(data)
        if len(found.fields) == 1:
            ((avro_name, name, convert),) = found.fields
            got = convert(record[avro_name])
            if got is INEXACT_MARK:
                raise _Fallback
            return {name: got}
        row, inexact = _read_row(record, found.fields)
        if inexact:
            raise _Fallback
        return row

    def _change(self, position: Position, key: bytes | None, value: bytes) -> RowChange:
        """A row change read straight from the Avro record, as the payload path reads it.

        Mirrors :meth:`Decoder._decode` for c/r/u/d events; anything else, and every
        error, raises so that the payload path decides (and words the error).
        """
        shortcut = self._envelope_shortcut(value)
        record = shortcut.read(value)
        op_name, op_t = shortcut.op
        op = record[op_name] if op_t is None else op_t(record[op_name])
        kind = _OPS.get(op) if type(op) is str else None
        if kind is None:
            raise _Fallback
        source_name, source_t = shortcut.source
        source = record[source_name] if source_t is None else source_t(record[source_name])
        envelope = {"source": source}
        table = self._table(envelope)

        key_row: dict[str, Value] = {}
        if key is not None:
            key_row = self._key_row(key)
        before = after = None
        inexact: set[str] = set()
        if shortcut.before is not None:
            raw = record[shortcut.before[0]]
            if raw is not None:
                before, before_inexact = _read_row(raw, shortcut.before[1])
                if before_inexact and not key_row:
                    inexact |= before_inexact
        if shortcut.after is not None:
            raw = record[shortcut.after[0]]
            if raw is not None:
                after, after_inexact = _read_row(raw, shortcut.after[1])
                if after_inexact:
                    inexact |= after_inexact

        if kind is Op.INSERT or kind is Op.READ:
            if after is None:
                raise _Fallback
            for name, v in after.items():
                if v is UNAVAILABLE:
                    inexact.add(name)
        elif kind is Op.UPDATE:
            if after is None:
                raise _Fallback
        elif before is None:
            raise _Fallback
        if key_row:
            image = after if after is not None else before
            assert image is not None
            for k, v in key_row.items():
                if k not in image or (kind is not Op.DELETE and image[k] != v):
                    raise _Fallback
        elif kind is not Op.INSERT and kind is not Op.READ and before is None:
            raise _Fallback
        return RowChange(
            table=table,
            op=kind,
            key=key_row,
            before=before,
            after=after,
            source=_source_info(source, envelope),
            position=position,
            columns=shortcut.columns,
            inexact=frozenset(inexact) if inexact else _NONE_INEXACT,
        )

    def _document(
        self, topic: str, is_key: bool, data: bytes, parse: Callable[[bytes], Any]
    ) -> tuple[Any, Any]:
        """(plan compiled from the Connect schema, payload) of a framed key or value."""
        what = "key" if is_key else "value"
        if len(data) > MAX_MESSAGE_BYTES:
            raise DecodeError(f"{what} is {len(data)} bytes, over the {MAX_MESSAGE_BYTES} limit")
        schema_id, body = split_frame(data, what)
        schema = self.schema(schema_id)
        slot = (schema_id, is_key)
        plan = self._plans.get(slot)
        if plan is None:
            plan = _KeyPlan(schema.connect) if is_key else _ValuePlan(schema.connect)
            self._plans[slot] = plan
        return plan, read_record(schema, body, what)


def _unused_parser(data: bytes) -> Any:
    """The JSON decoder's payload parser; Avro documents never reach it."""
    raise DecodeError("internal: JSON parser called on an Avro message")
