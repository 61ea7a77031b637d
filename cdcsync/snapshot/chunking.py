"""Splitting tables into chunks that workers copy independently (pure: no I/O).

A chunk is a half-open range of a table: of its primary key (``key``), of its heap's
block numbers (``ctid``, for tables without a primary key), or the whole table
(``whole``, for tables small enough to be one chunk). The ranges of one relation are
contiguous, the first unbounded below and the last unbounded above, so every row falls
in exactly one chunk whatever boundaries were chosen: a boundary only moves work
between chunks, never rows in or out of the copy.

Key bounds are PostgreSQL text forms of the key values, compared with a row
constructor, so the database's own ordering (collations included) decides membership.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from psycopg import sql

from cdcsync.core.events import TableId

Kind = Literal["whole", "key", "ctid"]
Bound = tuple[str, ...]

BLOCK_SIZE = 8192


@dataclass(frozen=True)
class Chunk:
    """One unit of copy work, recorded in ``snapshot_chunk`` when its rows commit."""

    table: TableId  # the migrated table, as written on the target
    number: int  # unique within ``table``
    source: TableId  # the heap read on the source: the table or one of its leaf partitions
    kind: Kind
    lower: Bound | None  # inclusive; None: unbounded
    upper: Bound | None  # exclusive; None: unbounded
    est_bytes: int
    filenode: int | None = None  # ctid chunks: the heap file the block numbers refer to


@dataclass(frozen=True)
class Relation:
    """What planning needs to know about one heap."""

    table: TableId  # migrated table it belongs to
    source: TableId  # the heap itself
    blocks: int
    bytes: int
    has_key: bool
    filenode: int | None = None


MIN_CHUNK_BYTES = 8 << 20


def chunk_bytes(total_bytes: int, workers: int, configured: int) -> int:
    """The chunk size to plan with: ``configured``, or less for a small copy.

    Below four chunks per worker, the last chunks would leave workers idle; the size
    then shrinks, though not under 8 MiB (where per-chunk costs start to show) unless
    that much was configured.
    """
    floor = min(configured, MIN_CHUNK_BYTES)
    return max(floor, min(configured, total_bytes // max(4 * workers, 1)))


def pieces_for(nbytes: int, chunk_size: int) -> int:
    """How many chunks a heap of ``nbytes`` (with its TOAST) is cut into (at least one)."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    return max(1, math.ceil(nbytes / chunk_size))


def block_ranges(blocks: int, pieces: int) -> list[tuple[int | None, int | None]]:
    """``pieces`` contiguous block ranges over the heap (fewer if it has fewer blocks).

    The first is open below and the last open above, so rows in blocks appended after
    planning are covered too.
    """
    step = max(1, math.ceil(blocks / max(pieces, 1)))
    starts = list(range(0, max(blocks, 1), step))
    return [
        (None if i == 0 else start, starts[i + 1] if i + 1 < len(starts) else None)
        for i, start in enumerate(starts)
    ]


