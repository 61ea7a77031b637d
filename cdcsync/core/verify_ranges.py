"""Key ranges and digest comparison for ``cdcsync verify`` (pure: no I/O).

Verification compares the two databases range by range: a table's primary-key space is
cut at boundaries sampled from one side, and each side computes a digest of every range
inside the database. The same boundaries are applied to both sides, so a range holds
the same rows on both when they are equal; where digests differ, the range is cut
again, down to ranges small enough to compare row by row.

Boundaries are PostgreSQL text forms of key values, compared with a row constructor,
so the database's own ordering (collations included) decides which range a row is in.
Ranges are half-open and contiguous: whatever boundaries are chosen, every key falls
in exactly one range, so a boundary can only make the work uneven, never hide a row.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal

from psycopg import sql

Bound = tuple[str, ...]

#: Up to this size (heap and TOAST) a table is one range: sampling would cost more.
SMALL_TABLE_BYTES = 2 << 20
#: Size of a top-level range of a large table. A range's rows are digested as one
#: string inside the database, so this also bounds that string (far below its 1 GB limit).
BYTES_PER_RANGE = 8 << 20
MAX_RANGES = 4096
#: A differing range with at most this many rows on each side is compared row by row.
LEAF_ROWS = 2000
#: How many sub-ranges a differing range is cut into when it is larger than a leaf.
FANOUT = 16


@dataclass(frozen=True)
class KeyRange:
    """Keys ``lower <= k < upper``; ``None`` is unbounded."""

    lower: Bound | None
    upper: Bound | None


@dataclass(frozen=True)
class Digest:
    """What one side holds in one range: its row count and a digest of its rows."""

    rows: int
    digest: str | None  # None for an empty range


def range_count(nbytes: int, workers: int, bytes_per_range: int | None = None) -> int:
    """Top-level ranges for a table of ``nbytes``: one for a small table, else ~8 MiB each.

    A large table gets at least two ranges per worker so both sides' workers stay busy,
    and at most :data:`MAX_RANGES` so the per-range queries stay few. ``bytes_per_range``
    overrides the size (smaller ranges: less to drill into or re-copy, more queries).
    """
    per_range = max(1, bytes_per_range or BYTES_PER_RANGE)
    if nbytes <= min(SMALL_TABLE_BYTES, per_range):
        return 1
    pieces = math.ceil(nbytes / per_range)
    return max(2, min(MAX_RANGES, max(pieces, 2 * max(workers, 1))))


def sample_percent(blocks: int, pieces: int) -> float:
    """TABLESAMPLE SYSTEM percentage reading ~32 blocks per range (at least 100 blocks).

    Whole blocks are sampled, so many rows arrive per block; enough blocks per range put
    each quantile boundary near its ideal place on tables filled in any order.
    """
    if blocks <= 0:
        return 100.0
    wanted = max(100, 32 * pieces)
    return min(100.0, 100.0 * wanted / blocks)


def quantile_boundaries(sorted_keys: Sequence[Bound], pieces: int) -> list[Bound]:
    """Up to ``pieces - 1`` boundaries at the quantiles of a key sample in key order.

    Repeated keys (possible only in a sample of a non-unique key, or a sample read with
    duplicates) are skipped, so boundaries strictly follow the sample's order.
    """
    if pieces <= 1 or not sorted_keys:
        return []
    out: list[Bound] = []
    n = len(sorted_keys)
    for i in range(1, pieces):
        key = sorted_keys[min(n - 1, (i * n) // pieces)]
        if key not in out[-1:]:
            out.append(key)
    return out


def split(outer: KeyRange, boundaries: Sequence[Bound]) -> list[KeyRange]:
    """Contiguous ranges covering ``outer``, cut at ``boundaries`` (which lie inside it)."""
    edges: list[Bound | None] = [outer.lower, *boundaries, outer.upper]
    return [KeyRange(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def subrange_step(rows: int, fanout: int = FANOUT) -> int:
    """Row-number step between the sub-boundaries of a range of ``rows`` rows.

    Rows numbered 1..rows in key order; the keys of rows ``1 + step·i`` (i ≥ 1) are the
    boundaries, which gives at most ``fanout`` sub-ranges of about equal size.
    """
    return max(1, math.ceil(rows / max(fanout, 1)))


def differing(source: Sequence[Digest], target: Sequence[Digest]) -> list[int]:
    """Indexes of the ranges whose count or digest differs between the two sides."""
    if len(source) != len(target):
        raise ValueError(f"{len(source)} source digests against {len(target)} target digests")
    return [i for i, (s, t) in enumerate(zip(source, target, strict=True)) if s != t]


@dataclass
class RowDiff:
    """Keys found on one side only, and keys on both sides whose rows differ."""

    source_only: list[Bound] = field(default_factory=list)
    target_only: list[Bound] = field(default_factory=list)
    changed: list[Bound] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.source_only) + len(self.target_only) + len(self.changed)


def diff_rows(source: Mapping[Bound, str], target: Mapping[Bound, str]) -> RowDiff:
    """Compare two ranges row by row (key → row digest), keeping each side's key order."""
    out = RowDiff()
    for key, digest in source.items():
        other = target.get(key)
        if other is None:
            out.source_only.append(key)
        elif other != digest:
            out.changed.append(key)
    out.target_only = [key for key in target if key not in source]
    return out


