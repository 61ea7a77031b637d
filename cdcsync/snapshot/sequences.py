"""Sequence positions, copied after the data and again at cutover.

Sequences are not transactional and not streamed, so their value is read as it is
now (never earlier than the snapshot) and set on the target with the same
``is_called`` flag: the next ``nextval`` on the target then never hands out a value
the source already used up to that moment.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from cdcsync.core.events import TableId
from cdcsync.snapshot import catalog

log = logging.getLogger("cdcsync.snapshot")


@dataclass(frozen=True)
class SequenceValue:
    sequence: TableId
    last_value: int
    is_called: bool


def read(conn: psycopg.Connection[Any], sequences: Iterable[TableId]) -> list[SequenceValue]:
    out: list[SequenceValue] = []
    for seq in sequences:
        row = conn.execute(
            sql.SQL("SELECT last_value, is_called FROM {}").format(
                sql.Identifier(seq.schema, seq.name)
            )
        ).fetchone()
        if row is not None:
            out.append(SequenceValue(seq, int(row[0]), bool(row[1])))
    conn.rollback()
    return out


def write(conn: psycopg.Connection[Any], values: Iterable[SequenceValue]) -> int:
    """Set each sequence that exists on the target; returns how many were set."""
    done = 0
    with conn.transaction():
        for value in values:
            if not catalog.exists(conn, value.sequence):
                log.warning("sequence %s does not exist on the target: not set", value.sequence)
                continue
            conn.execute(
                "SELECT setval(%s::regclass, %s, %s)",
                (catalog.qualified(value.sequence), value.last_value, value.is_called),
            )
            done += 1
    return done


def copy_sequences(
    source: psycopg.Connection[Any], target: psycopg.Connection[Any], schemas: Iterable[str]
) -> int:
    """Copy the positions of every sequence of ``schemas``; returns how many were set."""
    values = read(source, catalog.sequences(source, schemas))
    return write(target, values)
