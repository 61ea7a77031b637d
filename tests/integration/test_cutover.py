"""Cutover and rollback through the real chain, under load, and the ways they refuse.

The daemon streams; pgbench and an application that follows the primary write to the
source; ``cdcsync cutover`` freezes, drains, verifies and switches; the writes then go
to the target and flow back to the old source; ``cdcsync rollback`` brings them home.
At every settled point exactly one side takes writes, and every acknowledged write
exists exactly once on the primary.
"""

from __future__ import annotations

import json
import re
import signal
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest

from cdcsync.adapters.connect_rest import ConnectClient
from tests.integration import workload
from tests.integration.cutover_helpers import (
    App,
    cdcsync,
    drain_direction,
    fenced_tables,
    hook,
    settings_for,
    start_migration,
    writable,
)
from tests.integration.test_e2e_stream import Daemon

pytestmark = pytest.mark.stack

# An application's pace, not the machine's limit: flat-out pgbench saturates the two
# cores that PostgreSQL, Kafka, Connect and the applier share here, and then no chain
# keeps up, so the cutover (rightly) refuses to freeze.
RATE = 200


def _wait_metric(daemon: Daemon, name: str, expected: float, timeout: float = 30) -> None:
    """The daemon exports ``name`` with the value the cutover recorded (within 1 ms)."""
    found = re.search(r"metrics and health on (http://[0-9.:]+)", daemon.log.read_text())
    assert found, daemon.tail()
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{found.group(1)}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        line = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        seen = float(line.group(1)) if line else None
        if seen is not None and abs(seen - expected) < 0.001:
            return
        time.sleep(0.5)
    raise AssertionError(f"{name} is {seen}, expected {expected}")


def _equal(env: dict[str, str], daemon: Daemon) -> None:
    diff = workload.differences(env["CDCSYNC_SOURCE_DSN"], env["CDCSYNC_TARGET_DSN"])
    assert not diff, f"source and target differ: {diff}\n{daemon.tail()}"


def test_cutover_and_rollback_under_load(
    source_dsn: str,
    target_dsn: str,
    migration_env: dict[str, str],
    daemon: Daemon,
    connectors: list[str],
    tmp_path: Path,
) -> None:
    start_migration(source_dsn, migration_env, daemon, connectors)
    primary_file = tmp_path / "primary"
    app = App({"source": source_dsn, "target": target_dsn}, primary_file)
    app.start()
    load = workload.Load(source_dsn, seconds=8, seed=21, exclude=("truncate",), rate=RATE)
    load.start()

    cut = cdcsync(
        migration_env,
        "cutover",
        "--yes",
        "--output",
        "json",
        "--verify",
        "checksum",
        "--on-switch",
        hook(primary_file),
    )
    assert cut.returncode == 0, cut.stderr + daemon.tail()
    report = json.loads(cut.stdout)
    print("CUTOVER-REPORT", json.dumps(report["steps"]), report["drain"], report["freeze_seconds"])
    assert report["result"] == "done"
    assert report["verification"]["mismatches"] == {}  # equal at the switch point
    assert 0 < report["freeze_seconds"] < 10
    assert primary_file.read_text() == "target"
    assert not writable(source_dsn) and writable(target_dsn)
    _wait_metric(daemon, "cdcsync_cutover_last_freeze_seconds", report["freeze_seconds"])
    out = load.wait()  # pgbench met the fence and stopped; the app moved on
    assert "CDC01" in out or "write-fenced" in out or "number of failed" in out, out

    # The target is the primary: its writes flow back to the old source.
    load2 = workload.Load(target_dsn, seconds=5, seed=22, exclude=("truncate",), rate=RATE)
    load2.start()
    out2 = load2.wait()
    assert not load2.errors, load2.errors
    assert "number of failed transactions: 0" in out2, out2
    app.pause()
    drain_direction(migration_env, "reverse")
    _equal(migration_env, daemon)
    app.resume()
    assert app.sides.get("target", 0) > 0, "the application never wrote to the new primary"

    back = cdcsync(
        migration_env, "rollback", "--yes", "--output", "json", "--on-switch", hook(primary_file)
    )
    assert back.returncode == 0, back.stderr + daemon.tail()
    assert json.loads(back.stdout)["result"] == "done"
    assert primary_file.read_text() == "source"
    assert writable(source_dsn) and not writable(target_dsn)

    # Forward streaming is armed again: new source writes reach the target.
    load3 = workload.Load(source_dsn, seconds=4, seed=23, exclude=("truncate",), rate=RATE)
    load3.start()
    load3.wait()
    app.stop()
    assert app.sides.get("source", 0) > 0 and app.fence_errors > 0, app.sides
    drain_direction(migration_env, "forward")
    _equal(migration_env, daemon)
    counts = app.check(source_dsn)
    assert counts["lost"] == 0 and counts["doubled"] == 0 and counts["unexpected"] == 0, counts
    assert counts["acknowledged"] > 100, counts
    assert not app.other_errors, app.other_errors[:5]
    assert daemon.alive(), daemon.tail()
    daemon.kill(signal.SIGTERM)


