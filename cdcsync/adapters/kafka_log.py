"""librdkafka's log lines, through Python logging and without the flood.

Left alone, librdkafka writes to stderr in its own format, and a broker that is down
for a minute prints "Connect to … failed: Connection refused" every 50 ms per client:
over a thousand lines that bury the few an operator needs. Routed here they share the
daemon's format (JSON or text), and a line that repeats — the same text once numbers
are ignored — is printed once per window, the next one saying how many were held back.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

_NUMBERS = re.compile(r"\d+")
WINDOW_SECONDS = 30.0


class RepeatFilter(logging.Filter):
    """Let a message through once per window; count the repeats in between."""

    def __init__(self, window: float = WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.window = window
        self.clock = clock
        self._seen: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = _NUMBERS.sub("#", record.getMessage())
        now = self.clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.window:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        held = last[1] if last is not None else 0
        self._seen[key] = (now, 0)
        if len(self._seen) > 1000:  # bounded whatever librdkafka says
            self._seen = {key: self._seen[key]}
        if held:
            record.msg = f"{record.getMessage()} ({held} similar line(s) held back)"
            record.args = ()
        return True


def kafka_logger(name: str = "cdcsync.kafka") -> logging.Logger:
    """The logger librdkafka clients write to (one filter however many clients)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, RepeatFilter) for f in logger.filters):
        logger.addFilter(RepeatFilter())
    return logger


def client_logging() -> dict[str, Any]:
    """Configuration entries that route a client's log lines to :func:`kafka_logger`."""
    return {"logger": kafka_logger()}
