"""When a batch is full: by count, by bytes, or by age — with the clock passed in."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BatchPolicy:
    max_events: int
    max_bytes: int
    max_wait_s: float


@dataclass
class Batch:
    """Messages gathered since ``opened_at``; the loop asks ``full`` after each add."""

    policy: BatchPolicy
    opened_at: float
    events: int = 0
    size: int = 0
    first_offset: dict[tuple[str, int], int] = field(default_factory=dict)
    next_offset: dict[tuple[str, int], int] = field(default_factory=dict)

    def add(self, topic: str, partition: int, offset: int, size: int) -> None:
        tp = (topic, partition)
        self.first_offset.setdefault(tp, offset)
        self.next_offset[tp] = offset + 1
        self.events += 1
        self.size += size

    def full(self, now: float) -> bool:
        return (
            self.events >= self.policy.max_events
            or self.size >= self.policy.max_bytes
            or (self.events > 0 and now - self.opened_at >= self.policy.max_wait_s)
        )

    def drop_partitions(self, partitions: set[tuple[str, int]]) -> None:
        """Forget partitions taken away by a rebalance (their work is re-read elsewhere)."""
        for tp in partitions:
            self.first_offset.pop(tp, None)
            self.next_offset.pop(tp, None)


def gap(expected: int | None, low_watermark: int, got: int) -> str | None:
    """Why reading offset ``got`` would skip data, or None when it is the next one."""
    if expected is None:
        if low_watermark > 0 and got >= low_watermark:
            return (
                f"nothing applied yet but the partition starts at offset {low_watermark}: "
                "earlier data expired before it was applied"
            )
        return None
    if got != expected:
        return f"expected offset {expected}, got {got}: data between them is gone"
    return None
