"""``cdcsync report`` after a real migration: snapshot → stream → backup → cutover → rollback.

Every status is checked against what the run recorded, and the freeze durations the
report shows against the audit rows the switches wrote.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import psycopg
import pytest

from cdcsync.core.report_model import PHASES, freeze_text
from tests.integration import workload
from tests.integration.cutover_helpers import LEDGER_DDL, cdcsync, drain_direction, settings_for
from tests.integration.test_e2e_stream import Daemon, wait_streaming

pytestmark = pytest.mark.stack


def _statuses(md: str) -> dict[str, str]:
    found = {}
    for phase in PHASES:
        m = re.search(rf"^\| {re.escape(phase)} \| (\S+) ", md, re.MULTILINE)
        assert m, f"{phase} missing from the summary:\n{md}"
        found[phase] = m.group(1)
    return found


def test_report_follows_the_recorded_migration(
    source_dsn: str,
    target_dsn: str,
    migration_env: dict[str, str],
    daemon: Daemon,
    connectors: list[str],
    tmp_path: Path,
) -> None:
    env = migration_env
    settings = settings_for(env)
    connectors.append(settings.reverse_connector_name)
    workload.create_source(source_dsn, scale=1)
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(LEDGER_DDL)

    # Before anything ran: only discovery (which the report runs itself) can be complete.
    empty = cdcsync(env, "report")
    assert empty.returncode == 0, empty.stderr
    before = _statuses(empty.stdout)
    assert all(s == "🚧" for p, s in before.items() if p != "Discovery"), empty.stdout

    daemon.start()
    wait_streaming(env, daemon)
    load = workload.Load(source_dsn, seconds=3, seed=41, exclude=("truncate",))
    load.start()
    load.wait()
    drain_direction(env, "forward")

    backup = cdcsync(env, "backup", "--dir", str(tmp_path / "b"), "--jobs", "2", "-o", "json")
    assert backup.returncode == 0, backup.stderr + daemon.tail()
    cut = cdcsync(env, "cutover", "--yes", "--output", "json", "--verify", "checksum")
    assert cut.returncode == 0, cut.stderr + daemon.tail()
    back = cdcsync(env, "rollback", "--yes", "--output", "json", "--verify", "checksum")
    assert back.returncode == 0, back.stderr + daemon.tail()

    assess = cdcsync(env, "assess", "--output", "json")
    findings = json.loads(assess.stdout)["findings"]
    errors = [f for f in findings if f["severity"] == "error" and f["code"] != "target-not-empty"]

    rep = cdcsync(env, "report", "--format", "md")
    assert rep.returncode == 0, rep.stderr
    md = rep.stdout
    print("REPORT-MD\n" + md)
    assert _statuses(md) == {
        "Discovery": "⚠️" if errors else "✅",
        "Strategy": "🚧",
        "Preparation": "✅",
        "Execution": "✅",
        "Verification & Cleanup": "🚧",  # rolled back, not finalized
    }, md
    assert "not complete" in md and "taken without one" in md and "finalize" in md

    # Freeze durations: as the audit trail recorded them, and as the commands reported.
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT command, (detail->>'freeze_seconds')::float8 FROM cdcsync.audit "
            "WHERE migration_id = %s AND command IN ('cutover', 'rollback') AND result = 'done' "
            "ORDER BY id",
            (settings.migration_id,),
        ).fetchall()
        point = conn.execute(
            "SELECT consistent_point::text FROM cdcsync.migration WHERE migration_id = %s",
            (settings.migration_id,),
        ).fetchone()
    assert [r[0] for r in rows] == ["cutover", "rollback"]
    recorded = [float(r[1]) for r in rows]
    assert recorded == [
        json.loads(cut.stdout)["freeze_seconds"],
        json.loads(back.stdout)["freeze_seconds"],
    ]
    for i, (kind, seconds) in enumerate(zip(("cutover", "rollback"), recorded, strict=True), 1):
        line = next(x for x in md.splitlines() if x.startswith(f"| {i} | {kind} |"))
        assert f"| {freeze_text(seconds)} |" in line, (line, seconds)
        assert f"switch #{i} ({kind}) step timings" in md
    assert point is not None and f"consistent point: {point[0]}" in md
    assert json.loads(backup.stdout)["location"] in md
    assert re.search(r"^\| forward \| \d+ \| [1-9][\d,]* \|", md, re.MULTILINE), md

    page = tmp_path / "report.html"
    html = cdcsync(env, "report", "--format", "html", "--out", str(page))
    assert html.returncode == 0, html.stderr
    text = page.read_text()
    sections = dict(re.findall(r'<section id="([^"]+)" data-status="([a-z]+)">', text))
    assert sections == {
        "discovery": "attention" if errors else "complete",
        "strategy": "blocked",
        "preparation": "complete",
        "execution": "complete",
        "verification-cleanup": "blocked",
    }, sections
    assert text.count(freeze_text(recorded[0])) >= 1 and text.count(freeze_text(recorded[1])) >= 1
    assert daemon.alive(), daemon.tail()
    daemon.kill(signal.SIGTERM)
