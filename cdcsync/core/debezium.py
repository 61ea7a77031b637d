"""Decode Debezium PostgreSQL connector messages (JSON converter) into neutral events.

Only :class:`~cdcsync.errors.DecodeError` ever escapes :func:`decode`, whatever the
bytes: the consumer turns it into a halt (or a dead letter) naming topic, partition,
offset and key. Floats are parsed as text so their digits survive unchanged.

How a consumer tells the shapes apart:

- ``RowChange.key`` is empty exactly when the message key is null (a table without a
  primary key, captured with REPLICA IDENTITY FULL): match such rows by ``before``.
- With REPLICA IDENTITY DEFAULT, an update's ``before`` is ``None`` and a delete's
  ``before`` holds the key columns with NULL elsewhere; only ``key`` is meaningful then.
- ``UNAVAILABLE`` marks an unchanged TOASTed value; ``inexact`` lists columns whose value
  the event cannot carry exactly and must be read from the source.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from cdcsync.core.events import (
    UNAVAILABLE,
    Column,
    Event,
    Heartbeat,
    LogicalMessage,
    Op,
    Position,
    RowChange,
    SourceInfo,
    TableId,
    Tombstone,
    Truncate,
    Value,
)
from cdcsync.core.pg_values import convert, source_type
from cdcsync.errors import DecodeError

HEARTBEAT_TOPIC_PREFIX = "__debezium-heartbeat"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_OPS = {"c": Op.INSERT, "u": Op.UPDATE, "d": Op.DELETE, "r": Op.READ}


def fidelity_settings() -> dict[str, str]:
    """Connector properties exact decoding depends on; cdcsync always sets them."""
    return {
        # Numerics as strings: full precision, NaN/Infinity as words we map.
        "decimal.handling.mode": "string",
        # adaptive: microsecond integers for timestamp/time (exact, keeps 24:00:00 and BC
        # years, which isostring loses) and day counts for dates.
        "time.precision.mode": "adaptive",
        # bytea (and types sent as their text's bytes) as hex: unambiguous to decode.
        "binary.handling.mode": "hex",
        # ISO 8601 intervals: months are not flattened to days.
        "interval.handling.mode": "string",
        "hstore.handling.mode": "json",
        # The source column type tells numeric from money, varbit from bit, arrays, ...
        "column.propagate.source.type": ".*",
        # Geometric, composite and pg_lsn values are sent (as text bytes), not dropped.
        "include.unknown.datatypes": "true",
        # Truncates are captured (Debezium skips them by default).
        "skipped.operations": "none",
        "tombstones.on.delete": "true",
    }


def _loads(data: bytes, what: str) -> Any:
    if len(data) > MAX_MESSAGE_BYTES:
        raise DecodeError(f"{what} is {len(data)} bytes, over the {MAX_MESSAGE_BYTES} limit")
    try:
        return json.loads(data, parse_float=str)
    except (ValueError, RecursionError) as exc:
        raise DecodeError(f"{what} is not JSON: {str(exc)[:80]}") from None


def _envelope(doc: Any, what: str) -> tuple[dict[str, Any] | None, Any]:
    """(schema, payload) of a converter document, with or without an embedded schema."""
    if isinstance(doc, dict) and set(doc) == {"schema", "payload"}:
        schema = doc["schema"]
        if schema is not None and not isinstance(schema, dict):
            raise DecodeError("schema must be an object", f"{what}.schema")
        return schema, doc["payload"]
    return None, doc


def _fields(schema: dict[str, Any] | None, name: str) -> dict[str, dict[str, Any]] | None:
    """Field schemas of struct member ``name`` (e.g. ``after``) by field name."""
    if schema is None:
        return None
    members = schema.get("fields")
    if not isinstance(members, list):
        raise DecodeError("struct schema without fields", "schema")
    for member in members:
        if isinstance(member, dict) and member.get("field") == name:
            inner = member.get("fields")
            if not isinstance(inner, list):
                raise DecodeError("expected a struct schema", f"schema.{name}")
            return {str(f.get("field")): f for f in inner if isinstance(f, dict)}
    return None


def _key_fields(schema: dict[str, Any] | None) -> dict[str, dict[str, Any]] | None:
    if schema is None:
        return None
    inner = schema.get("fields")
    if not isinstance(inner, list):
        raise DecodeError("key schema without fields", "key.schema")
    return {str(f.get("field")): f for f in inner if isinstance(f, dict)}


def _schemaless(value: Any, field: str) -> Value:
    """Without a schema only self-describing values are decoded; the rest is refused."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "t" if value else "f"
    raise DecodeError(
        "value is ambiguous without a schema: enable value.converter.schemas.enable", field
    )


def _row(
    payload: Any, schemas: dict[str, dict[str, Any]] | None, where: str
) -> tuple[dict[str, Value], set[str]]:
    if not isinstance(payload, dict):
        raise DecodeError("expected an object", where)
    row: dict[str, Value] = {}
    inexact: set[str] = set()
    if schemas is not None:
        extra = set(payload) - set(schemas)
        if extra:
            raise DecodeError(f"fields not in the schema: {sorted(extra)[:5]}", where)
        for name, field_schema in schemas.items():
            if name not in payload:
                inexact.add(name)  # Debezium left the column out (e.g. interval[])
                row[name] = None
                continue
            converted = convert(payload[name], field_schema, f"{where}.{name}")
            row[name] = converted.value
            if not converted.exact:
                inexact.add(name)
        return row, inexact
    for name, value in payload.items():
        row[str(name)] = _schemaless(value, f"{where}.{name}")
    return row, inexact


