"""Operator requests on a real PostgreSQL: record → poll → complete, and the CLI's wait."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from cdcsync.adapters import requests_store as rs
from cdcsync.adapters.state_store import ensure_schema

pytestmark = pytest.mark.stack

MIG = "orders_move"


@pytest.fixture
def conn(target_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(target_dsn, autocommit=True) as c:
        ensure_schema(c)
        c.execute(
            "INSERT INTO cdcsync.migration (migration_id, phase) VALUES (%s, 'streaming')", (MIG,)
        )
        yield c


def test_request_poll_complete_round_trip(conn: psycopg.Connection[Any]) -> None:
    req = rs.submit_request(conn, MIG, rs.PAUSE, {"reason": "vacuum full"}, "alice@ops")
    assert (req.state, req.kind, req.args) == ("pending", "pause", {"reason": "vacuum full"})
    assert rs.control_state(conn, MIG).pending == (req,)
    assert not rs.control_state(conn, MIG).paused  # recorded is not done

    claimed = rs.poll_requests(conn, MIG)
    assert [r.id for r in claimed] == [req.id] and claimed[0].state == "running"
    assert rs.poll_requests(conn, MIG) == []  # claimed once only
    assert rs.wait_for_request(conn, req.id, timeout=0.3).state == "running"

    rs.complete_request(conn, claimed[0], ok=True, result="applier paused at 12 offsets")
    done = rs.wait_for_request(conn, req.id, timeout=5)
    assert (done.state, done.result) == ("done", "applier paused at 12 offsets")
    assert done.done_at is not None
    control = rs.control_state(conn, MIG)
    assert control.paused and control.pause_reason == "vacuum full"
    assert control.paused_by == "alice@ops" and control.pending == ()
    with pytest.raises(ValueError, match="not running"):
        rs.complete_request(conn, req.id, ok=True, result="twice")

    throttle = rs.submit_request(conn, MIG, rs.THROTTLE, {"snapshot_rows_per_second": 500}, "bob")
    resume = rs.submit_request(conn, MIG, rs.RESUME, {}, "bob")
    assert [r.id for r in rs.poll_requests(conn, MIG)] == [throttle.id, resume.id]  # in order
    rs.complete_request(conn, throttle.id, ok=True, result="500 rows/s")
    rs.complete_request(conn, resume.id, ok=True, result="applying")
    control = rs.control_state(conn, MIG)
    assert not control.paused and control.snapshot_rows_per_second == 500

    failed = rs.submit_request(conn, MIG, rs.PAUSE, {"reason": "x"}, "carol")
    rs.poll_requests(conn, MIG)
    rs.complete_request(conn, failed.id, ok=False, result="cutover in progress")
    assert not rs.control_state(conn, MIG).paused  # a failed pause changes nothing

    audit = conn.execute(
        "SELECT actor, command, result, detail->>'request_id' FROM cdcsync.audit "
        "WHERE migration_id = %s ORDER BY id",
        (MIG,),
    ).fetchall()
    assert audit == [
        ("alice@ops", "pause", "done", str(req.id)),
        ("bob", "throttle", "done", str(throttle.id)),
        ("bob", "resume", "done", str(resume.id)),
        ("carol", "pause", "failed", str(failed.id)),
    ]


def test_cancel_reclaim_and_concurrent_pollers(
    conn: psycopg.Connection[Any], target_dsn: str
) -> None:
    a = rs.submit_request(conn, MIG, rs.PAUSE, {"reason": "a"}, "ops")
    assert rs.cancel_request(conn, a.id, actor="ops")
    assert rs.poll_requests(conn, MIG) == []
    got = rs.get_request(conn, a.id)
    assert got is not None and got.state == "cancelled"

    b = rs.submit_request(conn, MIG, rs.PAUSE, {"reason": "b"}, "ops")
    c = rs.submit_request(conn, MIG, rs.RESUME, {}, "ops")
    # A poller inside an open transaction holds b; a second poller skips it, never waits.
    with psycopg.connect(target_dsn) as holder:
        first = rs.poll_requests(holder, MIG, limit=1)
        assert [r.id for r in first] == [b.id]
        started = time.monotonic()
        second = rs.poll_requests(conn, MIG)
        assert [r.id for r in second] == [c.id]
        assert time.monotonic() - started < 2
        holder.commit()
    assert not rs.cancel_request(conn, b.id, actor="ops")  # already taken

    # A daemon that died with b and c running: at start it puts them back.
    assert rs.reclaim_requests(conn, MIG) == 2
    assert [r.id for r in rs.poll_requests(conn, MIG)] == [b.id, c.id]
    assert rs.poll_requests(conn, "another_migration") == []


def _cli(target_dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDCSYNC_")}
    env |= {"CDCSYNC_TARGET_DSN": target_dsn, "CDCSYNC_MIGRATION_ID": MIG}
    return subprocess.run(
        [sys.executable, "-m", "cdcsync", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_waits_for_the_daemon_and_cancels_when_none_answers(
    conn: psycopg.Connection[Any], target_dsn: str
) -> None:
    # No daemon: the request is cancelled after the wait and the command fails.
    done = _cli(target_dsn, "pause", "--reason", "nobody home", "--timeout", "1")
    assert done.returncode == 3, done.stderr
    assert "cancelled" in done.stderr and "cdcsync run" in done.stderr
    states = conn.execute("SELECT state FROM cdcsync.request ORDER BY id").fetchall()
    assert states == [("cancelled",)]

    # A daemon loop (here a thread doing what the engine's loop does) carries it out.
    stop = threading.Event()

    def daemon() -> None:
        with psycopg.connect(target_dsn, autocommit=True) as own:
            while not stop.is_set():
                for req in rs.poll_requests(own, MIG):
                    rs.complete_request(own, req, ok=True, result=f"{req.kind} carried out")
                stop.wait(0.1)

    worker = threading.Thread(target=daemon)
    worker.start()
    try:
        done = _cli(target_dsn, "pause", "--reason", "disk swap", "--timeout", "20")
        assert done.returncode == 0, done.stderr
        assert "done: pause carried out" in done.stderr
        assert rs.control_state(conn, MIG).pause_reason == "disk swap"
        done = _cli(target_dsn, "throttle", "--snapshot-rows-per-second", "250")
        assert done.returncode == 0, done.stderr
        assert rs.control_state(conn, MIG).snapshot_rows_per_second == 250
        done = _cli(target_dsn, "resume")
        assert done.returncode == 0, done.stderr
        assert not rs.control_state(conn, MIG).paused
    finally:
        stop.set()
        worker.join()

    # --no-wait leaves the request queued for the next daemon.
    done = _cli(target_dsn, "pause", "--reason", "later", "--no-wait")
    assert done.returncode == 0, done.stderr
    assert [r.kind for r in rs.control_state(conn, MIG).pending] == ["pause"]


def test_cli_refuses_an_unknown_migration(target_dsn: str) -> None:
    with psycopg.connect(target_dsn, autocommit=True) as c:
        ensure_schema(c)
    done = _cli(target_dsn, "pause", "--reason", "x", "--timeout", "1")
    assert done.returncode == 3
    assert f"no migration '{MIG}'" in done.stderr
    with psycopg.connect(target_dsn, autocommit=True) as c:
        row = c.execute("SELECT count(*) FROM cdcsync.request").fetchone()
        assert row == (0,)
