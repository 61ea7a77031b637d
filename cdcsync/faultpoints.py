"""Named crash points: ``hit(name)`` kills the process when the fault suite asks for it.

``CDCSYNC_FAULT_AT`` names one point, ``point`` (its first hit) or ``point:N`` (its
N-th hit); the process then dies by SIGKILL, or by SIGTERM with
``CDCSYNC_FAULT_SIGNAL=TERM``. The variable is read once, at import: with it unset a
hit is one comparison. A crash at a precise instant — between a batch's rows and its
COMMIT, say — is what proves that state and data commit together.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal

from cdcsync.errors import ConfigError

log = logging.getLogger("cdcsync.faultpoints")

ENV = "CDCSYNC_FAULT_AT"
SIGNAL_ENV = "CDCSYNC_FAULT_SIGNAL"

#: Every point placed in the code (a name outside this set is a typo in a test).
POINTS = frozenset(
    {"snapshot-chunk-copied", "batch-before-commit", "batch-after-commit", "verify-range-recorded"}
)


def parse(spec: str | None, signal_name: str | None = None) -> tuple[str, int, int] | None:
    """``point[:N]`` and a signal name → (point, N, signal number), or None when unset."""
    if not spec:
        return None
    name, _, count = spec.partition(":")
    if name not in POINTS:
        raise ConfigError(f"{ENV}={spec!r}: unknown point {name!r} (known: {sorted(POINTS)})")
    try:
        nth = int(count) if count else 1
    except ValueError:
        raise ConfigError(f"{ENV}={spec!r}: the hit number after ':' must be an integer") from None
    if nth < 1:
        raise ConfigError(f"{ENV}={spec!r}: the hit number must be at least 1")
    sig = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "": signal.SIGKILL}.get(
        (signal_name or "").upper()
    )
    if sig is None:
        raise ConfigError(f"{SIGNAL_ENV}={signal_name!r}: use KILL or TERM")
    return name, nth, int(sig)


_armed = parse(os.environ.get(ENV), os.environ.get(SIGNAL_ENV))
_hits = itertools.count(1)  # next() on it is atomic: threads (copy workers) share it


def hit(name: str) -> None:
    """Pass point ``name``; the armed point's N-th pass signals this process."""
    if _armed is None or _armed[0] != name:
        return
    nth = next(_hits)
    if nth != _armed[1]:
        return
    log.warning("fault injection: signal %d at %s (hit %d)", _armed[2], name, nth)
    os.kill(os.getpid(), _armed[2])
