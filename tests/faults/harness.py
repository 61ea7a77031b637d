"""What every fault scenario shares: the lost-write checker, the end comparison, one summary row.

A scenario is a migration streaming under load — the pgbench-style workload plus the
ledger application, whose every acknowledged commit is remembered — with one fault
injected in the middle. :meth:`FaultRun.finish` drains the stream, compares source and
target with digests computed independently on each side, and counts the ledger's
acknowledged tokens on the primary: lost (acknowledged, absent) and doubled (present
twice). The row lands in the summary table whatever the test's result.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cdcsync.stack import procs
from tests.fix_stack import StackHandle
from tests.integration import workload
from tests.integration.cutover_helpers import App, drain_direction, start_migration
from tests.integration.test_e2e_stream import Daemon


@dataclass
class Outcome:
    """One row of the summary table."""

    scenario: str
    expected: str
    result: str = "not run"
    acknowledged: int = 0
    lost: int = 0
    doubled: int = 0
    seconds: float = 0.0


OUTCOMES: list[Outcome] = []


def summary_table(rows: list[Outcome]) -> str:
    """A Markdown table: scenario, expected outcome, result, acknowledged, lost, doubled."""
    lines = [
        "| scenario | expected outcome | result | acknowledged | lost | doubled | s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.scenario} | {r.expected} | {r.result} | {r.acknowledged} | {r.lost} "
            f"| {r.doubled} | {r.seconds:.0f} |"
        )
    return "\n".join(lines)


@dataclass
class FaultRun:
    """A migration under load with the ledger writing, and the proof at the end."""

    outcome: Outcome
    source_dsn: str
    target_dsn: str
    env: dict[str, str]
    daemon: Daemon
    primary_file: Path
    load: workload.Load | None = None
    app: Any = None
    started: float = field(default_factory=time.monotonic)
    finished: bool = False

    def start(
        self,
        connectors: list[str],
        *,
        seconds: float = 20,
        rate: int = 200,
        exclude: tuple[str, ...] = ("truncate",),
        seed: int = 7,
    ) -> None:
        """Snapshot, stream, then start the workload and the ledger application."""
        start_migration(self.source_dsn, self.env, self.daemon, connectors)
        self.app = App({"source": self.source_dsn, "target": self.target_dsn}, self.primary_file)
        self.app.start()
        self.load = workload.Load(
            self.source_dsn, seconds=seconds, seed=seed, exclude=exclude, rate=rate
        )
        self.load.start()

    def stop_writers(self) -> None:
        if self.load is not None:
            self.load.wait()
            assert not self.load.errors, self.load.errors
        if self.app is not None:
            self.app.stop()

    def finish(self, *, direction: str = "forward", timeout: float = 240) -> dict[str, int]:
        """Writers stopped, stream drained, sides equal, every acknowledged write once on
        the side the stream writes into (the target forward, the source in reverse)."""
        self.stop_writers()
        try:
            drain_direction(self.env, direction, timeout=timeout)
        except Exception as exc:
            raise AssertionError(f"{exc}\ndaemon log:\n{self.daemon.tail()}") from exc
        diff = workload.differences(self.source_dsn, self.target_dsn)
        assert not diff, f"source and target differ: {diff}\n{self.daemon.tail()}"
        primary = self.target_dsn if direction == "forward" else self.source_dsn
        counts: dict[str, int] = self.app.check(primary)
        self.outcome.acknowledged = counts["acknowledged"]
        self.outcome.lost = counts["lost"]
        self.outcome.doubled = counts["doubled"]
        assert counts["lost"] == 0 and counts["doubled"] == 0 and counts["unexpected"] == 0, counts
        assert counts["acknowledged"] > 0, "the ledger acknowledged nothing: the proof is empty"
        self.finished = True
        return counts


@pytest.fixture
def fault_outcome(request: pytest.FixtureRequest) -> Any:
    """The test's summary row; filled in by the test, its result set at teardown."""
    marker = request.node.get_closest_marker("scenario")
    if marker is None:
        raise pytest.UsageError(
            f"{request.node.nodeid}: a fault test needs @scenario(name, expected)"
        )
    row = Outcome(scenario=marker.args[0], expected=marker.args[1])
    t0 = time.monotonic()
    yield row
    row.seconds = time.monotonic() - t0
    rep = getattr(request.node, "rep_call", None)
    row.result = "passed" if rep is not None and rep.passed else "FAILED"
    OUTCOMES.append(row)


@pytest.fixture
def fault_run(
    fault_outcome: Outcome,
    source_dsn: str,
    target_dsn: str,
    migration_env: dict[str, str],
    daemon: Daemon,
    tmp_path: Path,
) -> Any:
    run = FaultRun(
        outcome=fault_outcome,
        source_dsn=source_dsn,
        target_dsn=target_dsn,
        env=migration_env,
        daemon=daemon,
        primary_file=tmp_path / "primary",
    )
    yield run
    if not run.finished and run.app is not None:
        run.app.stop()


def stop_service(stack: StackHandle, name: str, *, hard: bool) -> None:
    """Stop one local service: SIGTERM and wait (clean), or SIGKILL its process group (hard)."""
    if stack.local is None:
        pytest.fail(f"this scenario stops {name}: it needs the local stack")
    pid = stack.local.status()["services"][name]["pid"]
    assert pid, f"{name} is not running"
    if hard:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        assert procs.wait_until(lambda: not procs.pid_alive(pid), 30), f"{name} survived SIGKILL"
    else:
        procs.stop_pid(pid, timeout=60)


def restart_service(stack: StackHandle, name: str, *, hard: bool, down_for: float = 3) -> None:
    """Stop a service, leave it down a moment, start it again and wait until it is ready."""
    stop_service(stack, name, hard=hard)
    time.sleep(down_for)
    assert stack.local is not None
    stack.local.up((name,))
