"""``cdcsync demo``: a whole migration of a sample database, under load, on the local stack.

Fresh source and target databases (pgbench scale 1 plus a ledger table), discovery with
``cdcsync assess``, the daemon's snapshot and streaming while pgbench writes to the source,
``cdcsync status`` and ``verify``, a ``cutover`` under load (pgbench meets the fence, then
writes to the new primary, whose changes flow back), a ``rollback``, a final checksum
verification and a summary of every phase with its measured numbers.

Each step says what it does; a failing step prints the daemon's log tail and exits
non-zero. The databases are dropped at the end (``--keep`` keeps them; the next run drops
them, from the record it keeps in the stack directory).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import psycopg
import typer
from psycopg import sql
from rich.console import Console
from rich.table import Table

from cdcsync.adapters.connect_rest import ConnectClient
from cdcsync.adapters.pg import libpq_env
from cdcsync.cli.main import app
from cdcsync.config import Settings, load_settings, redact_dsn
from cdcsync.errors import CdcsyncError
from cdcsync.stack.local import LocalStack, default_dir

console = Console(soft_wrap=True, width=shutil.get_terminal_size((120, 40)).columns)

PG_BIN = Path("/usr/lib/postgresql/15/bin")
LEDGER_DDL = (
    "CREATE TABLE public.ledger (id bigserial PRIMARY KEY, token bigint NOT NULL, "
    "side text NOT NULL, at timestamptz NOT NULL DEFAULT now())"
)
RECORD = "demo-run.json"
FENCE_SQLSTATE = "CDC01"


# ---------------------------------------------------------------------- helpers
class StepFailed(CdcsyncError):
    """A demo step did not do what it should; the message says which and why."""

    exit_code = 1


@dataclass
class Pgbench:
    """pgbench's TPC-B-like load against one side, rate-limited, until ``stop``."""

    dsn: str
    side: str
    rate: int
    clients: int = 2
    proc: subprocess.Popen[str] | None = None
    output: str = ""

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                str(PG_BIN / "pgbench"),
                "-n",
                "-c",
                str(self.clients),
                "-j",
                "1",
                "-R",
                str(self.rate),
                "-T",
                "900",
            ],
            env={**os.environ, **libpq_env(self.dsn)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float) -> int | None:
        """Wait for pgbench to end by itself (the fence aborts its clients)."""
        if self.proc is None:
            return None
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self.output += out or ""
        return self.proc.returncode

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=20)
        self.output += out or ""

    def fence_line(self) -> str:
        for line in self.output.splitlines():
            if FENCE_SQLSTATE in line or "fence" in line.lower():
                return line.strip()
        for line in self.output.splitlines():
            if "aborted" in line or "ERROR" in line:
                return line.strip()
        return ""


@dataclass
class Ledger:
    """An application that follows the primary: unique tokens into ``public.ledger``.

    On the fence error it reads the file the ``--on-switch`` hook writes and moves to
    the side named there. Every commit the database acknowledged is remembered, so the
    end can prove none was lost or doubled.
    """

    dsns: dict[str, str]
    primary_file: Path
    acked: list[int] = field(default_factory=list)
    in_doubt: list[int] = field(default_factory=list)
    sides: dict[str, int] = field(default_factory=dict)
    fence_errors: int = 0
    other_errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _turn: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def primary(self) -> str:
        try:
            return self.primary_file.read_text().strip() or "source"
        except FileNotFoundError:
            return "source"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="ledger")
        self._thread.start()

    def pause(self) -> None:
        self._turn.acquire()

    def resume(self) -> None:
        self._turn.release()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        token = 0
        conn: psycopg.Connection[Any] | None = None
        side = ""
        while not self._stop.is_set():
            with self._turn:
                token, conn, side = self._once(token, conn, side)
            time.sleep(0.02)
        if conn is not None:
            conn.close()

    def _once(
        self, token: int, conn: psycopg.Connection[Any] | None, side: str
    ) -> tuple[int, psycopg.Connection[Any] | None, str]:
        try:
            if conn is None or conn.closed:
                side = self.primary()
                conn = psycopg.connect(self.dsns[side], autocommit=True, connect_timeout=5)
            token += 1
            try:
                conn.execute(
                    "INSERT INTO public.ledger (token, side) VALUES (%s, %s)", (token, side)
                )
            except psycopg.OperationalError:
                self.in_doubt.append(token)
                raise
            self.acked.append(token)
            self.sides[side] = self.sides.get(side, 0) + 1
        except psycopg.Error as exc:
            if exc.sqlstate == FENCE_SQLSTATE:
                self.fence_errors += 1
                if self.primary() != side and conn is not None:
                    conn.close()
                else:
                    time.sleep(0.05)
            else:
                self.other_errors.append(str(exc).strip().splitlines()[0][:200])
                if conn is not None:
                    conn.close()
                time.sleep(0.2)
        return token, conn, side

    def check(self, dsn: str) -> dict[str, int]:
        """Every acknowledged token exactly once on ``dsn``."""
        with psycopg.connect(dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT token, count(*) FROM public.ledger WHERE token > 0 GROUP BY token"
            ).fetchall()
        present = {int(t): int(n) for t, n in rows}
        acked = set(self.acked)
        return {
            "acknowledged": len(self.acked),
            "lost": sum(1 for t in self.acked if t not in present),
            "doubled": sum(1 for n in present.values() if n > 1),
            "unexpected": sum(1 for t in present if t not in acked and t not in self.in_doubt),
        }


