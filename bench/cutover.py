"""Cutover benchmark: write-freeze durations and failed application writes, per mode.

A fresh source database (pgbench tables plus the hard cases of the integration
workload) and an empty target are migrated by a real ``cdcsync run`` daemon over the
local stack (PostgreSQL ×2, Kafka, Kafka Connect with Debezium). Once it streams, each
mode runs ``--cycles`` cutover-and-rollback cycles under ``pgbench -n -c 4 -j 2``:

* direct: pgbench connects to the primary itself, in short slices (``-T 1``), each
  slice against the side the ``--on-switch`` hook last named; clients that meet the
  write fence abort, and every aborted client or failed transaction counts as a failed
  application transaction.
* pgbouncer: pgbench connects through pgbouncer in transaction pooling mode, and
  cdcsync is told about it (``CDCSYNC_PGBOUNCER__*``): the freeze PAUSEs the database,
  the switch repoints it and RESUMEs. The goal is 0 failed transactions.

Each switch is ``cdcsync cutover|rollback --yes --output json --verify counts
--on-switch <hook>``; its ``freeze_seconds`` is the sample. After each switch the new
direction is drained (a marker through Debezium, Kafka and the applier) before the next
one. At the end of each mode the load stops, the stream is drained and source and
target are compared by per-table digests. Printed per mode: freeze p50 / p99 / max,
failed application transactions, cycles completed; then the goals; the last line is
one JSON object.

    python bench/cutover.py --cycles 20 --scale 1 --stack-dir .stack/bench

Brings the local stack in ``--stack-dir`` up if needed (and stops it at the end if it
started it, unless ``--keep-stack``); creates and drops its own databases, connectors
and topics.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdcsync.adapters.connect_rest import ConnectClient
from cdcsync.adapters.pgbouncer import backend_of
from cdcsync.stack.local import SERVICES, LocalStack
from cdcsync.stack.pgbouncer import PgbouncerProcess
from tests.integration import workload
from tests.integration.cutover_helpers import drain_direction, hook, settings_for
from tests.integration.test_e2e_stream import Daemon, wait_streaming

GOAL_P50_MS = 300.0
GOAL_P99_MS = 1000.0
ALIAS = "app"
MODES = ("direct", "pgbouncer")

_FAILED = re.compile(r"number of failed transactions: (\d+)")
_PROCESSED = re.compile(r"number of transactions actually processed: (\d+)")
_ABORTED = re.compile(r"client \d+ (?:script \d+ )?aborted")


# ------------------------------------------------------------------ databases
def admin(dsn: str, statement: sql.Composed) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement)


def drop_database(admin_dsn: str, name: str) -> None:
    """Slots pin a database: end their walsenders and drop them, then the database."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
            "WHERE database = %s AND active_pid IS NOT NULL",
            (name,),
        )
        time.sleep(0.2)
        for (slot,) in conn.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE database = %s", (name,)
        ).fetchall():
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def delete_topics(bootstrap: str, prefix: str) -> int:
    """Best effort: the migration's topics (forward, reverse, dead letters)."""
    from confluent_kafka.admin import AdminClient

    client = AdminClient({"bootstrap.servers": bootstrap})
    names = [t for t in client.list_topics(timeout=10).topics if t.startswith(prefix)]
    if names:
        for future in client.delete_topics(names, operation_timeout=30).values():
            with contextlib.suppress(Exception):
                future.result()
    return len(names)


# ------------------------------------------------------------------ the CLI
def base_env() -> dict[str, str]:
    """The caller's environment without stray cdcsync settings."""
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("CDCSYNC_")}


def cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cdcsync", *args],
        env={**base_env(), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


# ------------------------------------------------------------------ the load
@dataclass
class PgbenchLoad:
    """``pgbench -n -c 4 -j 2`` in slices, each against what ``dsn_for`` says now."""

    dsn_for: Callable[[], str]
    slice_seconds: int
    rate: int = 200
    failed: int = 0
    aborted: int = 0
    processed: int = 0
    runs: int = 0
    other: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def failures(self) -> int:
        return self.failed + self.aborted

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.slice_seconds + 120)

    def _run(self) -> None:
        while not self._stop.is_set():
            env = {**base_env(), **workload.conninfo_env(self.dsn_for())}
            proc = subprocess.run(
                [
                    workload.pg_bin("pgbench"),
                    "-n",
                    "-c",
                    "4",
                    "-j",
                    "2",
                    "-T",
                    str(self.slice_seconds),
                    *(["-R", str(self.rate)] if self.rate else []),
                ],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            self.runs += 1
            out = proc.stdout + proc.stderr
            failed = _FAILED.search(out)
            processed = _PROCESSED.search(out)
            aborted = len(_ABORTED.findall(out))
            self.failed += int(failed.group(1)) if failed else 0
            self.processed += int(processed.group(1)) if processed else 0
            self.aborted += aborted
            if proc.returncode != 0 and not aborted and not failed:
                # pgbench could not even start (e.g. no connection): one failed attempt.
                self.aborted += 1
                if len(self.other) < 5:
                    self.other.append(out.strip()[-300:])
            if aborted:
                time.sleep(0.05)  # the fence answers at once: do not spin


# ------------------------------------------------------------------ the cycles
@dataclass
class ModeResult:
    mode: str
    freezes: list[float] = field(default_factory=list)  # seconds, cutovers and rollbacks
    cycles_completed: int = 0
    failed_switches: int = 0
    failed_transactions: int = 0
    processed_transactions: int = 0
    pgbench_runs: int = 0
    equal: bool | None = None
    differences: dict[str, Any] = field(default_factory=dict)

    def ms(self, q: float) -> float | None:
        """Nearest-rank percentile of the freeze samples, in ms."""
        if not self.freezes:
            return None
        ordered = sorted(self.freezes)
        rank = max(1, math.ceil(q * len(ordered)))
        return round(ordered[rank - 1] * 1000, 1)

    @property
    def p50_ms(self) -> float | None:
        return round(statistics.median(self.freezes) * 1000, 1) if self.freezes else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "freeze_p50_ms": self.p50_ms,
            "freeze_p99_ms": self.ms(0.99),
            "freeze_max_ms": self.ms(1.0),
            "freeze_samples": len(self.freezes),
            "failed_transactions": self.failed_transactions,
            "processed_transactions": self.processed_transactions,
            "pgbench_runs": self.pgbench_runs,
            "cycles_completed": self.cycles_completed,
            "failed_switches": self.failed_switches,
            "source_equals_target": self.equal,
        }


