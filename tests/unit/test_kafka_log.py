"""A repeated librdkafka line is printed once per window, with the count held back."""

from __future__ import annotations

import logging

from cdcsync.adapters.kafka_log import RepeatFilter


def _record(msg: str) -> logging.LogRecord:
    return logging.LogRecord("cdcsync.kafka", logging.ERROR, __file__, 1, msg, (), None)


def test_repeats_are_held_back_then_counted() -> None:
    now = [0.0]
    f = RepeatFilter(window=30, clock=lambda: now[0])
    refused = "FAIL [thrd:127.0.0.1:{}]: Connect failed: Connection refused (after {}ms)"
    assert f.filter(_record(refused.format(9092, 0)))
    passed = 0
    for i in range(600):  # a minute at 50 ms, inside the window
        now[0] = i * 0.05
        passed += f.filter(_record(refused.format(9092, i % 3)))
    assert passed == 0
    now[0] = 31.0
    again = _record(refused.format(9092, 1))
    assert f.filter(again)
    assert "(600 similar line(s) held back)" in again.getMessage()


def test_different_lines_are_not_merged() -> None:
    f = RepeatFilter(window=30, clock=lambda: 0.0)
    assert f.filter(_record("broker down"))
    assert f.filter(_record("group rebalanced"))
    assert not f.filter(_record("broker down"))