class Daemon:
    """``cdcsync run`` as a subprocess; its log is kept in the stack's logs directory."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cdcsync", "run"],
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def wait_exit(self, timeout: float) -> int | None:
        """The exit code once the daemon ends by itself (None if still running)."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def metrics_addr(self) -> str | None:
        found = re.search(r"metrics and health on http://([^\s/]+)", self.text())
        return found.group(1) if found else None

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(timeout=30)
        return self.proc.returncode


@dataclass
class Phase:
    name: str
    mark: str = "🚧"
    detail: str = "not reached"


# ------------------------------------------------------------------- the command
@app.command()
def demo(
    keep: Annotated[
        bool, typer.Option("--keep", help="keep the databases (the next run drops them)")
    ] = False,
    rate: Annotated[
        int, typer.Option("--rate", min=1, help="pgbench transactions per second")
    ] = 40,
    streaming_seconds: Annotated[
        float, typer.Option("--streaming-seconds", min=1, help="seconds of streaming under load")
    ] = 8.0,
) -> None:
    """A full migration of a pgbench database under load, with numbers.

    assess → plan → snapshot → stream → verify → cutover → writes on the new primary →
    rollback → cutover again → verify → finalize → report.
    """
    started = time.monotonic()
    settings = load_settings()
    settings.require(
        "source_dsn", "target_dsn", "kafka_bootstrap", "connect_url", "connect_secrets_file"
    )
    stack = LocalStack(default_dir())
    record = stack.root / RECORD
    _cleanup_recorded(settings, record)

    suffix = secrets.token_hex(3)
    mid = f"demo_{suffix}"
    names = {"source": f"demo_src_{suffix}", "target": f"demo_tgt_{suffix}"}
    admin = {"source": settings.source_conninfo(), "target": settings.target_conninfo()}
    dsns = {
        side: psycopg.conninfo.make_conninfo(
            settings.source_dsn if side == "source" else settings.target_dsn, dbname=names[side]
        )
        for side in names
    }
    conninfo = {
        side: psycopg.conninfo.make_conninfo(admin[side], dbname=names[side]) for side in names
    }
    env = {
        "CDCSYNC_SOURCE_DSN": dsns["source"],
        "CDCSYNC_TARGET_DSN": dsns["target"],
        "CDCSYNC_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "CDCSYNC_CONNECT_URL": settings.connect_url,
        "CDCSYNC_CONNECT_SECRETS_FILE": str(settings.connect_secrets_file),
        "CDCSYNC_MIGRATION_ID": mid,
        "CDCSYNC_METRICS_ADDR": "127.0.0.1:0",
        "CDCSYNC_LOG_FORMAT": "text",
        "COLUMNS": str(console.width),
    }
    run_dir = stack.root / "demo" / mid
    run_dir.mkdir(parents=True, exist_ok=True)
    primary_file = run_dir / "primary"
    daemon = Daemon(env, stack.root / "logs" / f"{mid}-daemon.log")
    phases = {
        n: Phase(n)
        for n in (
            "Discovery",
            "Plan",
            "Snapshot",
            "Streaming",
            "Backup",
            "Cutover",
            "Rollback",
            "Cutover again",
            "Verification",
            "Finalize",
        )
    }
    demo_ctx = _Demo(settings, env, dsns, conninfo, daemon, primary_file, phases, rate)
    _write_record(record, mid, names, None)
    code = 0
    try:
        _title(f"migration {mid}: source database {names['source']}, target {names['target']}")
        console.print(f"  source: {redact_dsn(dsns['source'])}", highlight=False)
        console.print(f"  target: {redact_dsn(dsns['target'])}", highlight=False)
        console.print(f"  daemon log: {daemon.log}", highlight=False)
        _create_databases(admin, names)
        demo_ctx.load_sample()
        demo_ctx.discovery()
        demo_ctx.plan(run_dir / "plan.yaml")
        demo_ctx.snapshot_and_stream(streaming_seconds)
        _write_record(record, mid, names, daemon.pid)
        demo_ctx.verify_streaming()
        demo_ctx.backup(run_dir / "backups")
        demo_ctx.cutover()
        demo_ctx.rollback()
        demo_ctx.cutover_again()
        demo_ctx.final_verification()
        demo_ctx.finalize()
        demo_ctx.final_report()
    except (CdcsyncError, psycopg.Error, OSError, subprocess.SubprocessError) as exc:
        code = exc.exit_code if isinstance(exc, CdcsyncError) and exc.exit_code else 1
        console.print(f"\n[bold red]✗ step failed:[/] {exc}", highlight=False)
        console.print(f"[bold]daemon log tail[/] ({daemon.log}):", highlight=False)
        console.print(daemon.tail() or "(empty)", highlight=False, markup=False)
    finally:
        demo_ctx.stop_load()
        _summary(phases, demo_ctx.numbers)
        if daemon.proc is not None:
            _step("stopping the daemon (SIGTERM)")
            rc = daemon.stop()
            console.print(f"  daemon exited with code {rc}", highlight=False)
        if keep:
            console.print(
                f"kept databases {names['source']} and {names['target']} "
                "(the next demo drops them)",
                highlight=False,
            )
            _write_record(record, mid, names, None)
        else:
            _step("dropping the demo databases, connectors and topics")
            _cleanup(settings, mid, names)
            record.unlink(missing_ok=True)
        console.print(f"demo finished in {time.monotonic() - started:.0f} s", highlight=False)
    if code:
        raise typer.Exit(code)