class Bench:
    def __init__(self, env: dict[str, str], daemon: Daemon, primary_file: Path) -> None:
        self.env = env
        self.daemon = daemon
        self.primary_file = primary_file
        self.reverse_seen = False

    def primary(self) -> str:
        try:
            return self.primary_file.read_text().strip() or "source"
        except FileNotFoundError:
            return "source"

    def switch(self, kind: str, extra: dict[str, str], result: ModeResult, label: str) -> bool:
        """One cutover or rollback; on failure print why, abort, and go on."""
        started = time.monotonic()
        proc = cli(
            {**self.env, **extra},
            kind,
            "--yes",
            "--output",
            "json",
            "--verify",
            "counts",
            "--on-switch",
            hook(self.primary_file),
        )
        wall = time.monotonic() - started
        doc: dict[str, Any] = {}
        with contextlib.suppress(json.JSONDecodeError):
            doc = json.loads(proc.stdout) if proc.stdout.strip() else {}
        freeze = doc.get("freeze_seconds")
        if proc.returncode != 0 or doc.get("result") != "done" or freeze is None:
            result.failed_switches += 1
            print(f"{label} {kind} FAILED (exit {proc.returncode}, {wall:.1f}s):", flush=True)
            print("  " + proc.stderr.strip().replace("\n", "\n  ")[-3000:], flush=True)
            self.recover(kind, extra)
            if not self.daemon.alive():
                raise SystemExit(f"the daemon exited:\n{self.daemon.tail()}")
            return False
        result.freezes.append(float(freeze))
        steps = doc.get("steps") or {}
        slow = ", ".join(
            f"{k} {v * 1000:.0f}"
            for k, v in sorted(steps.items(), key=lambda kv: -float(kv[1]))[:4]
        )
        print(
            f"{label} {kind:8s} freeze {float(freeze) * 1000:7.1f} ms  "
            f"(command {wall:5.1f} s; slowest steps ms: {slow})",
            flush=True,
        )
        return True

    def recover(self, kind: str, extra: dict[str, str]) -> None:
        """After a failed switch: ``abort`` before its commit, ``--resume`` after it."""
        env = {**self.env, **extra}
        aborted = cli(env, "abort", "--yes", "--output", "json")
        print(f"  abort: exit {aborted.returncode} {aborted.stdout.strip()[:300]}", flush=True)
        if aborted.returncode == 0:
            return
        state = cli(env, kind, "--dry-run", "--output", "json")
        if "--resume" not in state.stderr:
            return  # nothing in progress: the switch aborted itself
        resumed = cli(env, kind, "--resume", "--yes", "--output", "json", "--on-switch", "true")
        print(f"  {kind} --resume: exit {resumed.returncode}", flush=True)
        if resumed.returncode != 0:
            print("  " + resumed.stderr.strip()[-1000:], flush=True)
        else:  # the hook did not run the first time: tell the application
            self.primary_file.write_text("target" if kind == "cutover" else "source")

    def settle(self, direction: str, first: bool = False) -> None:
        """Until the stream of ``direction`` has applied everything committed so far.

        The first time a direction streams, its drain creates the ``…message`` topic and
        the applier's pattern subscription rebalances a few seconds later: wait for
        that too, so it does not land inside the next freeze.
        """
        for attempt in range(2 if first else 1):
            if not self.daemon.alive():
                raise SystemExit(f"the daemon exited:\n{self.daemon.tail()}")
            if attempt:
                time.sleep(8)
            try:
                drain_direction(self.env, direction, timeout=90)
            except Exception as exc:  # reported; the next switch's preflight will judge
                print(f"  drain {direction} did not finish: {exc}", flush=True)
                time.sleep(3)

    def mode(
        self,
        name: str,
        cycles: int,
        dsn_for: Callable[[], str],
        extra: dict[str, str],
        rate: int = 200,
    ) -> ModeResult:
        result = ModeResult(name)
        load = PgbenchLoad(dsn_for, slice_seconds=1 if name == "direct" else 5, rate=rate)
        load.start()
        try:
            time.sleep(2)  # the load is running before the first freeze
            self.settle("forward", first=name == "direct")  # Debezium caught up
            for cycle in range(1, cycles + 1):
                label = f"[{name} {cycle}/{cycles}]"
                if self.primary() == "target":  # an earlier rollback failed: retry it
                    if not self.switch("rollback", extra, result, label + " (recovery)"):
                        continue
                    self.settle("forward")
                if not self.switch("cutover", extra, result, label):
                    continue
                self.settle("reverse", first=not self.reverse_seen)
                self.reverse_seen = True
                if not self.switch("rollback", extra, result, label):
                    continue
                self.settle("forward")
                result.cycles_completed += 1
            if self.primary() == "target":
                self.switch("rollback", extra, result, f"[{name} end] (recovery)")
        finally:
            load.stop()
        result.failed_transactions = load.failures
        result.processed_transactions = load.processed
        result.pgbench_runs = load.runs
        for text in load.other:
            print(f"  pgbench: {text}", flush=True)
        direction = "forward" if self.primary() == "source" else "reverse"
        try:
            drain_direction(self.env, direction, timeout=120)
        except Exception as exc:
            print(f"  final drain {direction} failed: {exc}; comparing anyway", flush=True)
        diff = workload.differences(self.env["CDCSYNC_SOURCE_DSN"], self.env["CDCSYNC_TARGET_DSN"])
        result.equal = not diff
        result.differences = diff
        return result


