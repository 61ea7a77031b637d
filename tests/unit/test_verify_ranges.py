"""The pure range helpers of ``verify``: ranges cover everything, diffs are exact."""

from __future__ import annotations

import itertools
from decimal import Decimal, localcontext

import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg import sql

from cdcsync.core import verify_ranges as vr
from cdcsync.core.verify_ranges import Bound, Digest, KeyRange


def bound(n: int) -> Bound:
    # Zero-padded so Python's order of the text equals the numbers' order.
    return (f"{n:08d}",)


def contains(rng: KeyRange, key: Bound) -> bool:
    return (rng.lower is None or rng.lower <= key) and (rng.upper is None or key < rng.upper)


sorted_samples = st.lists(st.integers(0, 10_000), max_size=300).map(
    lambda xs: [bound(x) for x in sorted(xs)]
)


@given(sorted_samples, st.integers(1, 64))
def test_boundaries_strictly_increase_and_come_from_the_sample(
    sample: list[Bound], pieces: int
) -> None:
    out = vr.quantile_boundaries(sample, pieces)
    assert len(out) <= max(pieces - 1, 0)
    assert all(b in sample for b in out)
    assert all(a < b for a, b in itertools.pairwise(out))
    if pieces > 1 and len(set(sample)) >= pieces:
        assert out  # a varied sample is really cut


@given(
    sorted_samples,
    st.integers(1, 64),
    st.lists(st.integers(-100, 11_000), max_size=200),
    st.one_of(st.none(), st.integers(-200, 0)),
    st.one_of(st.none(), st.integers(10_001, 12_000)),
)
def test_every_key_of_the_outer_range_falls_in_exactly_one_range(
    sample: list[Bound], pieces: int, keys: list[int], lo: int | None, hi: int | None
) -> None:
    outer = KeyRange(None if lo is None else bound(lo), None if hi is None else bound(hi))
    ranges = vr.split(outer, vr.quantile_boundaries(sample, pieces))
    assert ranges[0].lower == outer.lower and ranges[-1].upper == outer.upper
    assert all(a.upper == b.lower for a, b in itertools.pairwise(ranges))
    for k in keys:
        key = bound(k) if k >= 0 else ("-" + f"{-k:07d}",)
        if not contains(outer, key):
            assert not any(contains(r, key) for r in ranges)
            continue
        assert sum(contains(r, key) for r in ranges) == 1


@given(st.integers(0, 10**7), st.integers(1, 64))
def test_subrange_step_gives_at_most_fanout_pieces(rows: int, fanout: int) -> None:
    step = vr.subrange_step(rows, fanout)
    # Row numbers 2..rows with (rn - 1) % step == 0, as the drill-down query picks them.
    boundaries = max(rows - 1, 0) // step
    assert boundaries + 1 <= fanout
    if rows > vr.LEAF_ROWS and fanout > 1:
        assert boundaries > 0  # a range larger than a leaf is always cut


