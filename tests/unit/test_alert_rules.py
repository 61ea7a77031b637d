"""The shipped alert rules are valid, unit-tested by promtool, and use exported metrics only.

promtool comes from Debian's ``prometheus`` package (``make install`` provides it); its
absence fails these tests rather than skipping them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cdcsync import metrics

ALERTS = Path(__file__).resolve().parents[2] / "grafana" / "alerts"
RULES = ALERTS / "cdcsync-rules.yml"
TESTS = ALERTS / "cdcsync-rules.test.yml"
REQUIRED = {
    "CdcsyncLagOverSLO",
    "CdcsyncSlotWalNearLimit",
    "CdcsyncConnectorNotRunning",
    "CdcsyncApplierHalted",
    "CdcsyncDeadLettersGrowing",
}


def promtool(*args: str, cwd: Path = ALERTS) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool") or "/usr/bin/promtool"
    if not Path(tool).exists():
        pytest.fail("promtool is missing: install the Debian package prometheus (make install)")
    return subprocess.run(
        [tool, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_check_rules_passes() -> None:
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


def test_promtool_unit_tests_pass() -> None:
    done = promtool("test", "rules", str(TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_fires_on_failing_series_and_stays_silent_on_healthy_ones() -> None:
    names = {r["alert"] for r in rules()}
    assert names >= REQUIRED
    doc = yaml.safe_load(TESTS.read_text())
    fires: set[str] = set()
    silent: set[str] = set()
    for case in doc["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else silent).add(check["alertname"])
    assert names - fires == set(), "alerts never shown firing"
    assert names - silent == set(), "alerts never shown silent"


def test_rules_query_only_metrics_the_daemon_exports() -> None:
    exported = {s.name for fam in metrics.REGISTRY.collect() for s in fam.samples} | {
        fam.name for fam in metrics.REGISTRY.collect()
    }
    # Counters are declared without _total; their samples carry it.
    exported |= {f"{fam.name}_total" for fam in metrics.REGISTRY.collect()}
    used = {m for r in rules() for m in re.findall(r"\bcdcsync_[a-z0-9_]+", r["expr"])}
    assert used, "no cdcsync metric in the rules"
    assert used - exported == set()


def test_a_broken_rule_fails_its_unit_test(tmp_path: Path) -> None:
    """The unit tests can fail: weaken one threshold and promtool must notice."""
    (tmp_path / "cdcsync-rules.yml").write_text(
        RULES.read_text().replace("cdcsync_halted_partitions > 0", "cdcsync_halted_partitions > 5")
    )
    (tmp_path / "cdcsync-rules.test.yml").write_text(TESTS.read_text())
    done = promtool("test", "rules", "cdcsync-rules.test.yml", cwd=tmp_path)
    assert done.returncode != 0
    assert "CdcsyncApplierHalted" in done.stdout + done.stderr
