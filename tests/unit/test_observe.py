"""The daemon's observer without services: pause handshake, halts, batches, dead letters."""

from __future__ import annotations

import threading
import time

import pytest

from cdcsync import health, metrics
from cdcsync.config import load_settings
from cdcsync.core.events import TableId
from cdcsync.engine import observe
from cdcsync.engine.observe import Observability, halt_kind


def sample(name: str, labels: dict[str, str] | None = None) -> float | None:
    return metrics.REGISTRY.get_sample_value(name, labels or {})


@pytest.fixture
def obs() -> Observability:
    # Not started: no server, probe or poller; the state is the test's own.
    return Observability(load_settings(), state=health.HealthState())


def test_pause_waits_for_every_streaming_direction(
    obs: Observability, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(observe, "PAUSE_CONFIRM_SECONDS", 5.0)
    obs.stream_started("forward", None)
    obs.stream_started("reverse", None)
    generation = obs._set_pause("maintenance")
    assert sample("cdcsync_paused") == 1
    assert not all(c.ok for c in obs.health.readiness())

    def loops() -> None:
        time.sleep(0.3)
        assert obs.paused("forward") == "maintenance"
        time.sleep(0.3)
        assert obs.paused("reverse") == "maintenance"

    t = threading.Thread(target=loops)
    started = time.monotonic()
    t.start()
    result = obs._await_pause(generation, "maintenance")
    t.join()
    assert time.monotonic() - started >= 0.5  # it waited for the second direction
    assert result == "paused (maintenance); forward, reverse applier stopped after its last batch"
    obs._set_pause(None)
    assert obs.paused("forward") is None
    assert sample("cdcsync_paused") == 0


def test_a_pause_nobody_confirms_says_so(
    obs: Observability, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(observe, "PAUSE_CONFIRM_SECONDS", 0.3)
    obs.stream_started("forward", None)
    result = obs._await_pause(obs._set_pause("x"), "x")
    assert "forward not confirmed" in result
    obs.stream_stopped("forward")
    assert "no applier is streaming" in obs._await_pause(obs._set_pause("y"), "y")


def test_halt_and_dead_letter_reach_metrics_and_readiness(obs: Observability) -> None:
    t = TableId("public", "orders")  # the table test_metrics_names allows as a label
    obs.stream_started("forward", [t])
    before = sample("cdcsync_errors_total", {"kind": "apply"}) or 0.0
    labels = {"direction": "forward", "table": str(t)}
    letters = sample("cdcsync_dead_letter_events_total", labels) or 0.0
    obs.dead_lettered("forward", t, "apply")
    assert sample("cdcsync_dead_letter_events_total", labels) == letters + 1
    obs.halted("forward", "cannot apply t[0]@5 key=1: boom")
    assert sample("cdcsync_errors_total", {"kind": "apply"}) == before + 2
    assert sample("cdcsync_halted_partitions", {"direction": "forward"}) == 1
    halted = next(c for c in obs.health.readiness() if c.name == "halted")
    assert not halted.ok and "boom" in halted.detail
    # A retry that starts does not clear the halt (it may halt again at the same event)…
    obs.stream_started("forward", [t])
    assert not next(c for c in obs.health.readiness() if c.name == "halted").ok
    # …a batch committed past it does.
    obs.batch_applied("forward", [], 0.01)
    assert next(c for c in obs.health.readiness() if c.name == "halted").ok


def test_throttle_changes_the_live_limiter(obs: Observability) -> None:
    obs._set_rate(250.0)
    assert obs.limiter.rows_per_second == 250.0
    assert sample("cdcsync_snapshot_rate_limit_rows_per_second") == 250.0
    obs._set_rate(None)
    assert obs.limiter.rows_per_second is None


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("cannot decode t[0]@1 key=null: bad", "decode"),
        ("cannot apply batch: x", "apply"),
        ("Kafka: fatal", "kafka"),
        ("dead-letter topic x did not acknowledge", "kafka"),
        ("target connection lost: y", "target_connection"),
        ("offset gap on t[0]: z", "other"),
    ],
)
def test_halt_kinds(reason: str, kind: str) -> None:
    assert halt_kind(reason) == kind
    assert kind in metrics.ERROR_KINDS
