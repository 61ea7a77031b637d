"""Chunk planning: every row in exactly one chunk, whatever the sizes and samples; pacing."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdcsync.core.events import TableId
from cdcsync.snapshot.chunking import (
    KEY_ORDER_MIN,
    Chunk,
    Relation,
    block_ranges,
    chunk_bytes,
    copy_in_query,
    copy_out_query,
    key_order,
    key_ranges,
    pick_boundaries,
    pieces_for,
    plan_relation,
    schedule,
    where_clause,
)
from cdcsync.snapshot.copy import RateLimiter

T = TableId("Sales Dept", "Orders")
LEAF = TableId("Sales Dept", "orders_2024")


def contains(lo: int | None, hi: int | None, value: int) -> bool:
    return (lo is None or value >= lo) and (hi is None or value < hi)


@given(st.integers(0, 200_000), st.integers(1, 500))
def test_block_ranges_tile_the_whole_heap_and_beyond(blocks: int, pieces: int) -> None:
    ranges = block_ranges(blocks, pieces)
    assert 1 <= len(ranges) <= max(pieces, 1)
    assert ranges[0][0] is None and ranges[-1][1] is None
    for (_, hi), (lo, _) in itertools.pairwise(ranges):
        assert hi == lo  # contiguous: no gap, no overlap
    # Every block, including ones appended after planning, is in exactly one range.
    for block in (0, blocks // 2, max(blocks - 1, 0), blocks, blocks + 10_000):
        assert sum(contains(lo, hi, block) for lo, hi in ranges) == 1


def test_chunk_size_shrinks_for_small_copies_only() -> None:
    mib = 1 << 20
    assert chunk_bytes(100_000 * mib, 4, 32 * mib) == 32 * mib  # large copy: as configured
    assert chunk_bytes(200 * mib, 2, 32 * mib) == 25 * mib  # four chunks per worker
    assert chunk_bytes(10 * mib, 8, 32 * mib) == 8 * mib  # never below 8 MiB ...
    assert chunk_bytes(10 * mib, 8, 32 * 1024) == 32 * 1024  # ... unless configured so
    assert pieces_for(0, mib) == 1 and pieces_for(mib + 1, mib) == 2


@given(st.lists(st.integers(-(10**9), 10**9), max_size=400), st.integers(1, 60))
def test_key_ranges_put_every_key_in_exactly_one_chunk(sample: list[int], pieces: int) -> None:
    ordered = sorted(sample)
    boundaries = pick_boundaries([(str(v),) for v in ordered], pieces)
    assert len(boundaries) <= max(pieces - 1, 0)
    as_ints = [int(b[0]) for b in boundaries]
    assert as_ints == sorted(set(as_ints))  # strictly increasing
    ranges = [
        (None if lo is None else int(lo[0]), None if hi is None else int(hi[0]))
        for lo, hi in key_ranges(boundaries)
    ]
    for key in [*sample, -(10**10), 10**10, 0]:
        assert sum(contains(lo, hi, key) for lo, hi in ranges) == 1


def test_boundaries_are_quantiles_of_the_sample() -> None:
    sample = [(str(v),) for v in range(1000)]
    assert pick_boundaries(sample, 4) == [("250",), ("500",), ("750",)]
    assert pick_boundaries(sample, 1) == []
    assert pick_boundaries([], 8) == []
    # A sample of one repeated value yields at most one boundary.
    assert pick_boundaries([("7",)] * 50, 5) == [("7",)]


def test_small_heaps_are_one_whole_chunk() -> None:
    rel = Relation(T, LEAF, blocks=10, bytes=81920, has_key=True)
    (chunk,) = plan_relation(rel, 4096 * 8192, first_number=3)
    assert chunk.kind == "whole" and chunk.number == 3 and chunk.source == LEAF
    assert where_clause(chunk, ["id"]) is None


def test_keyed_heaps_split_at_boundaries_keyless_by_blocks() -> None:
    keyed = Relation(T, LEAF, blocks=10_000, bytes=10_000 * 8192, has_key=True)
    chunks = plan_relation(keyed, 4096 * 8192, 0, [("100", "a"), ("200", "b")])
    assert [c.kind for c in chunks] == ["key"] * 3
    assert [c.number for c in chunks] == [0, 1, 2]
    assert chunks[0].lower is None and chunks[-1].upper is None
    assert chunks[1].lower == ("100", "a") and chunks[1].upper == ("200", "b")

    # Without a usable sample a keyed heap is copied whole rather than guessed at.
    assert [c.kind for c in plan_relation(keyed, 4096 * 8192, 0, [])] == ["whole"]

    keyless = Relation(T, LEAF, blocks=10_000, bytes=10_000 * 8192, has_key=False, filenode=42)
    chunks = plan_relation(keyless, 4096 * 8192, 5)
    assert [c.kind for c in chunks] == ["ctid"] * 3
    assert [c.number for c in chunks] == [5, 6, 7]
    assert [c.filenode for c in chunks] == [42] * 3
    assert sum(c.est_bytes for c in chunks) == 10_000 * 8192


def test_predicates_compare_rows_in_key_order() -> None:
    chunk = Chunk(T, 1, LEAF, "key", ("1", "it's"), ("2", "z"), 0)
    where = where_clause(chunk, ["id", "Region Name"])
    assert where is not None
    assert where.as_string(None) == (
        """("id", "Region Name") >= ('1', 'it''s') AND ("id", "Region Name") < ('2', 'z')"""
    )
    ctid = Chunk(T, 0, LEAF, "ctid", None, ("4096",), 0)
    clause = where_clause(ctid, [])
    assert clause is not None
    assert clause.as_string(None) == "ctid < '(4096,0)'::tid"


def test_copy_statements_name_only_the_heap_and_the_columns() -> None:
    whole = Chunk(T, 0, LEAF, "whole", None, None, 0)
    out = copy_out_query(whole, ["id", "select"], ["id"], binary=True).as_string(None)
    assert out == 'COPY "Sales Dept"."orders_2024" ("id", "select") TO STDOUT (FORMAT binary)'
    ranged = Chunk(T, 1, LEAF, "key", ("5",), None, 0)
    out = copy_out_query(ranged, ["id"], ["id"], binary=False).as_string(None)
    assert out == (
        'COPY (SELECT "id" FROM ONLY "Sales Dept"."orders_2024" WHERE ("id") >= (\'5\')) '
        "TO STDOUT (FORMAT text)"
    )
    into = copy_in_query(T, ["id", "select"], binary=True).as_string(None)
    assert into == 'COPY "Sales Dept"."Orders" ("id", "select") FROM STDIN (FORMAT binary)'


def test_schedule_puts_the_largest_chunks_first() -> None:
    chunks = [Chunk(T, n, LEAF, "key", None, None, size) for n, size in enumerate([5, 50, 1, 50])]
    assert [c.number for c in schedule(chunks)] == [1, 3, 0, 2]


def test_schedule_copies_table_by_table_the_largest_table_first() -> None:
    """So that tables finish one after the other, the largest (costliest indexes) first;
    tiny tables (foreign-key targets, typically) before everything."""
    big, small, tiny = TableId("s", "big"), TableId("s", "small"), TableId("s", "tiny")
    mib = 1 << 20
    chunks = [
        Chunk(small, 0, small, "whole", None, None, 40 * mib),
        *(Chunk(big, n, big, "key", None, None, size * mib) for n, size in enumerate([30, 35, 30])),
        Chunk(tiny, 0, tiny, "whole", None, None, 8192),
    ]
    got = [(c.table.name, c.number) for c in schedule(chunks)]
    assert got == [("tiny", 0), ("big", 1), ("big", 0), ("big", 2), ("small", 0)]
    # The plan's copy order comes before sizes.
    assert [c.table for c in schedule(chunks, [small])] == [small, tiny, big, big, big]


def test_the_rate_limit_paces_all_workers_together() -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(1_000_000, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        limiter.take(500_000)
    assert slept == [0.5, 0.5]  # the first half-second is free, then 0.5 s per 0.5 MB
    now[0] += 10  # idle time is not saved up for a burst beyond the rate
    limiter.take(1_000_000)
    assert slept == [0.5, 0.5]
    limiter.take(1)
    assert len(slept) == 3
    RateLimiter(None, clock=lambda: 0.0, sleep=sleep).take(10**12)
    assert len(slept) == 3
    # Rows per second, changed while running (cdcsync throttle): the slower pace wins.
    limiter.set_limits(bytes_per_second=10**9, rows_per_second=100)
    limiter.take(1000, rows=50)
    limiter.take(1000, rows=50)
    assert slept[-1] == 0.5
    limiter.set_limits()  # unlimited
    limiter.take(10**9, rows=10**9)
    assert len(slept) == 4


def test_key_order_tells_serial_keys_from_random_ones() -> None:
    rng = random.Random(3)
    assert key_order(list(range(0, 5000, 7))) == pytest.approx(1.0)
    assert key_order(list(range(5000, 0, -7))) == pytest.approx(-1.0)
    scattered = [rng.randrange(10_000) for _ in range(2000)]
    assert abs(key_order(scattered)) < 0.1
    # Mostly ordered with some updated rows moved to the end of the heap: still ordered.
    mostly = [b if b % 20 else 10_000 + b for b in range(2000)]
    assert key_order(mostly) >= KEY_ORDER_MIN
    assert key_order([5]) == 1.0 and key_order([7, 7, 7, 7]) == 1.0
