"""The health server on a free port: /livez and /readyz follow the state; /metrics serves."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import requests

from cdcsync import health, metrics
from cdcsync.config import load_settings
from cdcsync.errors import ConfigError, PreconditionError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Lag:
    def __init__(self) -> None:
        self.seconds: dict[str, float | None] = {}

    def __call__(self, direction: str) -> float | None:
        return self.seconds.get(direction)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def lag() -> Lag:
    return Lag()


@pytest.fixture
def state(clock: Clock, lag: Lag) -> health.HealthState:
    return health.HealthState(liveness_timeout=30, lag_slo=60, clock=clock, lag=lag)


@pytest.fixture
def server(state: health.HealthState) -> Iterator[health.HealthServer]:
    with health.HealthServer("127.0.0.1:0", state).start() as srv:
        yield srv


def get(server: health.HealthServer, path: str, **headers: str) -> requests.Response:
    return requests.get(server.url + path, headers=headers, timeout=5)


def test_livez_follows_the_loop_heartbeat(
    server: health.HealthServer, state: health.HealthState, clock: Clock
) -> None:
    r = get(server, "/livez")
    assert (r.status_code, r.text) == (200, "ok\n")
    clock.now += 31  # the loop stopped turning
    r = get(server, "/livez")
    assert r.status_code == 503
    assert "[-]loop failed: last loop iteration 31.0s ago (limit 30s)" in r.text
    state.heartbeat()
    r = get(server, "/livez?verbose")
    assert r.status_code == 200
    assert r.text.startswith("[+]loop ok") and r.text.endswith("livez check passed\n")


def test_readyz_flips_with_the_state(
    server: health.HealthServer, state: health.HealthState, lag: Lag
) -> None:
    r = get(server, "/readyz")
    assert r.status_code == 503 and "[-]streaming failed" in r.text  # nothing streams yet

    state.set_connector_state("forward", "RUNNING")
    r = get(server, "/readyz?verbose")
    assert r.status_code == 503 and "[-]lag:forward failed: no applied position" in r.text

    lag.seconds["forward"] = 3.0
    r = get(server, "/readyz")
    assert (r.status_code, r.text) == (200, "ok\n")

    state.set_halted("forward", "cannot apply p.public.orders[0]@42: value too long")
    r = get(server, "/readyz")
    assert r.status_code == 503
    assert "[-]halted failed: forward: cannot apply p.public.orders[0]@42" in r.text
    assert "[+]" not in r.text  # only the failures without ?verbose
    state.clear_halted("forward")
    assert get(server, "/readyz").status_code == 200

    state.set_paused("disk maintenance on the target")
    r = get(server, "/readyz?verbose")
    assert r.status_code == 503 and "[-]paused failed: paused: disk maintenance" in r.text
    state.set_paused(None)
    assert get(server, "/readyz").status_code == 200

    state.set_connector_state("forward", "FAILED")
    r = get(server, "/readyz")
    assert r.status_code == 503 and "[-]connector:forward failed: state FAILED" in r.text
    state.set_connector_state("forward", "RUNNING")

    lag.seconds["forward"] = 61.0
    r = get(server, "/readyz")
    assert r.status_code == 503
    assert "[-]lag:forward failed: time lag 61.0s (objective 60s)" in r.text
    lag.seconds["forward"] = 59.0

    r = get(server, "/readyz?verbose")
    assert r.status_code == 200
    lines = r.text.splitlines()
    assert lines[-1] == "readyz check passed"
    assert {line.split()[0] for line in lines[:-1]} == {
        "[+]loop",
        "[+]halted",
        "[+]paused",
        "[+]connector:forward",
        "[+]lag:forward",
    }


def test_a_stale_loop_is_also_unready(
    server: health.HealthServer, state: health.HealthState, clock: Clock, lag: Lag
) -> None:
    state.set_connector_state("forward", "RUNNING")
    lag.seconds["forward"] = 1.0
    assert get(server, "/readyz").status_code == 200
    clock.now += 60
    assert get(server, "/readyz").status_code == 503


def test_metrics_endpoint_serves_the_registry(
    server: health.HealthServer, state: health.HealthState
) -> None:
    state.set_paused("checking")
    r = get(server, "/metrics")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    assert "\ncdcsync_paused 1.0\n" in r.text
    state.set_paused(None)
    assert "\ncdcsync_paused 0.0\n" in get(server, "/metrics").text
    r = get(server, "/metrics", Accept="application/openmetrics-text; version=1.0.0")
    assert r.headers["Content-Type"].startswith("application/openmetrics-text")
    assert r.text.endswith("# EOF\n")
    assert get(server, "/nothing").status_code == 404


def test_state_changes_reach_the_metrics(state: health.HealthState) -> None:
    state.set_halted("forward", "bad event", partitions=2)
    assert (
        metrics.REGISTRY.get_sample_value("cdcsync_halted_partitions", {"direction": "forward"})
        == 2
    )
    state.clear_halted("forward")
    assert (
        metrics.REGISTRY.get_sample_value("cdcsync_halted_partitions", {"direction": "forward"})
        == 0
    )
    state.set_connector_state("forward", "PAUSED")
    assert (
        metrics.REGISTRY.get_sample_value(
            "cdcsync_connector_state", {"direction": "forward", "state": "PAUSED"}
        )
        == 1
    )
    state.configure(lag_slo=90)
    assert metrics.REGISTRY.get_sample_value("cdcsync_lag_slo_seconds") == 90


def test_address_comes_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().metrics_addr == "127.0.0.1:9187"  # the documented default
    monkeypatch.setenv("CDCSYNC_METRICS_ADDR", "127.0.0.1:0")
    monkeypatch.setenv("CDCSYNC_HEALTH__LAG_SLO_SECONDS", "15")
    monkeypatch.setenv("CDCSYNC_HEALTH__LIVENESS_TIMEOUT_SECONDS", "7")
    state = health.HealthState()
    srv = health.start(load_settings(), state)
    try:
        assert srv.host == "127.0.0.1" and srv.port > 0
        assert requests.get(srv.url + "/livez", timeout=5).status_code == 200
        assert (state.lag_slo, state.liveness_timeout) == (15, 7)
        assert metrics.REGISTRY.get_sample_value("cdcsync_lag_slo_seconds") == 15
    finally:
        srv.close()


def test_bad_or_busy_addresses_fail_clearly() -> None:
    for bad in ("9187", "localhost", "127.0.0.1:http", "127.0.0.1:70000"):
        with pytest.raises(ConfigError, match="CDCSYNC_METRICS_ADDR"):
            health.parse_addr(bad)
    assert health.parse_addr(":9187") == ("", 9187)
    assert health.parse_addr("[::1]:9187") == ("::1", 9187)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PreconditionError, match=f"127.0.0.1:{port}"):
            health.HealthServer(f"127.0.0.1:{port}")