class _Demo:
    """The steps, sharing the run's settings, load, daemon and measured numbers."""

    def __init__(
        self,
        settings: Settings,
        env: dict[str, str],
        dsns: dict[str, str],
        conninfo: dict[str, str],
        daemon: Daemon,
        primary_file: Path,
        phases: dict[str, Phase],
        rate: int,
    ) -> None:
        self.settings = settings
        self.env = env
        self.dsns = dsns
        self.conninfo = conninfo
        self.daemon = daemon
        self.primary_file = primary_file
        self.phases = phases
        self.rate = rate
        self.numbers: dict[str, Any] = {}
        self.pgbench: Pgbench | None = None
        self.ledger = Ledger(conninfo, primary_file)
        self.hook = f'printf %s "$CDCSYNC_NEW_PRIMARY" > {shlex.quote(str(primary_file))}'

    # ------------------------------------------------------------ load
    def start_pgbench(self, side: str) -> None:
        self.pgbench = Pgbench(self.conninfo[side], side, self.rate)
        self.pgbench.start()
        console.print(
            f"  pgbench writing to the {side} ({self.rate} tx/s, 2 clients)", highlight=False
        )

    def stop_pgbench(self) -> None:
        if self.pgbench is not None:
            self.pgbench.stop()
            self.pgbench = None

    def stop_load(self) -> None:
        self.stop_pgbench()
        self.ledger.stop()

    def fenced_pgbench(self, switch: str) -> None:
        """The old primary's pgbench met the fence and ended; say how."""
        if self.pgbench is None:
            return
        rc = self.pgbench.wait_exit(timeout=30)
        if rc is None:
            self.stop_pgbench()
            console.print(f"  pgbench on the old primary stopped after the {switch}")
            return
        line = self.pgbench.fence_line()
        console.print(
            f"  pgbench on the {self.pgbench.side} met the write fence and exited ({rc}):",
            highlight=False,
        )
        if line:
            console.print(f"    {line[:220]}", highlight=False, markup=False)
        self.pgbench = None

    # ------------------------------------------------------------ steps
    def load_sample(self) -> None:
        _step("loading the sample: pgbench -i -s 1 --foreign-keys, plus public.ledger")
        t0 = time.monotonic()
        proc = subprocess.run(
            [str(PG_BIN / "pgbench"), "-i", "-q", "-s", "1", "--foreign-keys"],
            env={**os.environ, **libpq_env(self.conninfo["source"])},
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        if proc.returncode:
            raise StepFailed(f"pgbench -i failed: {proc.stdout[-500:]}{proc.stderr[-500:]}")
        with psycopg.connect(self.conninfo["source"], autocommit=True) as conn:
            # pgbench_history has no key: a full replica identity makes it migratable.
            conn.execute("ALTER TABLE public.pgbench_history REPLICA IDENTITY FULL")
            conn.execute(LEDGER_DDL)
            conn.execute(
                "INSERT INTO public.ledger (token, side) SELECT -g, 'seed' "
                "FROM generate_series(1, 1000) g"
            )
            rows = _counts(conn)
        console.print(
            f"  loaded in {time.monotonic() - t0:.1f} s: "
            + ", ".join(f"{t} {n:,}" for t, n in rows.items()),
            highlight=False,
        )

    def discovery(self) -> None:
        phase = self.phases["Discovery"]
        _step("discovery: cdcsync assess --output text")
        rc, out, err = _cli(self.env, ["assess", "--output", "text"], timeout=300, live=False)
        sys.stdout.write(out)
        sys.stdout.flush()
        _, outj, _ = _cli(self.env, ["assess", "--output", "json"], timeout=300, live=False)
        summary: dict[str, int] = {}
        if outj.strip():
            with contextlib.suppress(ValueError):
                summary = json.loads(outj)["summary"]
        self.numbers["assess"] = summary
        counts = ", ".join(f"{n} {sev}" for sev, n in summary.items()) or "?"
        if rc != 0:
            phase.mark, phase.detail = "🚧", f"assess exit {rc}: {counts}"
            raise StepFailed(f"cdcsync assess exited {rc}: {err.strip()[-500:]}")
        if summary.get("warning"):
            phase.mark = "⚠️"
        else:
            phase.mark = "✅"
        phase.detail = f"{counts} (nothing blocks the migration)"
        console.print(f"  assess: {counts}", highlight=False)

    def plan(self, path: Path) -> None:
        phase = self.phases["Plan"]
        _step(f"strategy: cdcsync plan --output {path}, then cdcsync plan --check")
        rc, _out, err = _cli(self.env, ["plan", "--output", str(path)], timeout=120, live=False)
        if rc != 0:
            raise StepFailed(f"cdcsync plan exited {rc}: {err.strip()[-500:]}")
        rc, out, err = _cli(self.env, ["plan", "--check", str(path)], timeout=120, live=False)
        if rc != 0:
            phase.mark, phase.detail = "🚧", f"plan --check exit {rc}"
            raise StepFailed(f"cdcsync plan --check exited {rc}: {err.strip()[-500:]}")
        console.print(f"  {out.strip()}", highlight=False)
        # The daemon and every command from here on follow the plan (a changed plan
        # would be refused: the snapshot records its fingerprint).
        self.env["CDCSYNC_PLAN"] = str(path)
        phase.mark, phase.detail = "✅", out.strip()

    def snapshot_and_stream(self, seconds: float) -> None:
        snap, stream = self.phases["Snapshot"], self.phases["Streaming"]
        _step("starting the load on the source, then the daemon (cdcsync run)")
        self.primary_file.write_text("source")
        self.ledger.start()
        self.start_pgbench("source")
        self.daemon.start()
        console.print(f"  daemon pid {self.daemon.pid}, log {self.daemon.log}", highlight=False)
        snap.mark, snap.detail = "🚧", "started"
        _step("waiting for the snapshot, the connector RUNNING and the slot active")
        self.wait_streaming(timeout=420)
        took = time.monotonic() - self.daemon.started_at
        found = re.search(r"snapshot done: (\d+) rows in ([\d.]+)s", self.daemon.text())
        if found:
            rows, secs = int(found.group(1)), float(found.group(2))
        else:
            rows, secs = -1, took
        self.numbers["snapshot_rows"], self.numbers["snapshot_seconds"] = rows, secs
        snap.mark = "✅"
        snap.detail = f"{rows:,} rows in {secs:.1f} s (under load)"
        console.print(
            f"  snapshot: {rows:,} rows in {secs:.1f} s; streaming {took:.1f} s after start",
            highlight=False,
        )
        stream.mark, stream.detail = "🚧", "streaming"
        _step("cdcsync status")
        status_env = dict(self.env)
        addr = self.daemon.metrics_addr()
        if addr:
            status_env["CDCSYNC_METRICS_ADDR"] = addr
            self.wait_ready(addr, timeout=60)
        rc, out, err = _cli(status_env, ["status"], timeout=120, live=False)
        sys.stdout.write(out)
        sys.stdout.flush()
        if rc != 0:
            raise StepFailed(f"cdcsync status exited {rc}: {err.strip()[-500:]}")
        _step(f"streaming under load for {seconds:.0f} s")
        before = self._history("target")
        self._sleep_alive(seconds)
        after = self._history("target")
        self.numbers["streamed_tx"] = after - before
        console.print(
            f"  {after - before} pgbench transactions reached the target in {seconds:.0f} s",
            highlight=False,
        )

    def verify_streaming(self) -> None:
        stream = self.phases["Streaming"]
        _step("pausing the load, then cdcsync verify --level checksum (until caught up)")
        self.stop_pgbench()
        self.ledger.pause()
        try:
            doc, tries, secs = self.verify_until_equal(timeout=90)
        finally:
            self.ledger.resume()
        rows = _rows(doc)
        stream.mark = "✅"
        stream.detail = (
            f"{self.numbers.get('streamed_tx', 0)} tx in the window; equal after "
            f"{secs:.1f} s ({tries} verify run(s), {rows:,} rows)"
        )
        _step("resuming the load on the source")
        self.start_pgbench("source")
        self._sleep_alive(3)

    def cutover(self) -> None:
        phase = self.phases["Cutover"]
        _step("cdcsync cutover --yes --verify checksum --on-switch <write the primary file>")
        phase.mark, phase.detail = "🚧", "running"
        report = self.switch(["cutover", "--yes", "--verify", "checksum"])
        freeze = float(report.get("freeze_seconds") or 0.0) * 1000
        self.numbers["cutover_freeze_ms"] = freeze
        phase.mark, phase.detail = "✅", _switched(report)
        if self.ledger.primary() != "target":
            raise StepFailed("the --on-switch hook did not name the target as the new primary")
        self.fenced_pgbench("cutover")
        _step("the application moves to the target; pgbench restarts there")
        self.start_pgbench("target")
        base = self._history("target")
        self._sleep_alive(6)
        written = self._history("target") - base
        console.print(
            f"  the target took {written} pgbench transactions and "
            f"{self.ledger.sides.get('target', 0)} ledger writes in 6 s",
            highlight=False,
        )
        _step("waiting for those writes to flow back to the old source (reverse stream)")
        t0 = time.monotonic()
        goal = base + written
        while (back := self._history("source")) < goal:
            if time.monotonic() - t0 > 120:
                raise StepFailed(
                    f"only {back - base} of {written} target transactions reached the old "
                    "source within 120 s"
                )
            self._sleep_alive(1)
        secs = time.monotonic() - t0
        self.numbers["reverse_seconds"] = secs
        console.print(
            f"  all {written} were on the old source {secs:.1f} s after the window closed",
            highlight=False,
        )

    def rollback(self) -> None:
        phase = self.phases["Rollback"]
        _step("cdcsync rollback --yes --on-switch <write the primary file>")
        phase.mark, phase.detail = "🚧", "running"
        report = self.switch(["rollback", "--yes"])
        freeze = float(report.get("freeze_seconds") or 0.0) * 1000
        self.numbers["rollback_freeze_ms"] = freeze
        phase.mark, phase.detail = "✅", _switched(report)
        if self.ledger.primary() != "source":
            raise StepFailed("the --on-switch hook did not name the source as the primary")
        self.fenced_pgbench("rollback")
        _step("load back on the source for a few seconds")
        self.start_pgbench("source")
        self._sleep_alive(5)

    def backup(self, directory: Path) -> None:
        phase = self.phases["Backup"]
        _step(f"cdcsync backup --dir {directory} (restored into a scratch database, compared)")
        rc, out, err = _cli(
            self.env,
            ["backup", "--dir", str(directory), "--output", "json"],
            timeout=600,
            live=False,
        )
        if rc != 0:
            phase.mark, phase.detail = "🚧", f"backup exit {rc}"
            raise StepFailed(f"cdcsync backup exited {rc}: {err.strip()[-500:]}")
        doc = json.loads(out)
        check = doc.get("verification") or {}
        detail = (
            f"{len(doc.get('files', []))} file(s), {doc.get('size_bytes', 0):,} bytes, restored "
            f"and equal by checksum ({check.get('rows', 0):,} rows) in "
            f"{(doc.get('seconds') or {}).get('total', 0):.1f} s"
        )
        console.print(f"  {doc.get('location')}: {detail}", highlight=False)
        phase.mark, phase.detail = "✅", detail

    def cutover_again(self) -> None:
        phase = self.phases["Cutover again"]
        _step("cdcsync cutover --yes --verify checksum (the second time: for good)")
        phase.mark, phase.detail = "🚧", "running"
        report = self.switch(["cutover", "--yes", "--verify", "checksum"])
        self.numbers["cutover2_freeze_ms"] = float(report.get("freeze_seconds") or 0.0) * 1000
        phase.mark, phase.detail = "✅", _switched(report)
        if self.ledger.primary() != "target":
            raise StepFailed("the --on-switch hook did not name the target as the new primary")
        self.fenced_pgbench("cutover")
        _step("load on the new primary for a few seconds")
        self.start_pgbench("target")
        self._sleep_alive(5)

    def finalize(self) -> None:
        phase = self.phases["Finalize"]
        mid = self.env["CDCSYNC_MIGRATION_ID"]
        _step(f"cdcsync finalize --confirm {mid}: the move is final, the way back removed")
        rc, out, err = _cli(
            self.env, ["finalize", "--confirm", mid, "--output", "json"], timeout=300, live=False
        )
        if rc != 0:
            phase.mark, phase.detail = "🚧", f"finalize exit {rc}"
            raise StepFailed(f"cdcsync finalize exited {rc}: {err.strip()[-500:]}")
        removed = json.loads(out).get("removed", {})
        console.print(f"  removed: {removed}", highlight=False)
        code = self.daemon.wait_exit(60)
        if code != 0:
            raise StepFailed(f"the daemon did not exit 0 after finalize (code {code})")
        console.print("  the daemon saw the migration finalized and exited 0", highlight=False)
        phase.mark, phase.detail = "✅", "connectors, slots, publications and fences removed"

    def final_verification(self) -> None:
        phase = self.phases["Verification"]
        _step("stopping the load; cdcsync verify --level checksum until both sides are equal")
        self.stop_load()
        doc, tries, secs = self.verify_until_equal(timeout=120)
        rows = _rows(doc)
        self.numbers["rows_verified"] = rows
        ledger = self.ledger.check(self.conninfo[self.ledger.primary()])
        self.numbers["ledger"] = ledger
        console.print(
            f"  ledger: {ledger['acknowledged']} acknowledged writes "
            f"(source {self.ledger.sides.get('source', 0)}, "
            f"target {self.ledger.sides.get('target', 0)}, "
            f"{self.ledger.fence_errors} fence errors met): {ledger['lost']} lost, "
            f"{ledger['doubled']} doubled, {ledger['unexpected']} unexpected",
            highlight=False,
        )
        if ledger["lost"] or ledger["doubled"] or ledger["unexpected"]:
            phase.mark, phase.detail = "🚧", f"ledger check failed: {ledger}"
            raise StepFailed(f"the ledger check failed: {ledger}")
        if self.ledger.other_errors:
            console.print(
                f"  ⚠️ the application saw {len(self.ledger.other_errors)} other error(s), "
                f"first: {self.ledger.other_errors[0]}",
                highlight=False,
                markup=False,
            )
        phase.mark = "✅"
        phase.detail = (
            f"{rows:,} rows equal by checksum after {secs:.1f} s ({tries} run(s)); "
            f"{ledger['acknowledged']} acknowledged writes, none lost or doubled"
        )
        if not self.daemon.alive():
            raise StepFailed("the daemon exited during the demo")

    # ------------------------------------------------------------ pieces
    def wait_streaming(self, timeout: float) -> None:
        client = ConnectClient(self.settings.connect_url)
        connector = f"{self.env['CDCSYNC_MIGRATION_ID']}-source"
        slot = f"{self.env['CDCSYNC_MIGRATION_ID']}_slot"
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.daemon.alive():
                raise StepFailed(f"the daemon exited (code {self.daemon.returncode()})")
            state = ""
            with contextlib.suppress(Exception):
                state = client.state(connector)
            if state == "RUNNING":
                with psycopg.connect(self.conninfo["source"], autocommit=True) as conn:
                    row = conn.execute(
                        "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)
                    ).fetchone()
                if row and row[0]:
                    return
            progress = _last_progress(self.daemon.text())
            if progress and progress != last:
                console.print(f"  {progress}", highlight=False, markup=False)
                last = progress
            time.sleep(1)
        raise StepFailed(f"not streaming after {timeout:.0f} s")

    def wait_ready(self, addr: str, timeout: float) -> None:
        """Until the daemon's /readyz says ready (its probe has seen the connector)."""
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"http://{addr}/readyz", timeout=2).status_code == 200:
                    return
            self._sleep_alive(1)
        console.print(f"  the daemon is not ready after {timeout:.0f} s (see status)")

    def verify_until_equal(self, timeout: float) -> tuple[dict[str, Any], int, float]:
        from cdcsync.cli.verify_cmd import render

        t0 = time.monotonic()
        deadline = t0 + timeout
        tries = 0
        doc: dict[str, Any] = {}
        while True:
            tries += 1
            rc, out, err = _cli(
                self.env,
                ["verify", "--level", "checksum", "--output", "json"],
                timeout=300,
                live=False,
            )
            if rc not in (0, 3):
                raise StepFailed(f"cdcsync verify exited {rc}: {err.strip()[-500:]}")
            doc = json.loads(out)
            if rc == 0:
                console.print(render(doc))
                secs = time.monotonic() - t0
                console.print(f"  equal ({tries} run(s), {secs:.1f} s)", highlight=False)
                return doc, tries, secs
            differing = {t: n for t, n in doc.get("mismatches", {}).items() if n}
            console.print(f"  not equal yet (streaming catches up): {differing}", highlight=False)
            if time.monotonic() > deadline:
                console.print(render(doc))
                raise StepFailed(f"source and target still differ after {timeout:.0f} s")
            if not self.daemon.alive():
                raise StepFailed("the daemon exited")
            time.sleep(3)

    def final_report(self) -> None:
        """The migration report, phase by phase, from what the state recorded."""
        out_file = self.primary_file.parent / "report.md"
        _step(f"cdcsync report --format md --out {out_file}")
        rc, _out, err = _cli(
            self.env, ["report", "--format", "md", "--out", str(out_file)], timeout=300
        )
        if rc != 0:
            raise StepFailed(f"cdcsync report exited {rc}: {err.strip()[-800:]}")
        console.print(out_file.read_text(encoding="utf-8"), highlight=False, markup=False)

    def switch(self, args: list[str]) -> dict[str, Any]:
        rc, out, err = _cli(
            self.env, [*args, "--output", "json", "--on-switch", self.hook], timeout=600
        )
        if rc != 0:
            raise StepFailed(f"cdcsync {args[0]} exited {rc}: {err.strip()[-800:]}")
        report: dict[str, Any] = json.loads(out)
        if report.get("result") != "done":
            raise StepFailed(f"cdcsync {args[0]}: result {report.get('result')!r}")
        from cdcsync.core.switchover import FROZEN_STEPS, STEPS

        console.print(f"  {args[0]} {report['migration_id']}: {report['result']}")
        steps: dict[str, float] = report.get("steps", {})
        order = [str(s) for s in STEPS if str(s) in steps] + [
            s for s in steps if s not in {str(x) for x in STEPS}
        ]
        frozen = {str(s) for s in FROZEN_STEPS}
        for step in order:
            note = "  (writes frozen)" if step in frozen else ""
            console.print(f"    {step:<12} {steps[step] * 1000:9.1f} ms{note}", highlight=False)
        if report.get("freeze_seconds") is not None:
            console.print(
                f"  [bold]write freeze: {report['freeze_seconds'] * 1000:.1f} ms[/]",
                highlight=False,
            )
        return report

    def _history(self, side: str) -> int:
        with psycopg.connect(self.conninfo[side], autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM public.pgbench_history").fetchone()
        return int(row[0]) if row else 0

    def _sleep_alive(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if not self.daemon.alive():
                raise StepFailed("the daemon exited")
            time.sleep(min(0.5, max(end - time.monotonic(), 0)))


# ---------------------------------------------------------------------- output
def _title(text: str) -> None:
    console.rule(f"[bold]{text}[/]")


def _step(text: str) -> None:
    console.print(f"\n[bold cyan]▶ {text}[/]", highlight=False)


def _switched(report: dict[str, Any]) -> str:
    freeze = float(report.get("freeze_seconds") or 0.0) * 1000
    drain = float(report.get("steps", {}).get("drain", 0.0)) * 1000
    return f"write freeze {freeze:,.0f} ms (drain {drain:,.0f} ms); {_verified(report)}"


def _verified(report: dict[str, Any]) -> str:
    ver = report.get("verification") or {}
    level = ver.get("level", "?")
    tables = ver.get("tables")
    if level == "none":
        return "not verified under the freeze"
    return f"{level} of {tables} tables equal under the freeze"


def _rows(doc: dict[str, Any]) -> int:
    return sum(int(t.get("source_rows") or 0) for t in doc.get("tables", []))


def _last_progress(log: str) -> str:
    for line in reversed(log.splitlines()[-50:]):
        if "snapshot progress" in line or "snapshot done" in line:
            return line[line.find("snapshot") :][:160]
    return ""


def _summary(phases: dict[str, Phase], numbers: dict[str, Any]) -> None:
    table = Table("phase", "", "measured", title="cdcsync demo: summary")
    for phase in phases.values():
        table.add_row(phase.name, phase.mark, phase.detail)
    console.print()
    console.print(table)


def _cli(
    env: dict[str, str], args: list[str], *, timeout: float, live: bool = True
) -> tuple[int, str, str]:
    """Run ``python -m cdcsync ARGS`` with no terminal; stderr is shown as it comes."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cdcsync", *args],
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    err_lines: list[str] = []
    out_parts: list[str] = []

    def read_err() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            err_lines.append(line)
            if live:
                console.print(f"    │ {line.rstrip()}", highlight=False, markup=False)

    def read_out() -> None:
        assert proc.stdout is not None
        out_parts.append(proc.stdout.read())

    readers = [threading.Thread(target=read_err), threading.Thread(target=read_out)]
    for t in readers:
        t.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
        raise StepFailed(f"cdcsync {args[0]} did not finish within {timeout:.0f} s") from None
    finally:
        for t in readers:
            t.join(timeout=30)
    return rc, "".join(out_parts), "".join(err_lines)


# --------------------------------------------------------------- databases
def _counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in (
        "pgbench_accounts",
        "pgbench_branches",
        "pgbench_tellers",
        "pgbench_history",
        "ledger",
    ):
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("public", name))
        ).fetchone()
        out[name] = int(row[0]) if row else 0
    return out


def _create_databases(admin: dict[str, str], names: dict[str, str]) -> None:
    _step("creating fresh source and target databases")
    for side, name in names.items():
        with psycopg.connect(admin[side], autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        console.print(f"  {side}: created database {name}", highlight=False)


def _write_record(record: Path, mid: str, names: dict[str, str], pid: int | None) -> None:
    record.write_text(json.dumps({"migration_id": mid, "databases": names, "daemon_pid": pid}))


def _cleanup_recorded(settings: Settings, record: Path) -> None:
    """Drop what a previous run left (kept with --keep, or interrupted)."""
    try:
        data = json.loads(record.read_text())
    except FileNotFoundError:
        return
    except ValueError:
        record.unlink()
        return
    mid = str(data.get("migration_id", ""))
    names = {k: str(v) for k, v in dict(data.get("databases", {})).items()}
    _step(f"dropping what the previous demo run left ({mid})")
    pid = data.get("daemon_pid")
    if isinstance(pid, int):
        _stop_old_daemon(pid)
    _cleanup(settings, mid, names)
    record.unlink(missing_ok=True)


def _stop_old_daemon(pid: int) -> None:
    """SIGTERM the previous run's daemon, if that pid is still a ``cdcsync run``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if b"cdcsync" not in cmdline or b"run" not in cmdline:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        for _ in range(60):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.5)
        console.print(f"  stopped the previous daemon (pid {pid})", highlight=False)


def _cleanup(settings: Settings, mid: str, names: dict[str, str]) -> None:
    if not re.fullmatch(r"demo_[0-9a-f]{6}", mid):
        return
    client = ConnectClient(settings.connect_url)
    for connector in (f"{mid}-source", f"{mid}-reverse"):
        with contextlib.suppress(Exception):
            client.delete(connector)
    admin = {"source": settings.source_conninfo(), "target": settings.target_conninfo()}
    for side, name in names.items():
        if side in admin:
            try:
                _drop_database(admin[side], name)
                console.print(f"  dropped {side} database {name}", highlight=False)
            except psycopg.Error as exc:
                console.print(f"  could not drop {name}: {exc}", highlight=False, markup=False)
    _delete_topics(settings.kafka_bootstrap, mid)


def _drop_database(admin: str, name: str) -> None:
    for attempt in range(20):
        try:
            with psycopg.connect(admin, autocommit=True) as conn:
                # Slots pin a database: stop their walsenders, drop them, then the database.
                conn.execute(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                    "WHERE database = %s AND active_pid IS NOT NULL",
                    (name,),
                )
                slots = conn.execute(
                    "SELECT slot_name FROM pg_replication_slots WHERE database = %s", (name,)
                ).fetchall()
                for (slot,) in slots:
                    with contextlib.suppress(psycopg.Error):
                        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
            return
        except psycopg.errors.ObjectInUse:
            if attempt == 19:
                raise
            time.sleep(0.5)


def _delete_topics(bootstrap: str, mid: str) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        topics = [t for t in admin.list_topics(timeout=15).topics if mid in t]
    except Exception as exc:  # the demo's result does not depend on it
        console.print(f"  could not list topics: {exc}", highlight=False, markup=False)
        return
    if not topics:
        return
    for fut in admin.delete_topics(topics, operation_timeout=30).values():
        with contextlib.suppress(Exception):
            fut.result(timeout=60)
    console.print(f"  deleted {len(topics)} Kafka topic(s) of {mid}", highlight=False)
