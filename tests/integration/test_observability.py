"""A real Prometheus scrapes a running daemon: every dashboard query has data, lag is honest.

The daemon runs as operators run it (``python -m cdcsync run``) while a writer keeps
changing the source; Debian's ``prometheus`` scrapes its ``/metrics`` every second.
Every panel query of ``grafana/dashboards/cdcsync.json`` is then evaluated through
Prometheus' HTTP API. Pausing the applier (``cdcsync pause``) must make offset, time
and WAL lag grow while nothing is applied, and resuming must bring them back down.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
import yaml

from cdcsync.stack import procs
from cdcsync.stack.install import find_command
from tests.integration import workload
from tests.integration.test_e2e_stream import (  # noqa: F401 - fixtures used by name
    Daemon,
    daemon,
    drain_and_compare,
    migration_env,
    wait_streaming,
)

pytestmark = pytest.mark.stack

DASHBOARD = Path(__file__).resolve().parents[2] / "grafana" / "dashboards" / "cdcsync.json"
#: Grafana's range variable, as Prometheus sees it with a 1 s scrape interval.
RATE_INTERVAL = "30s"
#: Panels whose value is NaN by design until the event they show happened.
NAN_UNTIL_IT_HAPPENS = {"cdcsync_cutover_last_freeze_seconds"}


class Prometheus:
    """Debian's prometheus on 127.0.0.1 and a free port, own data dir, stopped by PID."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.workdir = workdir
        self.target = target  # host:port of the daemon's /metrics
        self.pid: int | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Prometheus:
        binary = find_command("prometheus")
        if binary is None:
            pytest.fail("prometheus is missing: install the Debian package prometheus")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {"job_name": "cdcsync", "static_configs": [{"targets": [self.target]}]}
                    ],
                }
            )
        )
        self.port = procs.free_port()
        self.pid = procs.spawn(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            self.workdir / "prometheus.log",
        )
        if not procs.wait_until(self._ready, 60):
            tail = procs.log_tail(self.workdir / "prometheus.log")
            self.stop()
            pytest.fail(f"prometheus did not become ready on {self.url}:\n{tail}")
        return self

    def _ready(self) -> bool:
        if not procs.pid_alive(self.pid):
            return True  # start() sees the failure below
        try:
            return requests.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> None:
        pid, self.pid = self.pid, None
        procs.stop_pid(pid)
        assert not procs.pid_alive(pid), f"prometheus {pid} is still running"

    def query(self, expr: str) -> list[dict[str, Any]]:
        resp = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = resp.json()
        assert resp.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The single value of an expression (None: no series)."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr}: {result}"
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, timeout: float = 60) -> float:
        """Until ``expr`` (a filter) returns a value; that value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.value(expr)
            if found is not None:
                return found
            time.sleep(0.5)
        raise AssertionError(f"{expr} returned nothing within {timeout}s")


@pytest.fixture
def prometheus_dir(tmp_path: Path) -> Path:
    return tmp_path / "prometheus"


class Writer:
    """A steady trickle of committed source changes (~100 per second), until stopped."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.stop = threading.Event()
        self.count = 0
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stop.is_set():
                    conn.execute(
                        "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = %s",
                        (1 + self.count % 1000,),
                    )
                    self.count += 1
                    time.sleep(0.01)
        except Exception as exc:
            self.errors.append(repr(exc))

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(timeout=30)


def metrics_address(d: Daemon, timeout: float = 60) -> str:
    """host:port the daemon bound (CDCSYNC_METRICS_ADDR=127.0.0.1:0), from its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in d.log.read_text(errors="replace").splitlines():
            msg = json.loads(line).get("msg", "") if line.startswith("{") else line
            found = re.search(r"metrics and health on http://(\S+)", msg)
            if found:
                return found.group(1)
        assert d.alive(), d.tail()
        time.sleep(0.2)
    raise AssertionError(f"the daemon never logged its metrics address:\n{d.tail()}")


def dashboard_queries() -> list[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())
    found = []
    for p in doc["panels"]:
        for panel in [p, *p.get("panels", [])]:
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL)
                found.append((panel["title"], expr))
    assert len(found) >= 20, found
    return found


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cdcsync", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def readyz(address: str) -> tuple[int, str]:
    resp = requests.get(f"http://{address}/readyz?verbose", timeout=5)
    return resp.status_code, resp.text


def lag(prom: Prometheus) -> dict[str, float | None]:
    return {
        "offset": prom.value('sum(cdcsync_offset_lag_messages{direction="forward"})'),
        "time": prom.value('cdcsync_lag_seconds{direction="forward"}'),
        "wal": prom.value('cdcsync_source_wal_lag_bytes{direction="forward"}'),
        "applied": prom.value('sum(cdcsync_applied_events_total{direction="forward"})'),
    }


@pytest.fixture
def prometheus_for(prometheus_dir: Path) -> Iterator[list[Prometheus]]:
    """Started by the test once the daemon's address is known; always stopped by PID."""
    started: list[Prometheus] = []
    yield started
    for prom in started:
        if prom.pid is not None:
            prom.stop()