def pick_boundaries(sorted_keys: Sequence[Bound], pieces: int) -> list[Bound]:
    """``pieces - 1`` (or fewer) boundaries at the quantiles of a sorted key sample.

    ``sorted_keys`` comes from the database in key order; duplicates (a sample can
    repeat a key only if the key is not unique) are skipped so boundaries strictly
    increase and no chunk is empty by construction.
    """
    if pieces <= 1 or not sorted_keys:
        return []
    out: list[Bound] = []
    n = len(sorted_keys)
    for i in range(1, pieces):
        key = sorted_keys[min(n - 1, (i * n) // pieces)]
        if not out or key != out[-1]:
            out.append(key)
    return out


#: Key ranges are used when the key follows the heap's physical order at least this
#: closely; otherwise each range would touch blocks all over the heap (random reads, or
#: the whole heap once per chunk), and block ranges are the cheaper exact partition.
KEY_ORDER_MIN = 0.8


def key_order(blocks_in_key_order: Sequence[int]) -> float:
    """How closely heap position follows key order: Spearman's rank correlation, in [-1, 1].

    Tables filled in key order (serial keys, timestamps) are near 1, even with some rows
    moved by updates (ranks keep a few far-away blocks from weighing more than a few
    rows); random keys (UUIDs) are near 0. Too small a sample to tell counts as ordered.
    """
    n = len(blocks_in_key_order)
    if n < 3 or len(set(blocks_in_key_order)) == 1:
        return 1.0
    by_block = sorted(range(n), key=lambda i: blocks_in_key_order[i])
    rank = [0] * n
    for position, i in enumerate(by_block):
        rank[i] = position
    mean = (n - 1) / 2
    cov = sum((i - mean) * (r - mean) for i, r in enumerate(rank))
    var = sum((i - mean) ** 2 for i in range(n))
    return cov / var


def key_ranges(boundaries: Sequence[Bound]) -> list[tuple[Bound | None, Bound | None]]:
    """Half-open ranges between consecutive boundaries, open at both ends."""
    edges: list[Bound | None] = [None, *boundaries, None]
    return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def plan_relation(
    rel: Relation,
    chunk_size: int,
    first_number: int,
    boundaries: Sequence[Bound] = (),
) -> list[Chunk]:
    """Chunks for one heap, numbered from ``first_number``.

    A keyed heap is cut at ``boundaries`` (sampled keys); a keyless one into equal
    block ranges. A heap that fits in one chunk is copied whole.
    """
    pieces = pieces_for(rel.bytes, chunk_size)
    if pieces == 1 or rel.blocks <= 1 or (rel.has_key and not boundaries):
        return [Chunk(rel.table, first_number, rel.source, "whole", None, None, rel.bytes, None)]
    if rel.has_key:
        ranges = key_ranges(boundaries)
        share = rel.bytes // len(ranges)
        return [
            Chunk(rel.table, first_number + i, rel.source, "key", lo, hi, share)
            for i, (lo, hi) in enumerate(ranges)
        ]
    out: list[Chunk] = []
    per_block = rel.bytes / max(rel.blocks, 1)
    for i, (lo, hi) in enumerate(block_ranges(rel.blocks, pieces)):
        span = (hi if hi is not None else rel.blocks) - (lo or 0)
        out.append(
            Chunk(
                rel.table,
                first_number + i,
                rel.source,
                "ctid",
                None if lo is None else (str(lo),),
                None if hi is None else (str(hi),),
                int(span * per_block),
                rel.filenode,
            )
        )
    return out


#: Tables this small are copied first: their copy is too short to help the workers end
#: together, and once they are copied and keyed, foreign keys to them (small tables are
#: the usual targets) can be validated while the large tables are still being copied.
SMALL_TABLE_BYTES = 1 << 20


def schedule(chunks: Sequence[Chunk], first: Sequence[TableId] = ()) -> list[Chunk]:
    """Table by table, largest table first; within a table, its largest chunks first.

    A table's indexes are built as soon as its last chunk commits, while the others are
    copied: finishing tables one after the other (instead of all of them near the end)
    lets the largest table's indexes, the costliest, overlap the most copying, and the
    last chunks to finish are the smaller ones of the smallest large table. Tables under
    :data:`SMALL_TABLE_BYTES` go before all that.

    Tables named in ``first`` (the plan's copy order) go before the others, in that
    order.
    """
    rank = {t: i for i, t in enumerate(first)}
    size: dict[TableId, int] = {}
    for c in chunks:
        size[c.table] = size.get(c.table, 0) + c.est_bytes
    return sorted(
        chunks,
        key=lambda c: (
            rank.get(c.table, len(rank)),
            size[c.table] >= SMALL_TABLE_BYTES,
            -size[c.table],
            c.table,
            -c.est_bytes,
            c.number,
        ),
    )


def where_clause(chunk: Chunk, key_columns: Sequence[str]) -> sql.Composable | None:
    """The predicate selecting the chunk's rows, or None for a whole table."""
    if chunk.kind == "whole":
        return None
    parts: list[sql.Composable] = []
    if chunk.kind == "ctid":
        for bound, op in ((chunk.lower, ">="), (chunk.upper, "<")):
            if bound is not None:
                parts.append(
                    sql.SQL("ctid " + op + " {}::tid").format(sql.Literal(f"({int(bound[0])},0)"))
                )
    else:
        if not key_columns:
            raise ValueError(f"key chunk of {chunk.table} without key columns")
        for bound, op in ((chunk.lower, ">="), (chunk.upper, "<")):
            if bound is None:
                continue
            if len(bound) != len(key_columns):
                raise ValueError(f"bound {bound!r} does not match key {list(key_columns)!r}")
            parts.append(
                sql.SQL("({}) " + op + " ({})").format(
                    sql.SQL(", ").join(map(sql.Identifier, key_columns)),
                    sql.SQL(", ").join(map(sql.Literal, bound)),
                )
            )
    if not parts:
        return None
    return sql.SQL(" AND ").join(parts)


def copy_out_query(
    chunk: Chunk,
    columns: Sequence[str],
    key_columns: Sequence[str],
    binary: bool,
    row_filter: str | None = None,
) -> sql.Composed:
    """``COPY … TO STDOUT`` for the chunk (only the heap itself, never its children).

    ``row_filter`` is the plan's filter for the table (operator-written SQL, the same
    expression as the publication's row filter).
    """
    fmt = sql.SQL("binary" if binary else "text")
    cols = sql.SQL(", ").join(map(sql.Identifier, columns))
    rel = sql.Identifier(chunk.source.schema, chunk.source.name)
    where: sql.Composable | None = where_clause(chunk, key_columns)
    if row_filter:
        planned = sql.SQL("({})").format(sql.SQL(row_filter))
        where = planned if where is None else sql.SQL("{} AND {}").format(where, planned)
    if where is None:
        # COPY of a plain table never includes its inheritance children.
        return sql.SQL("COPY {} ({}) TO STDOUT (FORMAT {})").format(rel, cols, fmt)
    return sql.SQL("COPY (SELECT {} FROM ONLY {} WHERE {}) TO STDOUT (FORMAT {})").format(
        cols, rel, where, fmt
    )


def copy_in_query(table: TableId, columns: Sequence[str], binary: bool) -> sql.Composed:
    """``COPY … FROM STDIN`` into the migrated table (partitioned tables route rows)."""
    return sql.SQL("COPY {} ({}) FROM STDIN (FORMAT {})").format(
        sql.Identifier(table.schema, table.name),
        sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.SQL("binary" if binary else "text"),
    )
