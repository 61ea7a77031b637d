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
from collections.abc import Callable
from typing import Any

import orjson

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
from cdcsync.core.pg_values import (
    INEXACT_MARK,
    NeedsExactText,
    compile_converter,
    source_type,
)
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


_SCHEMA_HEAD = b'{"schema":'
_PAYLOAD_KEY = b',"payload":'
_CACHE_LIMIT = 4096


class _JsonConstant(float):
    """``NaN``/``Infinity`` literals from the exact parser: floats, but not of type float.

    Named ``float`` so messages read as before; being a subclass keeps them apart from
    the plain floats only orjson produces (see :class:`NeedsExactText`).
    """


_JsonConstant.__name__ = _JsonConstant.__qualname__ = "float"


def _exact(data: bytes) -> Any:
    """The reference parser: numbers with a fraction or exponent keep their JSON text."""
    return json.loads(data, parse_float=str, parse_constant=_JsonConstant)


def _fast(data: bytes) -> Any:
    """orjson, about 7x faster; the stdlib where orjson refuses (lone surrogates, NaN, …).

    orjson turns fractions, exponents and integers beyond 64 bits into floats, losing
    their text: a plain ``float`` seen where a value is used raises NeedsExactText and
    the message is decoded again with :func:`_exact`.
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return _exact(data)


def _check(value: Any) -> Any:
    """``value``, unless it is a float only orjson would produce."""
    if type(value) is float:
        raise NeedsExactText
    return value


def _loads(data: bytes, what: str) -> Any:
    if len(data) > MAX_MESSAGE_BYTES:
        raise DecodeError(f"{what} is {len(data)} bytes, over the {MAX_MESSAGE_BYTES} limit")
    try:
        return _exact(data)
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


def _schema_prefix(data: bytes, schema: dict[str, Any]) -> bytes | None:
    """``{"schema":<schema>,"payload":`` as it starts ``data``, or None if it cannot tell.

    A candidate split is accepted only if the bytes before it parse to ``schema`` itself:
    a JSON object is self-delimiting, so equal bytes then mean an equal schema.
    """
    if not data.startswith(_SCHEMA_HEAD):
        return None
    start = len(_SCHEMA_HEAD)
    at = data.find(_PAYLOAD_KEY, start)
    while at != -1:
        try:
            if _exact(data[start:at]) == schema:
                return data[: at + len(_PAYLOAD_KEY)]
        except (ValueError, RecursionError):
            pass
        at = data.find(_PAYLOAD_KEY, at + 1)
    return None


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


class _RowPlan:
    """A struct schema compiled once: field names and one converter per field."""

    __slots__ = ("converters", "names", "schemas")

    def __init__(self, schemas: dict[str, dict[str, Any]], where: str) -> None:
        self.names = frozenset(schemas)
        self.schemas = schemas
        self.converters = tuple(
            (name, compile_converter(s, f"{where}.{name}")) for name, s in schemas.items()
        )

    def same_fields(self, other: _RowPlan | None) -> bool:
        """Whether each of this plan's fields has the same schema in ``other``: the same
        JSON value then decodes to the same PostgreSQL value under either plan."""
        return other is not None and all(
            other.schemas.get(name) == schema for name, schema in self.schemas.items()
        )


_Deferred = _RowPlan | None | DecodeError


def _defer(make: Any) -> Any:
    """Compile now, but raise a schema error only when a message needs that part."""
    try:
        return make()
    except DecodeError as exc:
        return exc
    except Exception as exc:  # same wording as decode's catch-all
        return DecodeError(f"malformed message ({type(exc).__name__}: {str(exc)[:80]})")


def _need(part: Any) -> Any:
    """``part``, or its deferred error raised afresh (a shared one would pile up tracebacks)."""
    if isinstance(part, DecodeError):
        raise DecodeError(part.reason, part.field) from None
    return part


def _plan_rows(fields: dict[str, dict[str, Any]] | None, where: str) -> _RowPlan | None:
    return None if fields is None else _RowPlan(fields, where)


class _ValuePlan:
    """What a value schema means, derived once per distinct schema of a topic."""

    __slots__ = ("after", "before", "columns")

    def __init__(self, schema: dict[str, Any] | None) -> None:
        before = _defer(lambda: _fields(schema, "before"))
        after = _defer(lambda: _fields(schema, "after"))
        self.before: _Deferred = _defer(lambda: _plan_rows(_need(before), "payload.before"))
        self.after: _Deferred = _defer(lambda: _plan_rows(_need(after), "payload.after"))

        def columns() -> tuple[Column, ...]:
            fields = _need(after) or _need(before) or {}
            return tuple(
                Column(name, bool(s.get("optional", True)), source_type(s) or None)
                for name, s in fields.items()
            )

        self.columns: tuple[Column, ...] | DecodeError = _defer(columns)


class _KeyPlan:
    __slots__ = ("agrees", "rows")

    def __init__(self, schema: dict[str, Any] | None) -> None:
        self.rows: _Deferred = _defer(lambda: _plan_rows(_key_fields(schema), "key"))
        # The row plan last found to give the key's fields the key's own schemas, and
        # whether it does: then the key is checked on the raw JSON and taken from the
        # decoded row, not decoded twice. Rewritten whole, so safe across threads.
        self.agrees: tuple[_RowPlan | None, bool] = (None, False)

    def agrees_with(self, image: _RowPlan | None) -> bool:
        rows = self.rows
        if not isinstance(rows, _RowPlan) or image is None:
            return False
        seen, same = self.agrees
        if seen is not image:
            same = rows.same_fields(image)
            self.agrees = (image, same)
        return same


class Decoder:
    """Decodes messages, reusing the work derived from each topic's embedded schema.

    The JSON converter repeats the full schema in every message, and it dwarfs the
    payload. Per topic the decoder keeps the last schema's exact bytes with its compiled
    plan: a message starting with those bytes has only its payload parsed. Anything else
    (a new schema, odd spacing, extra members) takes the full path, so results never
    depend on the cache. Safe to share between threads: entries are replaced, not mutated.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[str, bool], tuple[bytes, Any]] = {}
        self._tables: dict[tuple[str, str], TableId] = {}
        self._kinds: dict[tuple[str, str], str] = {}

    def decode(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        topic_prefix: str,
    ) -> Event:
        """One Kafka message → one event. Raises only :class:`DecodeError`."""
        position = Position(topic, partition, offset)
        try:
            try:
                return self._decode(topic, position, key, value, topic_prefix, _fast)
            except NeedsExactText:
                return self._decode(topic, position, key, value, topic_prefix, _exact)
        except DecodeError:
            raise
        except Exception as exc:  # anything unexpected in a message is bad input too
            raise DecodeError(
                f"malformed message ({type(exc).__name__}: {str(exc)[:80]})"
            ) from None

    def _document(
        self, topic: str, is_key: bool, data: bytes, parse: Callable[[bytes], Any]
    ) -> tuple[Any, Any]:
        """(compiled plan, payload) of a key or value document.

        The full path parses with the exact parser (schemas are read as before); only a
        payload behind known schema bytes goes through ``parse``.
        """
        what = "key" if is_key else "value"
        if len(data) > MAX_MESSAGE_BYTES:
            raise DecodeError(f"{what} is {len(data)} bytes, over the {MAX_MESSAGE_BYTES} limit")
        slot = (topic, is_key)
        hit = self._cache.get(slot)
        if hit is not None and data.startswith(hit[0]) and data.endswith(b"}"):
            try:
                return hit[1], parse(data[len(hit[0]) : -1])
            except (ValueError, RecursionError):
                pass  # e.g. members after the payload: the full path decides
        schema, payload = _envelope(_loads(data, what), what)
        plan = _KeyPlan(schema) if is_key else _ValuePlan(schema)
        if schema is not None:
            prefix = _schema_prefix(data, schema)
            if prefix is not None:
                if len(self._cache) >= _CACHE_LIMIT:
                    self._cache.clear()
                self._cache[slot] = (prefix, plan)
        return plan, payload

    def _table(self, payload: dict[str, Any]) -> TableId:
        source = payload.get("source")
        if type(source) is dict:
            schema, table = source.get("schema"), source.get("table")
            if type(schema) is str and type(table) is str:
                found = self._tables.get((schema, table))  # holds validated names only
                if found is not None:
                    return found
        if not isinstance(source, dict):
            raise DecodeError("missing source block", "payload.source")
        schema, table = _check(source.get("schema")), _check(source.get("table"))
        if not isinstance(schema, str) or not isinstance(table, str) or not schema or not table:
            raise DecodeError("source block lacks schema or table", "payload.source")
        found = self._tables.get((schema, table))
        if found is None:
            if len(self._tables) >= _CACHE_LIMIT:
                self._tables.clear()
            found = self._tables[(schema, table)] = TableId(schema, table)
        return found

    def _decode(
        self,
        topic: str,
        position: Position,
        key: bytes | None,
        value: bytes | None,
        prefix: str,
        parse: Callable[[bytes], Any],
    ) -> Event:
        kind = self._kinds.get((topic, prefix))
        if kind is None:
            kind = self._topic_kind(topic, prefix)
        if kind != _CHANGES:
            return self._not_a_change(kind, topic, position, value, prefix)
        if value is None:
            # Tombstones follow deletes; a keyless table's tombstone has a null key too.
            return Tombstone(position)
        return self._json_change(topic, position, key, value, parse)

    def _topic_kind(self, topic: str, prefix: str) -> str:
        """What ``topic`` carries, remembered per topic (the names are checked once)."""
        if topic.startswith(f"{HEARTBEAT_TOPIC_PREFIX}."):
            kind = _HEARTBEATS
        elif not topic.startswith(f"{prefix}."):
            kind = _FOREIGN
        elif topic == f"{prefix}.transaction":
            kind = _TRANSACTIONS
        else:
            kind = _CHANGES
        if len(self._kinds) >= _CACHE_LIMIT:
            self._kinds.clear()
        self._kinds[(topic, prefix)] = kind
        return kind

    def _not_a_change(
        self, kind: str, topic: str, position: Position, value: bytes | None, prefix: str
    ) -> Event:
        if kind == _HEARTBEATS:
            if value is None:
                return Heartbeat(position, None, None)
            _schema, payload = _envelope(_loads(value, "value"), "value")
            ts = payload.get("ts_ms") if isinstance(payload, dict) else None
            return Heartbeat(position, None, ts if isinstance(ts, int) else None)
        if kind == _FOREIGN:
            raise DecodeError(f"topic {topic!r} is not under the migration's prefix {prefix!r}")
        return Heartbeat(position, None, None)  # transaction metadata

    def _json_change(
        self,
        topic: str,
        position: Position,
        key: bytes | None,
        value: bytes,
        parse: Callable[[bytes], Any],
    ) -> Event:
        plan, payload = self._document(topic, False, value, parse)
        if not isinstance(payload, dict):
            raise DecodeError("value payload is not an object", "payload")
        op = payload.get("op")
        if type(op) is float:  # only orjson makes one: the exact parser decides
            raise NeedsExactText
        if op == "m":
            return _message(payload, position)
        if op == "t":
            return Truncate(self._table(payload), _source(payload), position)
        if type(op) is not str:
            raise DecodeError(f"op must be a string, not {type(op).__name__}", "payload.op")
        kind = _OPS.get(op)
        if kind is None:
            raise DecodeError(f"unknown op {op!r}", "payload.op")
        table = self._table(payload)

        before_plan, after_plan = plan.before, plan.after
        if isinstance(before_plan, DecodeError) or isinstance(after_plan, DecodeError):
            before_plan, after_plan = _need(before_plan), _need(after_plan)
        before = after = None
        before_inexact = after_inexact = _NO_NAMES
        raw_before, raw_after = payload.get("before"), payload.get("after")
        if raw_before is not None:
            before, before_inexact = _row(raw_before, before_plan, "payload.before")
        if raw_after is not None:
            after, after_inexact = _row(raw_after, after_plan, "payload.after")

        if kind in (Op.INSERT, Op.READ, Op.UPDATE) and after is None:
            raise DecodeError(f"op {op!r} without an after image", "payload.after")
        if kind is Op.DELETE and before is None:
            raise DecodeError("delete without a before image", "payload.before")

        key_row: dict[str, Value] = {}
        if key is not None:
            key_plan, key_payload = self._document(topic, True, key, parse)
            if key_payload is not None:
                deleted = kind is Op.DELETE
                if after is not None:
                    key_row = _key(
                        key_plan, key_payload, after, raw_after, after_plan, after_inexact, deleted
                    )
                else:
                    assert before is not None
                    key_row = _key(
                        key_plan,
                        key_payload,
                        before,
                        raw_before,
                        before_plan,
                        before_inexact,
                        deleted,
                    )

        inexact = after_inexact
        if not key_row and before_inexact:
            # Only a keyless table matches rows by the before image.
            inexact = inexact | before_inexact
        creates = kind is Op.INSERT or kind is Op.READ
        if creates and after is not None and UNAVAILABLE in after.values():
            # The create half of a key change can carry the TOAST placeholder: the real
            # value exists only on the source.
            inexact = inexact | {name for name, v in after.items() if v is UNAVAILABLE}
        if not key_row and kind in (Op.UPDATE, Op.DELETE) and before is None:
            raise DecodeError("keyless change without a before image (REPLICA IDENTITY FULL?)")

        columns = plan.columns
        if type(columns) is not tuple:
            columns = _need(columns)
        return RowChange(  # positional: keywords cost half as much again, per event
            table,
            kind,
            key_row,
            before,
            after,
            _source(payload),
            position,
            columns,
            frozenset(inexact) if inexact else _NONE_INEXACT,
        )


