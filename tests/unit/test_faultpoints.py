"""Named crash points: the spec is parsed strictly, and the N-th hit signals the process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdcsync import faultpoints
from cdcsync.errors import ConfigError

POINT = "batch-before-commit"


def _run(env: dict[str, str], hits: int) -> subprocess.CompletedProcess[str]:
    code = (
        "from cdcsync import faultpoints\n"
        f"for i in range({hits}):\n"
        "    faultpoints.hit('snapshot-chunk-copied')\n"
        f"    faultpoints.hit({POINT!r})\n"
        "    print(i, flush=True)\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CDCSYNC_FAULT")}
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_unset_costs_nothing_and_kills_nobody() -> None:
    done = _run({}, 3)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("spec", "sig", "code", "printed"),
    [
        (POINT, None, -signal.SIGKILL, []),
        (f"{POINT}:3", None, -signal.SIGKILL, ["0", "1"]),
        (f"{POINT}:2", "TERM", -signal.SIGTERM, ["0"]),
        (f"{POINT}:9", None, 0, ["0", "1", "2", "3"]),  # never reached: runs to its end
    ],
)
def test_nth_hit_signals(spec: str, sig: str | None, code: int, printed: list[str]) -> None:
    env = {faultpoints.ENV: spec}
    if sig:
        env[faultpoints.SIGNAL_ENV] = sig
    done = _run(env, 4)
    assert done.returncode == code, done.stderr
    assert done.stdout.split() == printed


@given(st.sampled_from(sorted(faultpoints.POINTS)), st.integers(min_value=1, max_value=10**6))
def test_parse_round_trip(point: str, nth: int) -> None:
    assert faultpoints.parse(f"{point}:{nth}") == (point, nth, int(signal.SIGKILL))
    assert faultpoints.parse(point, "term") == (point, 1, int(signal.SIGTERM))


@pytest.mark.parametrize(
    ("spec", "sig", "named"),
    [
        ("batch-before-comit", None, "batch-before-comit"),
        (f"{POINT}:x", None, "integer"),
        (f"{POINT}:0", None, "at least 1"),
        (POINT, "HUP", faultpoints.SIGNAL_ENV),
    ],
)
def test_bad_spec_is_named(spec: str, sig: str | None, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        faultpoints.parse(spec, sig)


def test_unset_is_none() -> None:
    assert faultpoints.parse(None) is None
    assert faultpoints.parse("") is None
