"""The neutral event model: what a change means, independent of Debezium's wire format.

Values are carried in PostgreSQL's *text input form* for the column's type (the text
``COPY ... FROM`` accepts), or ``None`` for SQL NULL, or :data:`UNAVAILABLE` when the
source did not send the value (an unchanged TOASTed column). Carrying text keeps every
value exact: the target parses it with the same input function the source's output
came from, so numerics, timestamps, ranges and arrays round-trip bit for bit.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, NamedTuple, TypeAlias


class _Unavailable(enum.Enum):
    """Marker for a value the event does not carry (Debezium's TOAST placeholder)."""

    UNAVAILABLE = "__debezium_unavailable_value"

    def __repr__(self) -> str:
        return "UNAVAILABLE"


UNAVAILABLE: Final = _Unavailable.UNAVAILABLE

#: A column value: PostgreSQL text input form, SQL NULL, or not sent.
Value: TypeAlias = str | _Unavailable | None
Row: TypeAlias = Mapping[str, Value]


class Op(enum.Enum):
    """Row operations, named by what they do to the target."""

    INSERT = "c"
    UPDATE = "u"
    DELETE = "d"
    READ = "r"  # a row from Debezium's own snapshot; applied as an upsert


class TableId(NamedTuple):
    """A table by its true (unquoted, case-preserved) schema and name.

    A named tuple rather than a frozen dataclass: it keys every per-table dictionary
    of the apply path, and a tuple hashes in C, without a Python-level ``__hash__``.
    """

    schema: str
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


class Position(NamedTuple):
    """Where a message sits in Kafka; the unit of exactly-once bookkeeping.

    A named tuple: one is built per message, about five times faster than a frozen
    dataclass.
    """

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class Column:
    """A column as the event's schema describes it.

    ``pg_type`` is the source column type when the connector propagates it
    (``column.propagate.source.type``), upper-cased as Debezium sends it.
    """

    name: str
    optional: bool
    pg_type: str | None = None


@dataclass(slots=True)
class SourceInfo:
    """Where and when the change happened on the source.

    Not frozen, like :class:`RowChange`: one is built per event, and a frozen
    dataclass's constructor costs three times as much. Neither is changed once built.
    """

    lsn: int | None
    tx_id: int | None
    commit_ts_ms: int | None
    snapshot: bool = False


@dataclass(slots=True)
class RowChange:
    """An insert, update, delete or snapshot read of one row.

    ``key`` holds the primary-key columns (empty for a table without a key, whose
    changes are matched by the full ``before`` image). ``before`` is ``None`` when the
    source did not send a before-image.
    """

    table: TableId
    op: Op
    key: Mapping[str, Value]
    before: Row | None
    after: Row | None
    source: SourceInfo
    position: Position
    columns: tuple[Column, ...] = field(default=())
    #: Columns whose value the event cannot carry exactly (see DEBEZIUM.md): the
    #: applier must read them from the source by key, or halt; never write them as sent.
    inexact: frozenset[str] = field(default=frozenset())

    @property
    def keyed(self) -> bool:
        return bool(self.key)


@dataclass(frozen=True, slots=True)
class Truncate:
    """``TRUNCATE`` of one table (captured with ``skipped.operations=none``)."""

    table: TableId
    source: SourceInfo
    position: Position


@dataclass(frozen=True, slots=True)
class Tombstone:
    """The null-valued message Debezium sends after a delete; compaction hint only."""

    position: Position


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A heartbeat: proves the stream is alive and moves the source position."""

    position: Position
    lsn: int | None
    ts_ms: int | None


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """A ``pg_logical_emit_message`` record; cutover uses them as drain markers."""

    prefix: str
    content: bytes
    transactional: bool
    source: SourceInfo
    position: Position


Event: TypeAlias = RowChange | Truncate | Tombstone | Heartbeat | LogicalMessage


def position_of(event: Event) -> Position:
    """The Kafka position every event kind carries."""
    return event.position
