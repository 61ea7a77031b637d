"""A plan hook that raises halts the stream naming the message, never crashes it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from cdcsync.engine.stream import StreamLoop
from cdcsync.errors import HaltedError


class _Message:
    """The accessors of a consumed message that the error names."""

    def key(self) -> bytes:
        return b'{"id": 7}'

    def topic(self) -> str:
        return "m.public.people"

    def partition(self) -> int:
        return 2

    def offset(self) -> int:
        return 41


def _raising(event: Any) -> Any:
    raise ValueError("no @ in the e-mail")


def test_a_raising_hook_halts_naming_topic_partition_offset_and_key() -> None:
    loop = SimpleNamespace(_map=_raising)
    with pytest.raises(HaltedError) as info:
        StreamLoop._mapped(loop, object(), _Message())  # type: ignore[arg-type]
    text = str(info.value)
    assert 'm.public.people[2]@41 key={"id": 7}' in text
    assert "ValueError: no @ in the e-mail" in text


def test_a_mapping_that_succeeds_returns_its_event() -> None:
    loop = SimpleNamespace(_map=lambda event: ("mapped", event))
    got: Any = StreamLoop._mapped(loop, "e", _Message())  # type: ignore[arg-type]
    assert got == ("mapped", "e")


def test_an_apply_error_without_the_message_names_the_decoded_key() -> None:
    # In halt mode the batch keeps no messages: the halt names the event's own position
    # and key, as the message would have.
    from cdcsync.core.events import Position
    from cdcsync.engine.stream import _event_where

    event = SimpleNamespace(position=Position("m.public.people", 2, 41), key={"id": 7})
    assert _event_where(event) == 'm.public.people[2]@41 key={"id": 7}'  # type: ignore[arg-type]
    keyless = SimpleNamespace(position=Position("m.public.log", 0, 3), key={})
    assert _event_where(keyless) == "m.public.log[0]@3 key=null"  # type: ignore[arg-type]
    assert _event_where(None) == "batch"
