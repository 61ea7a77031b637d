"""kill -9 of cutover and rollback after each named step, then ``--resume`` or ``abort``.

Expected outcome, for every step: the command dies with SIGKILL right after the step
is recorded; then ``--resume`` finishes the switch (the new primary alone takes writes)
or, before ``commit``, ``abort`` undoes it (the old primary alone takes writes, no slot
of the new direction is left). An application writing throughout loses and doubles
nothing, and both sides are equal at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest

from cdcsync.core import switchover as sw
from tests.faults.harness import Outcome
from tests.integration import workload
from tests.integration.cutover_helpers import (
    App,
    cdcsync,
    drain_direction,
    hook,
    settings_for,
    start_migration,
    writable,
)
from tests.integration.test_e2e_stream import Daemon

pytestmark = pytest.mark.stack

BEFORE_COMMIT = [s for s in sw.STEPS if sw.index(s) < sw.index(sw.Step.COMMIT)]
AFTER_COMMIT = [s for s in sw.STEPS if sw.index(s) >= sw.index(sw.Step.COMMIT)][:-1]

# (kind, step killed after, what the operator does next): a short set for every run…
QUICK = [
    ("cutover", "freeze", "abort"),
    ("cutover", "drain", "resume"),
    ("rollback", "commit", "resume"),
    ("cutover", "retire", "resume"),
]
# …and every step of both directions for `make faults`.
FULL = [
    (kind, str(step), action)
    for kind in ("cutover", "rollback")
    for step in sw.STEPS[:-1]
    for action in (("abort", "resume") if step in BEFORE_COMMIT else ("resume",))
]


def _slots(dsn: str) -> set[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {str(r[0]) for r in conn.execute("SELECT slot_name FROM pg_replication_slots")}


def _run_matrix(
    cases: list[tuple[str, str, str]],
    source_dsn: str,
    target_dsn: str,
    env: dict[str, str],
    daemon: Daemon,
    connectors: list[str],
    tmp_path: Path,
    outcome: Outcome,
) -> None:
    settings = settings_for(env)
    start_migration(source_dsn, env, daemon, connectors)
    primary_file = tmp_path / "primary"
    app = App({"source": source_dsn, "target": target_dsn}, primary_file)
    app.start()
    dsn = {"source": source_dsn, "target": target_dsn}
    primary = "source"
    outcomes: list[str] = []
    for kind, step, action in cases:
        wanted_from = "source" if kind == "cutover" else "target"
        if primary != wanted_from:  # get into position with a clean switch first
            other = "rollback" if kind == "cutover" else "cutover"
            done = cdcsync(env, other, "--yes", "--on-switch", hook(primary_file))
            assert done.returncode == 0, done.stderr + daemon.tail()
            primary = wanted_from
        killed = cdcsync(
            env,
            kind,
            "--yes",
            "--on-switch",
            hook(primary_file),
            extra_env={"CDCSYNC_FAULT_AFTER_STEP": step},
        )
        assert killed.returncode == -9, f"{kind}/{step}: {killed.returncode} {killed.stderr}"
        again = (
            cdcsync(env, "abort", "--yes")
            if action == "abort"
            else cdcsync(
                env,
                kind,
                "--resume",
                "--yes",
                "--output",
                "json",
                "--on-switch",
                hook(primary_file),
            )
        )
        assert again.returncode == 0, f"{kind}/{step}/{action}: {again.stderr}\n{daemon.tail()}"
        if action == "resume":
            assert json.loads(again.stdout)["result"] == "done"
            primary = "target" if kind == "cutover" else "source"
            primary_file.write_text(primary)
        else:
            new_slot = settings.reverse_slot_name if kind == "cutover" else settings.slot_name
            assert new_slot not in _slots(dsn["target" if kind == "cutover" else "source"])
        standby = "target" if primary == "source" else "source"
        assert writable(dsn[primary]), f"{kind}/{step}/{action}: {primary} not writable"
        assert not writable(dsn[standby]), f"{kind}/{step}/{action}: {standby} writable"
        outcomes.append(f"{kind}/{step}/{action} → {primary} primary")
    app.pause()
    drain_direction(env, "forward" if primary == "source" else "reverse")
    diff = workload.differences(source_dsn, target_dsn)
    counts = app.check(dsn[primary])
    app.resume()
    app.stop()
    outcome.acknowledged = counts["acknowledged"]
    outcome.lost, outcome.doubled = counts["lost"], counts["doubled"]
    assert not diff, f"sides differ after {outcomes}: {diff}\n{daemon.tail()}"
    assert counts["lost"] == 0 and counts["doubled"] == 0, (counts, outcomes)
    assert counts["acknowledged"] > 0, counts
    assert daemon.alive(), daemon.tail()


@pytest.mark.scenario(
    f"kill -9 of cutover/rollback at {len(QUICK)} named steps, then resume or abort",
    "exactly one side writable after each; resume finishes, abort undoes",
)
def test_kill_nine_at_named_steps(
    source_dsn: str,
    target_dsn: str,
    migration_env: dict[str, str],
    daemon: Daemon,
    connectors: list[str],
    tmp_path: Path,
    fault_outcome: Outcome,
) -> None:
    _run_matrix(
        QUICK, source_dsn, target_dsn, migration_env, daemon, connectors, tmp_path, fault_outcome
    )


@pytest.mark.slow
@pytest.mark.scenario(
    f"kill -9 of cutover/rollback after every step of both directions ({len(FULL)} cases)",
    "exactly one side writable after each; resume finishes, abort undoes",
)
def test_kill_nine_after_every_step(
    source_dsn: str,
    target_dsn: str,
    migration_env: dict[str, str],
    daemon: Daemon,
    connectors: list[str],
    tmp_path: Path,
    fault_outcome: Outcome,
) -> None:
    _run_matrix(
        FULL, source_dsn, target_dsn, migration_env, daemon, connectors, tmp_path, fault_outcome
    )
