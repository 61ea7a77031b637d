"""Exported metric names and labels follow Prometheus conventions, and stay bounded."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from cdcsync import metrics
from cdcsync.core.events import Op, Position, RowChange, SourceInfo, TableId, Truncate

SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
ALLOWED_LABELS = {"direction", "table", "op", "topic", "partition", "phase", "state"}
ALLOWED_LABELS |= {"kind", "status", "result", "version", "le"}
BAD_UNITS = (
    "_ms",
    "milliseconds",
    "microseconds",
    "_minutes",
    "_hours",
    "_kb",
    "_mb",
    "_gb",
    "kilobytes",
    "megabytes",
    "_percent",
    "_count_total",
)
ORDERS = TableId("public", "orders")


def change(op: Op, offset: int, commit_ms: int, table: TableId = ORDERS) -> RowChange:
    return RowChange(
        table,
        op,
        {"id": "1"},
        None,
        {"id": "1"},
        SourceInfo(lsn=1000 + offset, tx_id=1, commit_ts_ms=commit_ms),
        Position("p.public.orders", 0, offset),
    )


@pytest.fixture
def populated() -> Iterator[None]:
    """Every helper called once, so every family has samples to check."""
    metrics._reset_for_tests()
    now_ms = int(time.time() * 1000)
    metrics.declare_tables("forward", [ORDERS])
    metrics.record_batch(
        "forward",
        [
            change(Op.INSERT, 1, now_ms - 3000),
            change(Op.UPDATE, 2, now_ms - 2000),
            change(Op.DELETE, 3, now_ms - 1000),
            Truncate(ORDERS, SourceInfo(2000, 2, now_ms - 500), Position("p.public.orders", 0, 4)),
        ],
        0.042,
        4096,
    )
    metrics.record_dead_letter("forward", ORDERS)
    metrics.record_dead_letter("forward", None)
    metrics.record_error("decode")
    metrics.set_halted_partitions("forward", 0)
    metrics.set_paused(False)
    metrics.set_offset_lag("forward", {("p.public.orders", 0): 5, ("p.public.orders", 1): 0})
    metrics.set_source_wal_lag("forward", 123456)
    metrics.set_slot(
        "forward",
        retained_bytes=1 << 20,
        max_keep_bytes=8 << 30,
        safe_bytes=(8 << 30) - (1 << 20),
        wal_status="reserved",
    )
    metrics.set_connector_state("forward", "RUNNING")
    metrics.set_phase("streaming")
    metrics.set_snapshot_progress([metrics.SnapshotTable("public.orders", 10, 8192, 10, 8192)])
    metrics.set_snapshot_rate_limit(5000)
    metrics.record_cutover_freeze(1.5)
    metrics.record_verification({ORDERS: 0})
    metrics.set_lag_slo(60)
    yield
    metrics._reset_for_tests()


def families() -> dict[str, tuple[str, str, list[Sample]]]:
    text = metrics.exposition().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = (fam.type, fam.documentation, fam.samples)
    return out


@pytest.mark.usefixtures("populated")
def test_names_follow_prometheus_conventions() -> None:
    found = families()
    assert len(found) >= 25
    problems = []
    for name, (kind, help_text, samples) in found.items():
        if not name.startswith("cdcsync_"):
            problems.append(f"{name}: not in the cdcsync_ namespace")
        if not SNAKE.match(name):
            problems.append(f"{name}: not snake_case")
        if not help_text.strip():
            problems.append(f"{name}: no HELP")
        if not samples:
            problems.append(f"{name}: no sample (helper not exercised?)")
        if any(bad in name for bad in BAD_UNITS):
            problems.append(f"{name}: not in base units")
        for s in samples:
            if kind == "counter" and not s.name.endswith("_total"):
                problems.append(f"{s.name}: counter without _total")
            if kind != "counter" and s.name.endswith("_total"):
                problems.append(f"{s.name}: {kind} ending in _total")
            stem = s.name.removesuffix("_total")
            if kind == "histogram":
                stem = re.sub(r"_(bucket|sum|count)$", "", stem)
            for unit in ("seconds", "bytes"):
                if unit in stem and not stem.endswith(f"_{unit}"):
                    problems.append(f"{s.name}: unit {unit} is not the suffix")
            for label in s.labels:
                if label not in ALLOWED_LABELS:
                    problems.append(f"{s.name}: unexpected label {label}")
                if label == "le" and kind != "histogram":
                    problems.append(f"{s.name}: le on a {kind}")
    assert problems == []


@pytest.mark.usefixtures("populated")
def test_the_metrics_the_issue_requires_are_exported() -> None:
    found = families()
    for name in (
        "cdcsync_applied_events",  # counters are listed without _total by the parser
        "cdcsync_offset_lag_messages",
        "cdcsync_last_applied_source_timestamp_seconds",
        "cdcsync_lag_seconds",
        "cdcsync_source_wal_lag_bytes",
        "cdcsync_slot_retained_wal_bytes",
        "cdcsync_slot_max_wal_keep_size_bytes",
        "cdcsync_apply_batch_events",
        "cdcsync_apply_batch_duration_seconds",
        "cdcsync_snapshot_copied_rows",
        "cdcsync_snapshot_copied_bytes",
        "cdcsync_snapshot_planned_rows",
        "cdcsync_snapshot_planned_bytes",
        "cdcsync_verification_mismatches",
        "cdcsync_dead_letter_events",
        "cdcsync_halted_partitions",
        "cdcsync_connector_state",
        "cdcsync_phase",
        "cdcsync_paused",
        "cdcsync_cutover_last_freeze_seconds",
        "cdcsync_errors",
    ):
        assert name in found, name
    kinds = {n: k for n, (k, _, _) in found.items()}
    assert kinds["cdcsync_apply_batch_events"] == "histogram"
    assert kinds["cdcsync_apply_batch_duration_seconds"] == "histogram"
    assert kinds["cdcsync_applied_events"] == "counter"


@pytest.mark.usefixtures("populated")
def test_label_values_are_bounded() -> None:
    samples = [s for _, _, ss in families().values() for s in ss]
    for s in samples:
        assert s.labels.get("direction", "forward") in metrics.DIRECTIONS, s
        assert s.labels.get("op", "insert") in (*metrics.OPS, "other"), s
        assert s.labels.get("kind", "other") in metrics.ERROR_KINDS, s
        assert s.labels.get("table", "other") in ("public.orders", "other"), s
        if s.name == "cdcsync_connector_state":
            assert s.labels["state"] in metrics.CONNECTOR_STATES

    def applied() -> dict[tuple[str, str], float]:
        return {
            (s.labels["table"], s.labels["op"]): s.value
            for s in families()["cdcsync_applied_events"][2]
        }

    before = applied()
    now_ms = int(time.time() * 1000)
    batch = [change(Op.UPDATE, n, now_ms) for n in range(3)]
    batch.append(change(Op.INSERT, 3, now_ms, TableId("public", "intruder")))
    metrics.record_batch("forward", batch, 0.01, 100)
    after = applied()
    assert {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)} == {
        ("public.orders", "update"): 3,
        ("other", "insert"): 1,
    }
    # A table that is not migrated never becomes a label value of its own.
    labels = {"direction": "forward", "table": "other"}
    was = metrics.REGISTRY.get_sample_value("cdcsync_dead_letter_events_total", labels)
    metrics.record_dead_letter("forward", TableId("public", "intruder"))
    metrics.record_error("no-such-kind")
    text = metrics.exposition().decode()
    assert "intruder" not in text and "no-such-kind" not in text
    now = metrics.REGISTRY.get_sample_value("cdcsync_dead_letter_events_total", labels)
    assert was is not None and now == was + 1
    with pytest.raises(ValueError, match="direction"):
        metrics.record_dead_letter("sideways", ORDERS)


@pytest.mark.usefixtures("populated")
def test_time_lag_is_exported_as_a_timestamp_and_as_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    found = families()
    ts = found["cdcsync_last_applied_source_timestamp_seconds"][2][0].value
    lag = found["cdcsync_lag_seconds"][2][0].value
    # The batch's newest change was committed half a second before it was recorded.
    assert abs(time.time() - 0.5 - ts) < 5
    assert 0 <= lag < 5
    # Older positions never move it back; newer ones do.
    metrics.record_applied_position("forward", ts - 100)
    assert families()["cdcsync_last_applied_source_timestamp_seconds"][2][0].value == ts
    # Nothing applied for a while (paused, stuck, idle without heartbeats): lag grows.
    later = time.time() + 42
    monkeypatch.setattr(metrics, "_wall", lambda: later)
    lag = families()["cdcsync_lag_seconds"][2][0].value
    assert 42 < lag < 47
    assert metrics.time_lag_seconds("forward") == lag
    metrics.record_applied_position("forward", later - 1)
    assert families()["cdcsync_lag_seconds"][2][0].value == 1


@pytest.mark.usefixtures("populated")
def test_gone_series_are_removed_and_unknown_figures_are_not_guessed() -> None:
    metrics.set_offset_lag("forward", {("p.public.orders", 1): 7})
    lags = {s.labels["partition"]: s.value for s in families()["cdcsync_offset_lag_messages"][2]}
    assert lags == {"1": 7}
    metrics.set_slot(
        "forward", retained_bytes=None, max_keep_bytes=None, safe_bytes=None, wal_status=None
    )
    found = families()
    assert not found["cdcsync_slot_retained_wal_bytes"][2]
    assert math.isinf(found["cdcsync_slot_max_wal_keep_size_bytes"][2][0].value)
    status = {s.labels["status"]: s.value for s in found["cdcsync_slot_wal_status"][2]}
    assert status["missing"] == 1 and sum(status.values()) == 1
    metrics.set_source_wal_lag("forward", None)
    assert not families()["cdcsync_source_wal_lag_bytes"][2]
    metrics.set_phase("cut_over")
    phases = {s.labels["phase"]: s.value for s in families()["cdcsync_phase"][2]}
    assert phases["cut_over"] == 1 and sum(phases.values()) == 1


@pytest.mark.usefixtures("populated")
def test_promtool_check_metrics_accepts_the_exposition() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: install the Debian package prometheus (make install)")
    done = subprocess.run(
        [promtool, "check", "metrics"],
        input=metrics.exposition(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()
    assert done.stdout.decode().strip() == "", done.stdout.decode()