def diff_multisets(
    source: Mapping[str, int], target: Mapping[str, int]
) -> tuple[dict[str, int], dict[str, int]]:
    """Row digests (→ copies) that one side holds more often than the other, and how many more.

    Tables without a key are multisets of rows: a duplicate more is a difference too.
    """
    source_extra = {h: n - target.get(h, 0) for h, n in source.items() if n > target.get(h, 0)}
    target_extra = {h: n - source.get(h, 0) for h, n in target.items() if n > source.get(h, 0)}
    return source_extra, target_extra


#: Exact decimal arithmetic for the reconciliation sums: numeric sums must not round.
_EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN, traps=[])


def add_sums(parts: Iterable[str | None]) -> str | None:
    """Exact total of per-range sums given as PostgreSQL numeric text (NULL: no values).

    NaN stays NaN, and infinities of both signs add to NaN, as ``sum(numeric)`` does.
    """
    total: Decimal | None = None
    for part in parts:
        if part is None:
            continue
        value = Decimal(part)
        total = value if total is None else _EXACT.add(total, value)
    if total is None:
        return None
    if total.is_nan():
        return "NaN"
    if total.is_infinite():
        return "Infinity" if total > 0 else "-Infinity"
    return str(total)


def range_predicate(key_columns: Sequence[str], rng: KeyRange) -> sql.Composable | None:
    """``(k1, k2) >= (…) AND (k1, k2) < (…)`` for the range, or None when unbounded."""
    if not key_columns:
        raise ValueError("a key range needs key columns")
    keys = sql.SQL(", ").join(map(sql.Identifier, key_columns))
    parts: list[sql.Composable] = []
    for bound, op in ((rng.lower, ">="), (rng.upper, "<")):
        if bound is None:
            continue
        if len(bound) != len(key_columns):
            raise ValueError(f"bound {bound!r} does not match key {list(key_columns)!r}")
        parts.append(
            sql.SQL("({}) " + op + " ({})").format(
                keys, sql.SQL(", ").join(map(sql.Literal, bound))
            )
        )
    return sql.SQL(" AND ").join(parts) if parts else None


def range_index(key_columns: Sequence[str], boundaries: Sequence[Bound]) -> sql.Composable:
    """SQL giving the index of the range (of ``split`` over an unbounded key space at
    ``boundaries``) that holds a row: a nested CASE that binary-searches the boundaries.

    The comparisons are the row constructors of :func:`range_predicate`, so a row gets
    exactly the index of the range whose predicate it satisfies; evaluation costs
    ``log2(len(boundaries))`` comparisons per row.
    """
    if not key_columns:
        raise ValueError("a key range needs key columns")
    keys = sql.SQL(", ").join(map(sql.Identifier, key_columns))
    for b in boundaries:
        if len(b) != len(key_columns):
            raise ValueError(f"bound {b!r} does not match key {list(key_columns)!r}")

    def build(lo: int, hi: int) -> sql.Composable:
        if lo == hi:
            return sql.Literal(lo)
        mid = (lo + hi + 1) // 2  # range ``mid`` starts at boundaries[mid - 1]
        literal = sql.SQL(", ").join(map(sql.Literal, boundaries[mid - 1]))
        return sql.SQL("CASE WHEN ({}) >= ({}) THEN {} ELSE {} END").format(
            keys, literal, build(mid, hi), build(lo, mid - 1)
        )

    return build(0, len(boundaries))


#: PostgreSQL's 32-bit transaction ids wrap at this modulus.
XID_MODULUS = 1 << 32


def xid_window(since: int, until: int) -> tuple[int, int] | None:
    """The 32-bit xids ``[since, until)`` of two 64-bit ones, as (first xid, count).

    ``since`` is the ``xmin`` of an earlier snapshot, ``until`` the ``xmax`` of a later
    one (both ``xid8``, which never wrap): every row version committed after the earlier
    snapshot and visible in the later one has its ``xmin`` in the window. A row's
    ``xmin`` is only 32 bits, so the window is taken modulo 2**32; it is exact while it
    spans less than 2**31 xids (PostgreSQL keeps every unfrozen xid within 2**31 of the
    next one; frozen rows read as xid 2, which at worst adds a row, never hides one).
    None when it is wider: then every row counts as changed.
    """
    if until < since:
        raise ValueError(f"xid window ends at {until} before it starts at {since}")
    span = until - since
    if span >= XID_MODULUS // 2:
        return None
    return since % XID_MODULUS, span


def xid_window_predicate(window: tuple[int, int]) -> sql.Composable:
    """``xmin`` of the row inside the window of :func:`xid_window` (wraparound included)."""
    first, span = window
    return sql.SQL("((xmin::text::bigint - {} + {}) % {}) < {}").format(
        sql.Literal(first),
        sql.Literal(XID_MODULUS),
        sql.Literal(XID_MODULUS),
        sql.Literal(span),
    )


def in_xid_window(xid: int, window: tuple[int, int]) -> bool:
    """What :func:`xid_window_predicate` computes, for one 32-bit xid (for tests)."""
    first, span = window
    return (xid - first + XID_MODULUS) % XID_MODULUS < span


RowHashes = Mapping[Bound, tuple[str | None, str | None]]


def persistent(previous: RowHashes, current: RowHashes) -> list[Bound]:
    """Keys that differ in two passes with the same row on each side both times.

    A difference caused by lag goes away, or changes the source's or the target's row
    as the stream moves on; one where neither side's row changed between the passes is
    not explained by changes in flight (unless the stream stood still the whole
    interval), so it is reported.
    """
    return [k for k, pair in current.items() if previous.get(k) == pair]
