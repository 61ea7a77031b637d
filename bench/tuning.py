"""Kafka client settings the apply benchmark can vary without touching cdcsync's code.

cdcsync builds its consumer with fixed settings (``cdcsync/engine/stream.py``). To
measure whether other librdkafka settings or a larger ``consume()`` batch would help,
the benchmark swaps ``confluent_kafka.Consumer`` for a subclass that merges the
variant's settings over whatever the caller asked for; cdcsync imports the class at
the moment it builds its consumer, so it gets the tuned one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import confluent_kafka


def parse_pairs(text: str) -> dict[str, str]:
    """``"a=1,b=2"`` → ``{"a": "1", "b": "2"}``; empty text gives no settings."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def parse_variant(text: str) -> tuple[str, dict[str, str], int | None]:
    """``"name:k=v,k=v"`` → (name, librdkafka settings, consume batch or None).

    The pseudo-setting ``consume.batch=N`` sets how many messages each ``consume()``
    call asks for (cdcsync asks for at most 5000).
    """
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--consumer-variant wants NAME:KEY=VALUE,..., got {text!r}")
    pairs = parse_pairs(rest)
    batch = pairs.pop("consume.batch", None)
    return name, pairs, int(batch) if batch is not None else None


@contextlib.contextmanager
def tuned_consumers(overrides: dict[str, str], batch: int | None) -> Iterator[None]:
    """Every ``confluent_kafka.Consumer`` built inside gets ``overrides`` (and ``batch``)."""
    if not overrides and batch is None:
        yield
        return
    original = confluent_kafka.Consumer

    class Tuned(original):  # type: ignore[misc, valid-type]
        def __init__(self, conf: dict[str, Any], **kwargs: Any) -> None:
            super().__init__({**conf, **overrides}, **kwargs)

        def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Any]:
            return list(super().consume(batch or num_messages, timeout))

    confluent_kafka.Consumer = Tuned  # type: ignore[misc, assignment]
    try:
        yield
    finally:
        confluent_kafka.Consumer = original  # type: ignore[misc]