# ------------------------------------------------------------------ report
def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def report(results: list[ModeResult], args: argparse.Namespace) -> None:
    print()
    for r in results:
        print(
            f"{r.mode:9s} freeze p50 {fmt(r.p50_ms)}  p99 {fmt(r.ms(0.99))}  max "
            f"{fmt(r.ms(1.0))}  ({len(r.freezes)} switches)  failed application transactions "
            f"{r.failed_transactions} (of {r.processed_transactions} committed)  cycles "
            f"completed {r.cycles_completed}/{args.cycles}  failed switches "
            f"{r.failed_switches}  source == target: {r.equal}"
        )
        if r.differences:
            print(f"  differences: {r.differences}")
    print("(p99 is the nearest-rank percentile: with fewer than 100 switches it is the max)")
    goals: dict[str, bool] = {}
    for r in results:
        p50, p99 = r.p50_ms, r.ms(0.99)
        goals[f"{r.mode}_p50_under_300ms"] = p50 is not None and p50 < GOAL_P50_MS
        goals[f"{r.mode}_p99_under_1s"] = p99 is not None and p99 < GOAL_P99_MS
    bouncer = next((r for r in results if r.mode == "pgbouncer"), None)
    goals["pgbouncer_zero_failures"] = (
        bouncer is not None and bouncer.failed_transactions == 0 and bouncer.cycles_completed > 0
    )
    for r in results:
        print(
            f"goal {r.mode}: p50 < 300 ms: "
            f"{'met' if goals[f'{r.mode}_p50_under_300ms'] else 'not met'}; p99 < 1 s: "
            f"{'met' if goals[f'{r.mode}_p99_under_1s'] else 'not met'}"
        )
    print(
        "goal pgbouncer: 0 failed transactions: "
        f"{'met' if goals['pgbouncer_zero_failures'] else 'not met'}"
    )
    ratios = {
        f"{r.mode}_p50_vs_300ms": round(r.p50_ms / GOAL_P50_MS, 3)
        for r in results
        if r.p50_ms is not None
    }
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x (below 1: the p50 goal is met)")
    print(
        json.dumps(
            {
                "scale": args.scale,
                "cycles": args.cycles,
                "medians_ms": {r.mode: r.p50_ms for r in results},
                "p99s_ms": {r.mode: r.ms(0.99) for r in results},
                "max_ms": {r.mode: r.ms(1.0) for r in results},
                "failures": {r.mode: r.failed_transactions for r in results},
                "cycles_completed": {r.mode: r.cycles_completed for r in results},
                "failed_switches": {r.mode: r.failed_switches for r in results},
                "equal": {r.mode: r.equal for r in results},
                "ratios": ratios,
                "goals": goals,
                "modes": {r.mode: r.as_dict() for r in results},
            }
        )
    )