_NONE_INEXACT: frozenset[str] = frozenset()
_NO_NAMES: set[str] = set()  # shared, never written to
_ABSENT = object()


def _key(
    plan: _KeyPlan,
    payload: Any,
    image: dict[str, Value],
    raw_image: Any,
    image_plan: _RowPlan | None,
    image_inexact: set[str],
    deleted: bool,
) -> dict[str, Value]:
    """The key's columns, checked against the row's (a delete's values are not compared:
    with REPLICA IDENTITY DEFAULT its before image is the key and NULLs).

    When the row's schema gives the key fields the key's own schemas, equal JSON values
    decode equally: the key is compared raw and its values taken from the decoded row.
    """
    rows = _need(plan.rows)
    if (
        type(payload) is dict
        and rows is not None
        and payload.keys() == rows.names
        and plan.agrees_with(image_plan)
    ):
        out: dict[str, Value] = {}
        for name in rows.schemas:
            got = raw_image.get(name, _ABSENT)
            if got is _ABSENT or (not deleted and got != payload[name]):
                break
            if name in image_inexact:
                raise DecodeError(f"key columns {[name]} cannot be carried exactly", "key")
            out[name] = image[name]
        else:
            return out
    key_row, key_inexact = _row(payload, rows, "key")
    if key_inexact:
        raise DecodeError(f"key columns {sorted(key_inexact)} cannot be carried exactly", "key")
    for k, v in key_row.items():  # a loop: faster than building the lists below
        got = image.get(k, _ABSENT)
        if got is _ABSENT or (not deleted and got != v):
            missing = [k for k in key_row if k not in image]
            if missing:
                raise DecodeError(f"key columns {missing} are not in the row", "key")
            raise DecodeError("key does not match the row's key columns", "key")
    return key_row