@given(st.integers(0, 1 << 40), st.integers(1, 256))
def test_range_count_bounds(nbytes: int, workers: int) -> None:
    n = vr.range_count(nbytes, workers)
    assert 1 <= n <= vr.MAX_RANGES
    if nbytes <= vr.SMALL_TABLE_BYTES:
        assert n == 1
    else:
        assert n >= 2
    assert 0 < vr.sample_percent(nbytes // 8192, n) <= 100


digest_lists = st.lists(
    st.tuples(st.integers(0, 5), st.sampled_from(["a", "b", None])), min_size=0, max_size=30
)


@given(digest_lists, st.data())
def test_differing_names_exactly_the_unequal_ranges(
    pairs: list[tuple[int, str | None]], data: st.DataObject
) -> None:
    source = [Digest(n, d) for n, d in pairs]
    flips = data.draw(
        st.sets(st.integers(0, max(len(source) - 1, 0))) if source else st.just(set())
    )
    target = [Digest(d.rows + 1, d.digest) if i in flips else d for i, d in enumerate(source)]
    assert vr.differing(source, target) == sorted(flips)
    assert vr.differing(source, source) == []


def test_differing_refuses_unequal_lengths() -> None:
    with pytest.raises(ValueError, match="digests"):
        vr.differing([Digest(1, "a")], [])


row_maps = st.dictionaries(
    st.integers(0, 200).map(bound), st.sampled_from(["x", "y", "z"]), max_size=60
)


@given(row_maps, row_maps)
def test_diff_rows_partitions_the_keys(source: dict[Bound, str], target: dict[Bound, str]) -> None:
    diff = vr.diff_rows(source, target)
    assert set(diff.source_only) == source.keys() - target.keys()
    assert set(diff.target_only) == target.keys() - source.keys()
    assert set(diff.changed) == {k for k in source.keys() & target.keys() if source[k] != target[k]}
    assert diff.total == 0 if source == target else diff.total > 0
    assert diff.source_only == [k for k in source if k not in target]  # source's order kept


multisets = st.dictionaries(st.sampled_from("abcdef"), st.integers(1, 4), max_size=6)


@given(multisets, multisets)
def test_diff_multisets_counts_extra_copies(source: dict[str, int], target: dict[str, int]) -> None:
    s_extra, t_extra = vr.diff_multisets(source, target)
    for h in set(source) | set(target):
        difference = source.get(h, 0) - target.get(h, 0)
        assert s_extra.get(h, 0) == max(difference, 0)
        assert t_extra.get(h, 0) == max(-difference, 0)


@given(st.lists(st.one_of(st.none(), st.integers(-(10**40), 10**40)), max_size=20))
def test_add_sums_is_exact(parts: list[int | None]) -> None:
    total = vr.add_sums(None if p is None else str(p) for p in parts)
    values = [p for p in parts if p is not None]
    assert total == (str(sum(values)) if values else None)


@given(
    st.lists(
        st.decimals(-(10**30), 10**30, allow_nan=False, allow_infinity=False, places=9),
        max_size=20,
    )
)
def test_add_sums_keeps_every_digit(parts: list[Decimal]) -> None:
    """Beyond float and default-context precision: 39 significant digits survive."""
    total = vr.add_sums(str(p) for p in parts)
    with localcontext() as ctx:
        ctx.prec = 200
        expected = sum(parts, Decimal(0))
    assert (total is None) == (not parts)
    if total is not None:
        assert Decimal(total) == expected


def test_add_sums_special_values() -> None:
    assert vr.add_sums(["1", "NaN"]) == "NaN"
    assert vr.add_sums(["Infinity", "-Infinity"]) == "NaN"
    assert vr.add_sums(["Infinity", "5"]) == "Infinity"
    assert vr.add_sums([None, None]) is None
    assert vr.add_sums(["0.1", "0.2"]) == "0.3"


def test_range_predicate() -> None:
    assert vr.range_predicate(["id"], KeyRange(None, None)) is None
    both = vr.range_predicate(["a", "B c"], KeyRange(("1", "x'y"), ("2", "z")))
    assert both is not None
    assert both.as_string(None) == (
        "(\"a\", \"B c\") >= ('1', 'x''y') AND (\"a\", \"B c\") < ('2', 'z')"
    )
    upper = vr.range_predicate(["id"], KeyRange(None, ("5",)))
    assert isinstance(upper, sql.Composable)
    assert upper.as_string(None) == "(\"id\") < ('5')"
    with pytest.raises(ValueError, match="does not match"):
        vr.range_predicate(["a", "b"], KeyRange(("1",), None))
    with pytest.raises(ValueError, match="key columns"):
        vr.range_predicate([], KeyRange(None, None))


@given(st.integers(3, 1 << 60), st.integers(0, (1 << 31) - 1), st.integers(0, 1 << 31))
def test_xid_window_holds_exactly_the_xids_in_between(since: int, span: int, offset: int) -> None:
    """A 64-bit xid is in the window iff it lies in [since, until), seen through 32 bits."""
    until = since + span
    window = vr.xid_window(since, until)
    assert window is not None
    # Every xid that can still be on an unfrozen row lies within 2**31 below ``until``.
    xid = until - 1 - offset
    inside = since <= xid < until
    if xid >= 0:
        assert vr.in_xid_window(xid % vr.XID_MODULUS, window) == inside


def test_xid_window_wraps_and_falls_back_when_too_wide() -> None:
    since = (5 << 32) + vr.XID_MODULUS - 10  # ten xids before a wraparound of the 32 bits
    window = vr.xid_window(since, since + 20)
    assert window is not None
    assert vr.in_xid_window(vr.XID_MODULUS - 10, window)
    assert vr.in_xid_window(9, window)  # past the wrap
    assert not vr.in_xid_window(10, window)
    assert not vr.in_xid_window(vr.XID_MODULUS - 11, window)
    assert vr.xid_window(100, 100 + (1 << 31)) is None
    with pytest.raises(ValueError, match="before it starts"):
        vr.xid_window(10, 5)
    sql_text = vr.xid_window_predicate(window).as_string(None)
    assert "xmin::text::bigint" in sql_text and str(vr.XID_MODULUS) in sql_text


hash_maps = st.dictionaries(
    st.integers(0, 30).map(bound),
    st.tuples(st.sampled_from(["a", "b", None]), st.sampled_from(["c", "d", None])),
    max_size=20,
)


@given(hash_maps, hash_maps)
def test_persistent_keeps_only_unchanged_differences(
    previous: dict[Bound, tuple[str | None, str | None]],
    current: dict[Bound, tuple[str | None, str | None]],
) -> None:
    found = vr.persistent(previous, current)
    assert set(found) == {k for k, pair in current.items() if previous.get(k) == pair}
    assert vr.persistent({}, current) == []


def test_range_index_shape() -> None:
    assert vr.range_index(["id"], []).as_string(None) == "0"
    two = vr.range_index(["id"], [("10",)]).as_string(None)
    assert two == "CASE WHEN (\"id\") >= ('10') THEN 1 ELSE 0 END"
    with pytest.raises(ValueError, match="does not match"):
        vr.range_index(["a", "b"], [("1",)])


@given(st.integers(0, 1 << 34), st.integers(1, 1 << 26))
def test_range_count_follows_a_chosen_range_size(nbytes: int, per_range: int) -> None:
    n = vr.range_count(nbytes, 1, per_range)
    assert 1 <= n <= vr.MAX_RANGES
    if n > 2 and n < vr.MAX_RANGES:
        assert nbytes / n <= per_range
