"""Batch bounds and offset-gap detection."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cdcsync.core.batching import Batch, BatchPolicy, gap


def test_full_by_count_bytes_and_age() -> None:
    b = Batch(BatchPolicy(3, 100, 0.5), opened_at=10.0)
    assert not b.full(10.0)
    assert not b.full(99.0)  # an empty batch is never "too old"
    b.add("t", 0, 0, 10)
    assert not b.full(10.1)
    assert b.full(10.5)
    b.add("t", 0, 1, 95)
    assert b.full(10.1)
    c = Batch(BatchPolicy(2, 10**9, 60), opened_at=0)
    c.add("t", 0, 5, 1)
    c.add("t", 1, 7, 1)
    assert c.full(0)
    assert c.first_offset == {("t", 0): 5, ("t", 1): 7}
    assert c.next_offset == {("t", 0): 6, ("t", 1): 8}


@given(st.integers(0, 10**9), st.integers(0, 10**9))
def test_gap_only_when_offsets_differ(expected: int, got: int) -> None:
    assert (gap(expected, 0, got) is None) == (expected == got)


def test_expired_data_before_first_apply_is_a_gap() -> None:
    assert gap(None, 0, 0) is None
    problem = gap(None, 500, 500)
    assert problem is not None and "expired" in problem