def test_every_dashboard_query_has_data_and_lag_follows_pause_and_resume(
    source_dsn: str,
    migration_env: dict[str, str],  # noqa: F811 - the imported fixture
    daemon: Daemon,  # noqa: F811 - the imported fixture
    prometheus_dir: Path,
    prometheus_for: list[Prometheus],
) -> None:
    workload.create_source(source_dsn, scale=1)
    migration_env["CDCSYNC_HEALTH__PROBE_INTERVAL_SECONDS"] = "1"
    daemon.start()
    address = metrics_address(daemon)
    wait_streaming(migration_env, daemon)
    prom = Prometheus(prometheus_dir, address).start()
    prometheus_for.append(prom)
    env = {**migration_env, "CDCSYNC_METRICS_ADDR": address}

    with Writer(source_dsn) as writer:
        assert prom.wait_for('up{job="cdcsync"} == 1') == 1
        # Changes flow: the applied counter moves in Prometheus, then rates have a window.
        prom.wait_for('sum(cdcsync_applied_events_total{direction="forward"}) > 100', 120)
        # The probe's topic list is cached for 30 s (KafkaOffsets.METADATA_TTL), and the
        # first one was read during the snapshot, before Debezium created the topics.
        prom.wait_for('sum(cdcsync_offset_lag_messages{direction="forward"}) >= 0', 90)
        time.sleep(10)

        # ---- every panel's query returns data (NaN only where NaN is the truth)
        empty, nan = [], []
        for title, expr in dashboard_queries():
            result = prom.query(expr)
            if not result:
                empty.append(f"{title}: {expr}")
            elif not any(re.search(m, expr) for m in NAN_UNTIL_IT_HAPPENS) and all(
                math.isnan(float(r["value"][1])) for r in result
            ):
                nan.append(f"{title}: {expr}")
        assert not empty, f"panels without data: {empty}\n{daemon.tail()}"
        assert not nan, f"panels with only NaN: {nan}"

        code, body = readyz(address)
        assert code == 200, body
        before = lag(prom)
        assert before["time"] is not None and before["time"] < 30, before

        # ---- pause: nothing applied, every lag figure grows
        done = cli(env, "pause", "--reason", "observability test")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "forward applier stopped" in done.stderr, done.stderr
        prom.wait_for("cdcsync_paused == 1", 20)
        code, body = readyz(address)
        assert code == 503 and "paused: observability test" in body, body
        status = cli(env, "status", "--output", "json")
        assert status.returncode == 0, status.stderr
        doc = json.loads(status.stdout)
        assert doc["control"]["paused"] is True and doc["daemon"]["ready"] is False, doc
        time.sleep(3)  # the batch in flight and the probe settle
        first = lag(prom)
        time.sleep(8)
        second = lag(prom)
        assert second["applied"] == first["applied"], (first, second)
        for figure in ("offset", "time", "wal"):
            a, b = first[figure], second[figure]
            assert a is not None and b is not None and b > a, (figure, first, second)
        assert second["time"] is not None and second["time"] >= 8, second

        # ---- resume: applying again, lag comes back down while the writer still writes
        done = cli(env, "resume")
        assert done.returncode == 0, done.stdout + done.stderr
        prom.wait_for("cdcsync_paused == 0", 20)
        peak = {k: v or 0.0 for k, v in second.items()}
        prom.wait_for(
            f'sum(cdcsync_applied_events_total{{direction="forward"}}) > {peak["applied"]}', 60
        )
        prom.wait_for(f'cdcsync_lag_seconds{{direction="forward"}} < {min(peak["time"], 5)}', 90)
        prom.wait_for(
            f'sum(cdcsync_offset_lag_messages{{direction="forward"}}) < {peak["offset"]}', 60
        )
        prom.wait_for(f'cdcsync_source_wal_lag_bytes{{direction="forward"}} < {peak["wal"]}', 60)
        deadline = time.monotonic() + 30
        while readyz(address)[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        code, body = readyz(address)
        assert code == 200, body
        after = lag(prom)
    print(  # the figures the README quotes (pytest -s)
        f"\nobservability: {len(dashboard_queries())} panel queries with data; "
        f"lag before pause {before}, paused +3 s {first}, paused +11 s {second}, "
        f"after resume {after}; {writer.count} source changes written"
    )
    assert not writer.errors, writer.errors
    assert writer.count > 1000
    # Pausing and resuming lost and doubled nothing.
    drain_and_compare(migration_env, daemon)
    assert daemon.alive(), daemon.tail()
