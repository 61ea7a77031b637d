"""Convert one Debezium field value into PostgreSQL's text input form, exactly or not at all.

Decoding goes by the field's schema (``name``, ``parameters``) and the propagated source
column type, never by the JSON type alone: an integer may be days, milliseconds or
microseconds since the epoch depending on the schema name. A value the event cannot
carry exactly (DEBEZIUM.md lists them) is reported as inexact so the applier reads it
from the source instead of writing something wrong.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from cdcsync.core.events import UNAVAILABLE, Value
from cdcsync.errors import DecodeError

PLACEHOLDER = "__debezium_unavailable_value"

# Source types whose values arrive as hex (binary.handling.mode=hex) of their text form.
_TEXT_AS_BYTES = {"BOX", "LINE", "LSEG", "PATH", "POLYGON", "CIRCLE", "PG_LSN"}
# Source types the event never carries exactly (see DEBEZIUM.md).
_ALWAYS_INEXACT = {"TIMETZ", "VARBIT", "_INTERVAL"}

# Types Debezium sends as plain strings; any other source type sent as a string of hex
# digits is an unknown type sent as the hex of its text form (include.unknown.datatypes).
_KNOWN_STRING_TYPES = {
    "TEXT",
    "VARCHAR",
    "BPCHAR",
    "CHAR",
    "NAME",
    "NUMERIC",
    "DECIMAL",
    "MONEY",
    "UUID",
    "JSON",
    "JSONB",
    "XML",
    "INET",
    "CIDR",
    "MACADDR",
    "MACADDR8",
    "TSVECTOR",
    "TSQUERY",
    "INTERVAL",
    "INT4RANGE",
    "INT8RANGE",
    "NUMRANGE",
    "TSRANGE",
    "TSTZRANGE",
    "DATERANGE",
    "CITEXT",
    "HSTORE",
    "LTREE",
    "TIMESTAMPTZ",
    "TIMETZ",
    "BIT",
    "VARBIT",
    "OID",
}
_UNKNOWN_AS_HEX = re.compile(r"(?:[0-9a-f]{2})+")
_US_PER_DAY = 86_400_000_000
_LONG_MAX = 2**63 - 1
_LONG_MIN = -(2**63)
# PostgreSQL's ±infinity timestamps as Debezium converts them to epoch microseconds.
_TS_INFINITY = {_LONG_MAX, 9_223_372_036_825_200_000}
_TS_MINUS_INFINITY = {_LONG_MIN, -9_223_372_036_832_400_000}
# Dates further than this from the epoch are Debezium's stand-ins for ±infinity.
_SANE_DAYS = 2_000_000


@dataclass(frozen=True, slots=True)
class Converted:
    """A converted value; ``exact`` is False when it must come from the source instead."""

    value: Value
    exact: bool = True


INEXACT = Converted(None, exact=False)


def source_type(schema: dict[str, Any]) -> str:
    """The propagated source column type, upper-cased, or ``''``."""
    params = schema.get("parameters") or {}
    return str(params.get("__debezium.source.column.type", "")).upper()


def civil_from_days(days: int) -> tuple[int, int, int]:
    """Proleptic Gregorian (year, month, day) of a day count since 1970-01-01.

    Year 0 is 1 BC, as in astronomical numbering; integer arithmetic keeps BC exact.
    """
    z = days + 719_468
    era = (z if z >= 0 else z - 146_096) // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return (y + 1 if m <= 2 else y), m, d


def format_date(days: int) -> str:
    year, month, day = civil_from_days(days)
    if year <= 0:
        return f"{1 - year:04d}-{month:02d}-{day:02d} BC"
    return f"{year:04d}-{month:02d}-{day:02d}"


_EPOCH = _dt.datetime(1970, 1, 1)
_ONE_US = _dt.timedelta(microseconds=1)
# 0001-01-01 00:00:00 and 9999-12-31 23:59:59.999999: the years datetime formats like we do.
_DT_MIN_US = (_dt.datetime.min - _EPOCH) // _ONE_US
_DT_MAX_US = (_dt.datetime.max - _EPOCH) // _ONE_US


def format_timestamp_us(micros: int) -> str:
    """Microseconds since the epoch → ``YYYY-MM-DD HH:MM:SS.ffffff[ BC]``."""
    if _DT_MIN_US <= micros <= _DT_MAX_US:
        # datetime's C formatting is several times faster than the arithmetic below and
        # gives the same text for years 1..9999 (tested against it).
        return (_EPOCH + _dt.timedelta(microseconds=micros)).isoformat(" ", "microseconds")
    if micros in _TS_INFINITY:
        return "infinity"
    if micros in _TS_MINUS_INFINITY:
        return "-infinity"
    days, rem = divmod(micros, _US_PER_DAY)
    year, month, day = civil_from_days(days)
    secs, frac = divmod(rem, 1_000_000)
    hh, rest = divmod(secs, 3600)
    mm, ss = divmod(rest, 60)
    clock = f"{hh:02d}:{mm:02d}:{ss:02d}.{frac:06d}"
    if year <= 0:
        return f"{1 - year:04d}-{month:02d}-{day:02d} {clock} BC"
    return f"{year:04d}-{month:02d}-{day:02d} {clock}"


def format_time_us(micros: int) -> str:
    """Microseconds since midnight; 24:00:00 is a valid PostgreSQL time and kept."""
    secs, frac = divmod(micros, 1_000_000)
    hh, rest = divmod(secs, 3600)
    mm, ss = divmod(rest, 60)
    return f"{hh:02d}:{mm:02d}:{ss:02d}.{frac:06d}"


_ISO_BC = re.compile(r"^(-?)(\d{4,6})(-\d\d-\d\dT.*)$")


def iso_zoned(text: str) -> str:
    """A ZonedTimestamp string; astronomical (signed) years become ``BC``."""
    if text in ("infinity", "-infinity"):
        return text
    match = _ISO_BC.match(text)
    if not match:
        raise DecodeError(f"not an ISO timestamp: {text[:40]!r}")
    sign, year_s, rest = match.groups()
    year = -int(year_s) if sign else int(year_s)
    if year > 0:
        return f"{year:04d}{rest}"
    return f"{1 - year:04d}{rest} BC"


def _hex(text: str, field: str) -> bytes:
    try:
        return binascii.unhexlify(text)
    except (binascii.Error, ValueError) as exc:
        raise DecodeError("expected hex-encoded bytes", field) from exc


def bits_from_le(data: bytes, length: int) -> str:
    """Debezium's Bits: little-endian bytes of the bit string read as an integer."""
    number = int.from_bytes(data, "little")
    if number.bit_length() > length:
        raise DecodeError(f"bit string longer than its declared length {length}")
    return format(number, "b").zfill(length)


