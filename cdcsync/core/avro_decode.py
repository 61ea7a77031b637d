"""Decode Debezium events written by an Avro converter, with the JSON path's fidelity.

The converter frames each key and value as magic byte ``0``, a 4-byte big-endian schema
id and the Avro body (Confluent's wire format). The writer schema carries Connect's
schema in annotations (``connect.name``, ``connect.parameters``, ``connect.type``), so
each schema is translated once into the Connect schema the JSON converter would have
embedded, and each record into the payload the JSON converter would have written: bytes
as base64, floats as their shortest exact text. From there the JSON decoder's own code
(:class:`cdcsync.core.debezium.Decoder`) decides everything, so both formats yield the
same events, value for value.

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
    HEARTBEAT_TOPIC_PREFIX,
    MAX_MESSAGE_BYTES,
    Decoder,
    _KeyPlan,
    _ValuePlan,
)
from cdcsync.core.events import Event, Heartbeat, Position
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

            def nullable(value: Any) -> Any:
                return None if value is None else inner(value)

            return present, nullable
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

        def record(value: Any) -> Any:
            if not isinstance(value, dict):
                return value
            return {name: transform(value.get(avro_name)) for avro_name, name, transform in plan}

        return {"type": "struct", "fields": members}, record


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


class AvroDecoder(Decoder):
    """:class:`Decoder` for Avro messages: same envelope logic, documents read from Avro.

    Compiled schemas and the plans derived from them are cached by schema id: an id
    names one immutable schema in a registry.
    """

    def __init__(self, schemas: SchemaSource) -> None:
        super().__init__()
        self._source = schemas
        self._schemas: dict[int, WriterSchema] = {}
        self._plans: dict[tuple[int, bool], Any] = {}

    def schema(self, schema_id: int) -> WriterSchema:
        found = self._schemas.get(schema_id)
        if found is None:
            found = compile_schema(schema_id, self._source(schema_id))
            if len(self._schemas) >= _CACHE_LIMIT:
                self._schemas.clear()
                self._plans.clear()
            self._schemas[schema_id] = found
        return found

    def decode(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        *,
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
        return super()._decode(topic, position, key, value, prefix, parse)

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