def test_refusals_change_nothing(
    source_dsn: str,
    target_dsn: str,
    migration_env: dict[str, str],
    daemon: Daemon,
    connectors: list[str],
) -> None:
    start_migration(source_dsn, migration_env, daemon, connectors)
    settings = settings_for(migration_env)

    # Without a terminal and without --yes nothing happens.
    noyes = cdcsync(migration_env, "cutover")
    assert noyes.returncode == 2 and "--yes" in noyes.stderr, noyes.stderr

    # A dry run prints every step and changes nothing.
    dry = cdcsync(migration_env, "cutover", "--dry-run", "--output", "json")
    assert dry.returncode == 0, dry.stderr
    doc = json.loads(dry.stdout)
    assert doc["result"] == "dry-run" and "unfreeze" in doc["message"], doc
    assert all(g["ok"] for g in doc["gates"] if g["blocking"]), doc["gates"]
    # No backup was taken: a warning, not a refusal.
    assert [g["name"] for g in doc["gates"] if not g["ok"]] == ["backup"], doc["gates"]
    assert writable(source_dsn) and fenced_tables(source_dsn) == 0

    # Another switch holds the lock: exit 75.
    key = f"cdcsync.switch:{settings.migration_id}"
    with psycopg.connect(target_dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (key,))
        locked = cdcsync(migration_env, "cutover", "--yes")
    assert locked.returncode == 75, locked.stderr
    assert writable(source_dsn)

    # Someone lifted the target's fence and wrote there: preflight refuses.
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        conn.execute("DROP TRIGGER cdcsync_fence ON public.scratch")
        conn.execute("INSERT INTO public.scratch VALUES (100000, 'written outside cdcsync')")
    diverged = cdcsync(migration_env, "cutover", "--yes")
    assert diverged.returncode == 3, diverged.stderr
    assert "public.scratch" in diverged.stderr and "fence" in diverged.stderr, diverged.stderr
    assert writable(source_dsn) and fenced_tables(source_dsn) == 0

    # Nothing to roll back, abort or finalize yet.
    assert cdcsync(migration_env, "rollback", "--yes").returncode == 3
    assert cdcsync(migration_env, "abort", "--yes").returncode == 3
    fin = cdcsync(migration_env, "finalize")
    assert fin.returncode == 2 and "--confirm" in fin.stderr
    assert daemon.alive(), daemon.tail()


def test_finalize_removes_the_way_back(
    source_dsn: str,
    target_dsn: str,
    migration_env: dict[str, str],
    daemon: Daemon,
    connectors: list[str],
) -> None:
    start_migration(source_dsn, migration_env, daemon, connectors)
    settings = settings_for(migration_env)
    # Before a cutover there is nothing to make final.
    early = cdcsync(migration_env, "finalize", "--confirm", settings.migration_id)
    assert early.returncode == 3, early.stderr
    cut = cdcsync(migration_env, "cutover", "--yes", "--verify", "counts")
    assert cut.returncode == 0, cut.stderr + daemon.tail()
    wrong = cdcsync(migration_env, "finalize", "--confirm", "someone-else")
    assert wrong.returncode == 2 and settings.migration_id in wrong.stderr, wrong.stderr
    done = cdcsync(
        migration_env, "finalize", "--confirm", settings.migration_id, "--output", "json"
    )
    assert done.returncode == 0, done.stderr + daemon.tail()
    removed = json.loads(done.stdout)["removed"]
    assert any(settings.reverse_connector_name in r for r in removed), removed
    client = ConnectClient(migration_env["CDCSYNC_CONNECT_URL"])
    assert client.status(settings.connector_name) is None
    assert client.status(settings.reverse_connector_name) is None
    for dsn in (source_dsn, target_dsn):
        with psycopg.connect(dsn, autocommit=True) as conn:
            slots = conn.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE database = current_database()"
            ).fetchall()
            pubs = conn.execute("SELECT pubname FROM pg_publication").fetchall()
        assert slots == [] and pubs == [], (dsn, slots, pubs)
        assert fenced_tables(dsn) == 0
    assert writable(target_dsn)
    # The daemon sees the finalized state and exits cleanly; nothing can be switched back.
    assert daemon.proc is not None and daemon.proc.wait(timeout=60) == 0, daemon.tail()
    again = cdcsync(migration_env, "rollback", "--yes")
    assert again.returncode == 3 and "finalized" in again.stderr, again.stderr