# ------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--scale", type=int, default=1, help="pgbench scale of the source")
    parser.add_argument("--cycles", type=int, default=20, help="cutover+rollback cycles per mode")
    parser.add_argument("--stack-dir", type=Path, default=Path(".stack/bench"))
    parser.add_argument("--keep-stack", action="store_true", help="leave the stack running")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--rate",
        type=int,
        default=200,
        help="pgbench transactions/s (0: flat out, which saturates a 2-core machine)",
    )
    args = parser.parse_args()

    local = LocalStack(args.stack_dir)
    before = {n for n, e in local.status()["services"].items() if e["state"] == "ready"}
    print(f"stack in {local.root} …", flush=True)
    local.up()
    started_stack = set(SERVICES) - before
    run = secrets.token_hex(3)
    migration_id = f"benchcut{run}"
    src_db, tgt_db = f"bench_cut_src_{run}", f"bench_cut_tgt_{run}"
    source_admin, target_admin = local.dsn("source"), local.dsn("target")
    work = Path(tempfile.mkdtemp(prefix="cdcsync-bench-cutover-"))
    os.chmod(work, 0o755)  # pgbouncer runs as postgres under root
    env = {
        "CDCSYNC_SOURCE_DSN": local.dsn("source", src_db),
        "CDCSYNC_TARGET_DSN": local.dsn("target", tgt_db),
        "CDCSYNC_KAFKA_BOOTSTRAP": local.kafka_bootstrap(),
        "CDCSYNC_CONNECT_URL": local.connect_url(),
        "CDCSYNC_CONNECT_SECRETS_FILE": str(local.connect_secrets),
        "CDCSYNC_MIGRATION_ID": migration_id,
        "CDCSYNC_METRICS_ADDR": "127.0.0.1:0",
        "CDCSYNC_LOG_FORMAT": "json",
    }
    settings = settings_for(env)
    daemon = Daemon(env, work / "daemon.log")
    bouncer: PgbouncerProcess | None = None
    results: list[ModeResult] = []
    created: list[tuple[str, str]] = []
    try:
        for dsn, name in ((source_admin, src_db), (target_admin, tgt_db)):
            admin(dsn, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            created.append((dsn, name))
        print(f"source: pgbench scale {args.scale} + hard cases; migration {migration_id}")
        workload.create_source(env["CDCSYNC_SOURCE_DSN"], scale=args.scale)
        t0 = time.monotonic()
        daemon.start()
        wait_streaming(env, daemon)
        print(f"streaming after {time.monotonic() - t0:.1f} s (daemon log {daemon.log})")
        bench = Bench(env, daemon, work / "primary")
        dsns = {"source": env["CDCSYNC_SOURCE_DSN"], "target": env["CDCSYNC_TARGET_DSN"]}
        for mode in args.modes:
            if mode == "direct":
                results.append(
                    bench.mode(mode, args.cycles, lambda: dsns[bench.primary()], {}, args.rate)
                )
                continue
            bouncer = PgbouncerProcess(work / "pgbouncer", local.password_file)
            primary_dsn = dsns[bench.primary()]
            bouncer.start({ALIAS: backend_of(primary_dsn)}, pool_mode="transaction")
            extra = {
                "CDCSYNC_PGBOUNCER__ADMIN_DSN": bouncer.admin_dsn(local.passfile),
                "CDCSYNC_PGBOUNCER__DATABASES_FILE": str(bouncer.databases_file),
                "CDCSYNC_PGBOUNCER__DATABASE": ALIAS,
            }
            through = bouncer.dsn(ALIAS, local.passfile)

            def via_bouncer(dsn: str = through) -> str:
                return dsn

            results.append(bench.mode(mode, args.cycles, via_bouncer, extra, args.rate))
        if not daemon.alive():
            print(f"the daemon exited:\n{daemon.tail()}")
    finally:
        if daemon.alive():
            daemon.kill(signal.SIGTERM)
        if bouncer is not None:
            bouncer.stop()
        client = ConnectClient(env["CDCSYNC_CONNECT_URL"])
        for connector in (settings.connector_name, settings.reverse_connector_name):
            with contextlib.suppress(Exception):
                client.delete(connector)
        for dsn, name in created:
            try:
                drop_database(dsn, name)
            except psycopg.Error as exc:
                print(f"could not drop {name}: {exc}")
        with contextlib.suppress(Exception):
            delete_topics(env["CDCSYNC_KAFKA_BOOTSTRAP"], migration_id)
        if results and all(r.equal for r in results):
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work} (daemon log, pgbouncer log)")
        if started_stack and not args.keep_stack:
            local.down()
    report(results, args)


if __name__ == "__main__":
    main()