def _source(payload: dict[str, Any]) -> SourceInfo:
    source = payload.get("source")
    if not isinstance(source, dict):
        raise DecodeError("missing source block", "payload.source")
    snapshot = source.get("snapshot")
    return SourceInfo(
        lsn=_opt_int(source.get("lsn"), "payload.source.lsn"),
        tx_id=_opt_int(source.get("txId"), "payload.source.txId"),
        commit_ts_ms=_opt_int(source.get("ts_ms"), "payload.source.ts_ms"),
        snapshot=snapshot not in (None, False, "false"),
    )


def _opt_int(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise DecodeError(f"expected an integer, got {type(value).__name__}", field)
    return value


def _table(payload: dict[str, Any]) -> TableId:
    source = payload.get("source")
    if not isinstance(source, dict):
        raise DecodeError("missing source block", "payload.source")
    schema, table = source.get("schema"), source.get("table")
    if not isinstance(schema, str) or not isinstance(table, str) or not schema or not table:
        raise DecodeError("source block lacks schema or table", "payload.source")
    return TableId(schema, table)


def decode(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    *,
    topic_prefix: str,
) -> Event:
    """One Kafka message → one event. Raises only :class:`DecodeError`."""
    try:
        return _decode(topic, Position(topic, partition, offset), key, value, topic_prefix)
    except DecodeError:
        raise
    except Exception as exc:  # anything unexpected in a message is bad input too
        raise DecodeError(f"malformed message ({type(exc).__name__}: {str(exc)[:80]})") from None


def _decode(
    topic: str, position: Position, key: bytes | None, value: bytes | None, prefix: str
) -> Event:
    if topic.startswith(f"{HEARTBEAT_TOPIC_PREFIX}."):
        if value is None:
            return Heartbeat(position, None, None)
        _schema, payload = _envelope(_loads(value, "value"), "value")
        ts = payload.get("ts_ms") if isinstance(payload, dict) else None
        return Heartbeat(position, None, ts if isinstance(ts, int) else None)
    if not topic.startswith(f"{prefix}."):
        raise DecodeError(f"topic {topic!r} is not under the migration's prefix {prefix!r}")
    if topic == f"{prefix}.transaction":
        return Heartbeat(position, None, None)
    if value is None:
        # Tombstones follow deletes; a keyless table's tombstone has a null key too.
        return Tombstone(position)

    value_schema, payload = _envelope(_loads(value, "value"), "value")
    if not isinstance(payload, dict):
        raise DecodeError("value payload is not an object", "payload")
    op = payload.get("op")
    if op == "m":
        return _message(payload, position)
    if op == "t":
        return Truncate(_table(payload), _source(payload), position)
    if op not in _OPS:
        raise DecodeError(f"unknown op {op!r}", "payload.op")
    table = _table(payload)
    expected = f"{prefix}."
    if not topic.startswith(expected):
        raise DecodeError(f"topic {topic!r} does not carry table {table}")

    key_row: dict[str, Value] = {}
    if key is not None:
        key_schema, key_payload = _envelope(_loads(key, "key"), "key")
        if key_payload is not None:
            key_row, key_inexact = _row(key_payload, _key_fields(key_schema), "key")
            if key_inexact:
                raise DecodeError(
                    f"key columns {sorted(key_inexact)} cannot be carried exactly", "key"
                )

    before_schema = _fields(value_schema, "before")
    after_schema = _fields(value_schema, "after")
    before = after = None
    inexact: set[str] = set()
    if payload.get("before") is not None:
        before, before_inexact = _row(payload["before"], before_schema, "payload.before")
        if not key_row:
            # Only a keyless table matches rows by the before image.
            inexact |= before_inexact
    if payload.get("after") is not None:
        after, after_inexact = _row(payload["after"], after_schema, "payload.after")
        inexact |= after_inexact

    kind = _OPS[op]
    if kind in (Op.INSERT, Op.READ) and after is not None:
        # The create half of a key change can carry the TOAST placeholder: the real
        # value exists only on the source.
        inexact |= {name for name, v in after.items() if v is UNAVAILABLE}
    if kind in (Op.INSERT, Op.READ, Op.UPDATE) and after is None:
        raise DecodeError(f"op {op!r} without an after image", "payload.after")
    if kind is Op.DELETE and before is None:
        raise DecodeError("delete without a before image", "payload.before")
    if key_row:
        image = after if after is not None else before
        assert image is not None
        missing = [k for k in key_row if k not in image]
        if missing:
            raise DecodeError(f"key columns {missing} are not in the row", "key")
        if kind is not Op.DELETE and any(image[k] != v for k, v in key_row.items()):
            raise DecodeError("key does not match the row's key columns", "key")
    elif kind in (Op.UPDATE, Op.DELETE) and before is None:
        raise DecodeError("keyless change without a before image (REPLICA IDENTITY FULL?)")

    columns = tuple(
        Column(name, bool(s.get("optional", True)), source_type(s) or None)
        for name, s in (after_schema or before_schema or {}).items()
    )
    return RowChange(
        table=table,
        op=kind,
        key=key_row,
        before=before,
        after=after,
        source=_source(payload),
        position=position,
        columns=columns,
        inexact=frozenset(inexact),
    )


def _message(payload: dict[str, Any], position: Position) -> LogicalMessage:
    body = payload.get("message")
    if not isinstance(body, dict):
        raise DecodeError("logical message without a message block", "payload.message")
    prefix = body.get("prefix")
    content = body.get("content")
    if not isinstance(prefix, str):
        raise DecodeError("logical message without a prefix", "payload.message.prefix")
    raw = b""
    if isinstance(content, str):
        try:
            raw = binascii.unhexlify(content)
        except (binascii.Error, ValueError):
            try:
                raw = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise DecodeError("undecodable content", "payload.message.content") from exc
    source = _source(payload)
    return LogicalMessage(prefix, raw, source.tx_id is not None, source, position)