def _int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise DecodeError(f"expected an integer, got {type(value).__name__}", field)
    try:
        return int(value)
    except ValueError as exc:
        raise DecodeError(f"expected an integer, got {value!r:.40}", field) from exc


_SPECIAL_NUMERIC = {
    "NAN": "NaN",
    "POSITIVE_INFINITY": "Infinity",
    "NEGATIVE_INFINITY": "-Infinity",
}
_NUMBER = re.compile(r"^-?\d+(\.\d+)?([eE][-+]?\d+)?$")


def convert(value: Any, schema: dict[str, Any], field: str) -> Converted:
    """One field value → PostgreSQL text input form (or inexact, or UNAVAILABLE)."""
    optional = bool(schema.get("optional", True))
    stype = source_type(schema)
    if value is None:
        # A NULL in a NOT NULL column means Debezium dropped the value (e.g. `name`);
        # a NULL date may be an infinite date Debezium could not express.
        if not optional or schema.get("name") == "io.debezium.time.Date":
            return INEXACT
        return Converted(None)
    if value in (PLACEHOLDER, [PLACEHOLDER]):
        return Converted(UNAVAILABLE)
    if stype in _ALWAYS_INEXACT or stype.startswith("_") or schema.get("type") == "array":
        # Arrays: lower bounds and dimensions are not carried, NULL elements can turn the
        # whole array NULL; the source has the truth.
        return INEXACT
    name = schema.get("name") or ""
    kind = schema.get("type")
    params = schema.get("parameters") or {}

    if name == "io.debezium.time.Date":
        days = _int(value, field)
        # ±infinity dates arrive as out-of-range constants (or as NULL, handled above).
        return INEXACT if abs(days) > _SANE_DAYS else Converted(format_date(days))
    if name == "io.debezium.time.Timestamp":
        return Converted(format_timestamp_us(_int(value, field) * 1000))
    if name == "io.debezium.time.MicroTimestamp":
        return Converted(format_timestamp_us(_int(value, field)))
    if name == "io.debezium.time.NanoTimestamp":
        return Converted(format_timestamp_us(_int(value, field) // 1000))
    if name == "io.debezium.time.Time":
        return Converted(format_time_us(_int(value, field) * 1000))
    if name == "io.debezium.time.MicroTime":
        return Converted(format_time_us(_int(value, field)))
    if name == "io.debezium.time.NanoTime":
        return Converted(format_time_us(_int(value, field) // 1000))
    if name == "io.debezium.time.ZonedTimestamp":
        return Converted(iso_zoned(_str(value, field)))
    if name == "io.debezium.time.ZonedTime":
        return INEXACT  # the offset is lost: converted to UTC
    if name in ("io.debezium.time.IsoTimestamp", "io.debezium.time.IsoDate"):
        return Converted(iso_zoned(_str(value, field)))
    if name == "io.debezium.data.Bits":
        length = int(params.get("length", 0) or 0)
        raw = _base64(value, field)
        return Converted(bits_from_le(raw, length))
    if name == "io.debezium.data.geometry.Point":
        if not isinstance(value, dict) or "x" not in value or "y" not in value:
            raise DecodeError("expected a point struct with x and y", field)
        return Converted(f"({_float_text(value['x'], field)},{_float_text(value['y'], field)})")
    if name in ("io.debezium.data.VariableScaleDecimal", "org.apache.kafka.connect.data.Decimal"):
        raise DecodeError(
            "numeric in binary form: set decimal.handling.mode=string on the connector", field
        )
    if kind == "string" and stype in ("BYTEA", *_TEXT_AS_BYTES):
        # binary.handling.mode=hex declares these as strings holding hex.
        raw = _hex(_str(value, field), field)
        if stype == "BYTEA":
            return Converted("\\x" + raw.hex())
        return Converted(raw.decode("utf-8"))
    if (
        kind == "string"
        and name == ""
        and stype
        and stype not in _KNOWN_STRING_TYPES
        and _UNKNOWN_AS_HEX.fullmatch(_str(value, field))
    ):
        # An unknown type (composite, ...) sent as hex of its text, or a domain over
        # text whose value happens to be hex digits: ambiguous, so the source decides.
        return INEXACT
    if kind == "string":
        text = _str(value, field)
        if stype in ("NUMERIC", "DECIMAL") and text in _SPECIAL_NUMERIC:
            return Converted(_SPECIAL_NUMERIC[text])
        return Converted(text)
    if kind == "bytes":
        raw = _base64(value, field)
        if stype in ("", "BYTEA"):
            return Converted("\\x" + raw.hex())
        return Converted(raw.decode("utf-8"))
    if kind == "boolean":
        if not isinstance(value, bool):
            raise DecodeError(f"expected a boolean, got {type(value).__name__}", field)
        return Converted("t" if value else "f")
    if kind in ("int8", "int16", "int32", "int64"):
        return Converted(str(_int(value, field)))
    if kind in ("float", "double", "float32", "float64"):
        return Converted(_float_text(value, field))
    if kind == "struct":
        raise DecodeError(f"unsupported struct type {name or 'unnamed'}", field)
    raise DecodeError(f"unsupported field type {kind!r}", field)


def _str(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise DecodeError(f"expected a string, got {type(value).__name__}", field)
    return value


def _base64(value: Any, field: str) -> bytes:
    """Connect ``bytes`` fields: the JSON converter always writes base64."""
    try:
        return base64.b64decode(_str(value, field), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DecodeError("expected base64 bytes", field) from exc


def _bytes(value: Any, field: str) -> bytes:
    """Bytes as sent with binary.handling.mode=hex, the mode cdcsync requires."""
    return _hex(_str(value, field), field)


_FLOAT_WORDS = {"NaN": "NaN", "Infinity": "Infinity", "-Infinity": "-Infinity"}


def _float_text(value: Any, field: str) -> str:
    """Floats keep the exact text the JSON carried (parsed with parse_float=str)."""
    if isinstance(value, bool):
        raise DecodeError("expected a number, got a boolean", field)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if value in _FLOAT_WORDS:
            return _FLOAT_WORDS[value]
        if _NUMBER.match(value):
            return value
    if isinstance(value, float):
        return repr(value)
    raise DecodeError(f"expected a number, got {value!r:.40}", field)


class NeedsExactText(Exception):
    """A value holds a float only a fast parser produces: decode again with exact text.

    Internal to decoding, never escapes :func:`cdcsync.core.debezium.decode`.
    """


def _has_float(value: Any) -> bool:
    """Whether a JSON value holds a plain ``float`` anywhere (iteratively: no recursion)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is float:
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class _Inexact(enum.Enum):
    """Marker a compiled converter returns for a value that must come from the source."""

    INEXACT = "inexact"

    def __repr__(self) -> str:
        return "INEXACT"


INEXACT_MARK: Final = _Inexact.INEXACT

#: What a compiled converter returns: the text input form, NULL, UNAVAILABLE or INEXACT_MARK.
Result: TypeAlias = Value | _Inexact
Converter: TypeAlias = Callable[[Any], Result]

_PLACEHOLDERS = (PLACEHOLDER, [PLACEHOLDER])
_INT_KINDS = frozenset({"int8", "int16", "int32", "int64"})
_BYTES_AS_HEX = frozenset({"BYTEA", *_TEXT_AS_BYTES})
# Schema names :func:`convert` dispatches on before it looks at the type.
_NAMED = frozenset(
    {
        "io.debezium.time.Date",
        "io.debezium.time.Timestamp",
        "io.debezium.time.MicroTimestamp",
        "io.debezium.time.NanoTimestamp",
        "io.debezium.time.Time",
        "io.debezium.time.MicroTime",
        "io.debezium.time.NanoTime",
        "io.debezium.time.ZonedTimestamp",
        "io.debezium.time.ZonedTime",
        "io.debezium.time.IsoTimestamp",
        "io.debezium.time.IsoDate",
        "io.debezium.data.Bits",
        "io.debezium.data.geometry.Point",
        "io.debezium.data.VariableScaleDecimal",
        "org.apache.kafka.connect.data.Decimal",
    }
)


def compile_converter(schema: dict[str, Any], field: str) -> Converter:
    """:func:`convert` specialised once per field schema, for the per-message hot path.

    The schema of a topic repeats in every message, so the dispatch on name, type and
    source type is done here once. Fast paths cover the value shapes that dominate real
    streams; anything else goes through :func:`convert` itself, so results (and errors)
    are the same value for value — the unit tests check this property.
    """

    def generic(value: Any) -> Result:
        if _has_float(value):
            raise NeedsExactText
        converted = convert(value, schema, field)
        return converted.value if converted.exact else INEXACT_MARK

    try:
        optional = bool(schema.get("optional", True))
        stype = source_type(schema)
        name = schema.get("name") or ""
        kind = schema.get("type")
    except Exception:  # a malformed schema: let convert raise, value by value
        return generic
    if not isinstance(name, str) or not isinstance(kind, str):
        return generic
    null: Result = INEXACT_MARK if not optional or name == "io.debezium.time.Date" else None

    if stype in _ALWAYS_INEXACT or stype.startswith("_") or kind == "array":

        def always_inexact(value: Any) -> Result:
            if value is None:
                return null
            return UNAVAILABLE if value in _PLACEHOLDERS else INEXACT_MARK

        return always_inexact
    if name == "io.debezium.time.MicroTimestamp":

        def micro_timestamp(value: Any) -> Result:
            if type(value) is int:
                return format_timestamp_us(value)
            return null if value is None else generic(value)

        return micro_timestamp
    if name == "io.debezium.time.Date":

        def date(value: Any) -> Result:
            if type(value) is int:
                return INEXACT_MARK if abs(value) > _SANE_DAYS else format_date(value)
            return null if value is None else generic(value)

        return date
    if name in _NAMED:
        return generic
    if kind in _INT_KINDS:

        def integer(value: Any) -> Result:
            if type(value) is int:
                return str(value)
            return null if value is None else generic(value)

        return integer
    if (
        kind == "string"
        and stype not in _BYTES_AS_HEX
        and not (name == "" and stype and stype not in _KNOWN_STRING_TYPES)
    ):
        if stype in ("NUMERIC", "DECIMAL"):

            def numeric(value: Any) -> Result:
                if type(value) is str and value != PLACEHOLDER:
                    return _SPECIAL_NUMERIC.get(value, value)
                return null if value is None else generic(value)

            return numeric

        def string(value: Any) -> Result:
            if type(value) is str and value != PLACEHOLDER:
                return value
            return null if value is None else generic(value)

        return string
    if kind == "boolean":

        def boolean(value: Any) -> Result:
            if value is True:
                return "t"
            if value is False:
                return "f"
            return null if value is None else generic(value)

        return boolean
    return generic