_CHANGES, _HEARTBEATS, _TRANSACTIONS, _FOREIGN = "changes", "heartbeats", "transactions", "foreign"
_DEFAULT = Decoder()


def decode(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    *,
    topic_prefix: str,
) -> Event:
    """One Kafka message → one event. Raises only :class:`DecodeError`.

    Shares one :class:`Decoder` (and its schema cache) across callers.
    """
    return _DEFAULT.decode(topic, partition, offset, key, value, topic_prefix=topic_prefix)


def _schemaless(value: Any, field: str) -> Value:
    """Without a schema only self-describing values are decoded; the rest is refused."""
    _check(value)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "t" if value else "f"
    raise DecodeError(
        "value is ambiguous without a schema: enable value.converter.schemas.enable", field
    )


def _row(payload: Any, plan: _RowPlan | None, where: str) -> tuple[dict[str, Value], set[str]]:
    if not isinstance(payload, dict):
        raise DecodeError("expected an object", where)
    row: dict[str, Value] = {}
    inexact = _NO_NAMES  # a fresh set only when a column is inexact
    if plan is not None:
        names = plan.names
        complete = payload.keys() == names
        if not complete:
            extra = set(payload) - names
            if extra:
                raise DecodeError(f"fields not in the schema: {sorted(extra)[:5]}", where)
        for name, converter in plan.converters:
            if not complete and name not in payload:
                inexact = inexact | {name}  # Debezium left the column out (interval[])
                row[name] = None
                continue
            got = converter(payload[name])
            if got is INEXACT_MARK:
                inexact = inexact | {name}
                row[name] = None
            else:
                row[name] = got
        return row, inexact
    for name, value in payload.items():
        row[str(name)] = _schemaless(value, f"{where}.{name}")
    return row, inexact


def _source(payload: dict[str, Any]) -> SourceInfo:
    source = payload.get("source")
    if type(source) is dict:
        # The common shape, checked by exact type (a bool is not an int here either).
        lsn, tx_id, ts_ms = source.get("lsn"), source.get("txId"), source.get("ts_ms")
        snapshot = source.get("snapshot")
        if type(lsn) is int and type(tx_id) is int and type(ts_ms) is int and type(snapshot) is str:
            return SourceInfo(lsn, tx_id, ts_ms, snapshot != "false")
    if not isinstance(source, dict):
        raise DecodeError("missing source block", "payload.source")
    snapshot = _check(source.get("snapshot"))
    return SourceInfo(
        lsn=_opt_int(_check(source.get("lsn")), "payload.source.lsn"),
        tx_id=_opt_int(_check(source.get("txId")), "payload.source.txId"),
        commit_ts_ms=_opt_int(_check(source.get("ts_ms")), "payload.source.ts_ms"),
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


def _message(payload: dict[str, Any], position: Position) -> LogicalMessage:
    body = payload.get("message")
    if not isinstance(body, dict):
        raise DecodeError("logical message without a message block", "payload.message")
    prefix = _check(body.get("prefix"))
    content = _check(body.get("content"))
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
