"""Helpers the crash, disk and backpressure scenarios share on top of the harness.

The daemon is restarted the way an operator restarts it — ``cdcsync run`` again, with
the same environment — and a crash is placed with :mod:`cdcsync.faultpoints`
(``CDCSYNC_FAULT_AT``) in the one run that should die.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psycopg
from psycopg import sql

from cdcsync import faultpoints
from cdcsync.adapters import offset_store
from tests.integration.cutover_helpers import settings_for
from tests.integration.test_e2e_stream import Daemon


def start_daemon(daemon: Daemon, extra: dict[str, str] | None = None) -> None:
    """``cdcsync run`` with the migration's environment plus ``extra`` for this run only."""
    base = daemon.env
    daemon.env = {**base, **(extra or {})}
    try:
        daemon.start()
    finally:
        daemon.env = base


def start_with_fault(daemon: Daemon, point: str, *, sig: str = "KILL") -> None:
    start_daemon(daemon, {faultpoints.ENV: point, faultpoints.SIGNAL_ENV: sig})


def stop_daemon(daemon: Daemon) -> None:
    """A clean stop (SIGTERM): the batch in flight finishes, the process exits 0."""
    code = daemon.kill(signal.SIGTERM)
    assert code == 0, f"cdcsync run exited {code} on SIGTERM:\n{daemon.tail()}"


def wait_exit(daemon: Daemon, timeout: float = 180) -> int:
    """The daemon's exit code once it ends on its own (its fault point fired)."""
    assert daemon.proc is not None
    try:
        return daemon.proc.wait(timeout=timeout)
    except Exception as exc:
        raise AssertionError(f"daemon still running after {timeout}s:\n{daemon.tail()}") from exc


def log_text(daemon: Daemon) -> str:
    return daemon.log.read_text(errors="replace")


def wait_log(daemon: Daemon, needle: str, timeout: float = 120, since: int = 0) -> str:
    """Until ``needle`` appears in the daemon's log after byte ``since``; the matching line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_text(daemon)[since:]
        for line in text.splitlines():
            if needle in line:
                return line
        time.sleep(0.5)
    raise AssertionError(f"{needle!r} not in the daemon log after {timeout}s:\n{daemon.tail()}")


def stored_offsets(env: dict[str, str], direction: str = "forward") -> dict[tuple[str, int], int]:
    """The next offsets recorded in the database the direction writes into."""
    settings = settings_for(env)
    dsn = env["CDCSYNC_TARGET_DSN" if direction == "forward" else "CDCSYNC_SOURCE_DSN"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        return offset_store.load(conn, settings.state_schema, settings.migration_id, direction)


def count_rows(dsn: str, table: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(*table.split(".")))
        ).fetchone()
    return int(row[0]) if row else 0


def proc_status_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB, from /proc/<pid>/status."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out
