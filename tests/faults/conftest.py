"""The fault suite: shared fixtures, and the summary table printed at the end of the run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import OUTCOMES, fault_outcome, fault_run, summary_table  # noqa: F401
from tests.integration.test_e2e_stream import daemon, migration_env  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test of this directory is part of the fault suite (``make faults``)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.faults)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the item, so a scenario's row says whether it passed."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not OUTCOMES:
        return
    table = summary_table(OUTCOMES)
    terminalreporter.write_sep("=", "fault suite summary")
    terminalreporter.write_line(table)
    out = Path(os.environ.get("CDCSYNC_FAULT_SUMMARY", REPO / ".stack" / "fault-summary.md"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    terminalreporter.write_line(f"(written to {out})")
