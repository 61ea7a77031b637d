"""The Grafana dashboard queries only metrics cdcsync declares, and covers what on-call needs.

The integration test (tests/integration/test_observability.py) proves each query
returns data from a running daemon; this one catches a renamed or invented metric
without a stack.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cdcsync import metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "grafana" / "dashboards" / "cdcsync.json"
_METRIC = re.compile(r"\bcdcsync_[a-z0-9_]+")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def load() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every non-row panel, including those nested in collapsed rows."""
    out: list[dict[str, Any]] = []
    for p in doc["panels"]:
        if p.get("type") == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def expressions(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    return [(p["title"], t["expr"]) for p in panels(doc) for t in p.get("targets", [])]


def declared_names() -> set[str]:
    """Sample names the registry can export (histogram and counter suffixes included)."""
    names: set[str] = set()
    for fam in metrics.REGISTRY.collect():
        names.add(fam.name)
        names.update(s.name for s in fam.samples)
        if fam.type == "counter":
            names.add(f"{fam.name}_total")
        if fam.type == "histogram":
            names.update(f"{fam.name}{suffix}" for suffix in _HISTOGRAM_SUFFIXES)
        if fam.type == "info":
            names.add(f"{fam.name}_info")
    return names


def undeclared(doc: dict[str, Any]) -> dict[str, set[str]]:
    known = declared_names()
    found: dict[str, set[str]] = {}
    for title, expr in expressions(doc):
        missing = set(_METRIC.findall(expr)) - known
        if missing:
            found.setdefault(title, set()).update(missing)
    return found


def test_every_panel_has_a_query_naming_a_cdcsync_metric() -> None:
    doc = load()
    assert len(panels(doc)) >= 15
    for p in panels(doc):
        exprs = [t["expr"] for t in p.get("targets", [])]
        assert exprs, f"panel {p['title']!r} has no query"
        for expr in exprs:
            assert _METRIC.search(expr), f"panel {p['title']!r}: {expr!r} names no cdcsync metric"


def test_every_expression_names_only_declared_metrics() -> None:
    assert undeclared(load()) == {}


def test_the_check_catches_an_invented_metric() -> None:
    doc = load()
    panels(doc)[0]["targets"][0]["expr"] = "sum(cdcsync_offset_lag_mesages)"
    assert undeclared(doc) == {panels(doc)[0]["title"]: {"cdcsync_offset_lag_mesages"}}


def test_the_dashboard_covers_what_on_call_watches() -> None:
    used = {m for _, expr in expressions(load()) for m in _METRIC.findall(expr)}
    for metric in (
        "cdcsync_offset_lag_messages",
        "cdcsync_lag_seconds",
        "cdcsync_source_wal_lag_bytes",
        "cdcsync_applied_events_total",
        "cdcsync_apply_batch_duration_seconds_bucket",
        "cdcsync_slot_retained_wal_bytes",
        "cdcsync_snapshot_copied_bytes",
        "cdcsync_phase",
        "cdcsync_errors_total",
        "cdcsync_dead_letter_events_total",
        "cdcsync_cutover_last_freeze_seconds",
    ):
        assert metric in used, metric


def test_panels_use_the_datasource_variable_and_unique_ids() -> None:
    doc = load()
    ids = [p["id"] for p in doc["panels"]] + [
        q["id"] for p in doc["panels"] for q in p.get("panels", [])
    ]
    assert len(ids) == len(set(ids))
    assert any(v["name"] == "datasource" for v in doc["templating"]["list"])
    for p in panels(doc):
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
