"""``verify --continuous`` against a real migration while it streams under load.

pgbench keeps its tables changing (its branch and teller rows on every transaction),
so most passes see changes in flight: they must stay transient, never reported as
persistent. Then the target is damaged past its fence in a table the load never
touches — one row changed (a new row version, found from its xmin) and one deleted
(no row left to find: the rotating sweep gets to it) — and both keys must come up as
persistent within a few passes, and be recorded in the migration's state.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.integration import workload
from tests.integration.test_e2e_stream import Daemon, wait_streaming

pytestmark = pytest.mark.stack

TABLES = "public.pgbench_accounts,public.pgbench_branches,public.pgbench_tellers,public.ledger"
CHANGED, DELETED = 12345, 3


class Passes:
    """The continuous verifier as a subprocess; its JSON lines, one per pass."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        full = {k: v for k, v in os.environ.items() if not k.startswith("CDCSYNC_")}
        full.update(env, CDCSYNC_WORKERS="2")
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cdcsync", "verify", "--continuous", *args],
            env=full,
            stdout=subprocess.PIPE,
            stderr=log.open("wb"),
            text=True,
        )
        self.docs: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.docs.append(json.loads(line))

    def wait_for(self, n: int, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.docs) < n:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{len(self.docs)} pass(es) only"
            time.sleep(0.2)
        return self.docs[:n]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=120)
        self._reader.join(timeout=10)
        return code


@pytest.mark.slow
def test_continuous_passes_catch_damage_but_not_lag(
    source_dsn: str,
    target_dsn: str,
    migration_env: dict[str, str],
    daemon: Daemon,
    tmp_path: Path,
) -> None:
    workload.create_source(source_dsn, scale=1)
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE ledger (id int PRIMARY KEY, amount numeric(12, 2), memo text); "
            "INSERT INTO ledger SELECT g, g / 4.0, 'm' || g FROM generate_series(1, 20000) g"
        )
    daemon.start()
    wait_streaming(migration_env, daemon)
    load = workload.Load(source_dsn, seconds=50, rate=100, clients=2)
    load.start()
    verifier = Passes(
        migration_env,
        tmp_path / "verify.log",
        "--interval",
        "3",
        "--sweep",
        "3",
        "--range-bytes",
        "262144",
        "--tables",
        TABLES,
        "-o",
        "json",
    )
    try:
        before = verifier.wait_for(4, timeout=180)
        assert before[0]["pass"] == 0
        assert sum(before[0]["ranges"].values()) > 10  # the tables really are cut in ranges
        for doc in before:
            assert doc["persistent"] == {}, doc["persistent"]  # streaming is no false alarm
        later = before[1:]
        # Later passes re-check a part only: what changed, what differed, the sweep's slice.
        assert any(sum(d["checked_ranges"].values()) < sum(d["ranges"].values()) for d in later)
        assert any(d["changed_ranges"].get("public.pgbench_accounts", 0) > 0 for d in later)
        with psycopg.connect(target_dsn, autocommit=True) as conn:
            conn.execute("SET session_replication_role = replica")
            conn.execute("UPDATE ledger SET amount = amount + 0.01 WHERE id = %s", (CHANGED,))
            conn.execute("DELETE FROM ledger WHERE id = %s", (DELETED,))
        damaged_at = len(verifier.docs)
        deadline = time.monotonic() + 240
        caught: dict[str, Any] = {}
        while time.monotonic() < deadline:
            docs = verifier.docs[damaged_at:]
            found = {tuple(k) for d in docs for k in d["persistent"].get("public.ledger", [])}
            if {(str(CHANGED),), (str(DELETED),)} <= found:
                caught = docs[-1]
                break
            time.sleep(0.5)
        assert caught, verifier.docs[damaged_at:]
        # At most the two passes the persistence test needs, plus a whole sweep.
        assert caught["pass"] - verifier.docs[damaged_at]["pass"] <= 2 + 3
        others = {t for d in verifier.docs for t in d["persistent"] if t != "public.ledger"}
        assert not others, others  # pgbench's own changes never persisted
    finally:
        code = verifier.stop()
        load.wait()
    for d in verifier.docs:
        print(
            f"pass {d['pass']}: {sum(d['checked_ranges'].values())}/{sum(d['ranges'].values())}"
            f" ranges in {d['seconds']:.2f}s, changed {d['changed_ranges']}, transient "
            f"{d['transient']}, persistent {d['persistent']}"
        )
    assert code == 3, verifier.log.read_text()[-3000:]  # the last pass saw the damage
    assert not load.errors, load.errors
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT data->'verification' FROM cdcsync.migration WHERE migration_id = %s",
            (migration_env["CDCSYNC_MIGRATION_ID"],),
        ).fetchone()
    assert row is not None
    recorded = row[0]
    assert recorded["mismatches"]["public.ledger"] == 2
    assert recorded["mismatches"]["public.pgbench_accounts"] == 0
    assert recorded["continuous"]["pass"] >= 1
    assert daemon.alive(), daemon.tail()
    daemon.kill(signal.SIGTERM)
