"""``cdcsync stack``: idempotent up, restart of a dead service, clean down, clear failures.

Each test runs the real CLI in a subprocess on a stack directory of its own, so the
session's shared stack is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdcsync.stack import procs

pytestmark = pytest.mark.stack


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cdcsync", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        check=False,
    )


def status(directory: Path) -> dict[str, Any]:
    done = cli("stack", "status", "--dir", str(directory), "--output", "json")
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)["services"]
    return result


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A private directory PostgreSQL's OS user can reach (pytest's own is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="cdcsync-stack-"))
    os.chmod(path, 0o755)
    yield path
    # A failed test must not leave a stack running: stop any stack made under it.
    for state in path.glob("*/stack.json"):
        cli("stack", "down", "--dir", str(state.parent))
    shutil.rmtree(path, ignore_errors=True)


def _ports(entry: dict[str, Any]) -> list[int]:
    return [p for p in (entry.get("port"), entry.get("controller_port")) if p]


def test_up_is_idempotent_restarts_dead_services_and_down_leaves_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "stack"
    first = cli("stack", "up", "--dir", str(directory))
    assert first.returncode == 0, first.stdout + first.stderr
    before = status(directory)
    assert {name: e["state"] for name, e in before.items()} == {
        "source": "ready",
        "target": "ready",
        "kafka": "ready",
        "connect": "ready",
    }
    pids = {name: e["pid"] for name, e in before.items()}

    second = cli("stack", "up", "--dir", str(directory))
    assert second.returncode == 0, second.stderr
    assert {name: e["pid"] for name, e in status(directory).items()} == pids

    # The environment contract works for a real client.
    env_out = cli("stack", "env", "--dir", str(directory)).stdout
    exported = dict(
        line.removeprefix("export ").split("=", 1) for line in env_out.strip().splitlines()
    )
    assert {
        "CDCSYNC_SOURCE_DSN",
        "CDCSYNC_TARGET_DSN",
        "CDCSYNC_KAFKA_BOOTSTRAP",
        "CDCSYNC_CONNECT_URL",
    } <= exported.keys()
    dsn = exported["CDCSYNC_TARGET_DSN"].strip("'")
    assert "password" not in dsn
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SHOW wal_level").fetchone() == ("logical",)

    # A service that died is started again by `up`; the others are left alone.
    os.kill(pids["target"], signal.SIGKILL)
    assert procs.wait_until(lambda: not procs.pid_alive(pids["target"]), 10)
    third = cli("stack", "up", "--dir", str(directory))
    assert third.returncode == 0, third.stdout + third.stderr
    after = status(directory)
    assert after["target"]["state"] == "ready"
    assert after["target"]["pid"] != pids["target"]
    assert {n: after[n]["pid"] for n in ("source", "kafka", "connect")} == {
        n: pids[n] for n in ("source", "kafka", "connect")
    }

    final = status(directory)
    down = cli("stack", "down", "--dir", str(directory))
    assert down.returncode == 0, down.stdout + down.stderr
    for name, entry in final.items():
        assert not procs.pid_alive(entry["pid"]), f"{name} pid {entry['pid']} survived down"
        for port in _ports(entry):
            assert not procs.port_in_use(port), f"{name} port {port} still bound after down"
    assert all(e["state"] == "stopped" for e in status(directory).values())


def test_port_already_taken_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = cli(
            "stack", "up", "source", "--dir", str(tmp_path / "s"), "--source-port", str(port)
        )
    assert done.returncode == 3
    assert f"127.0.0.1:{port} is already in use" in done.stderr


def test_postgres_that_fails_to_start_shows_its_log(tmp_path: Path) -> None:
    directory = tmp_path / "s"
    assert cli("stack", "up", "source", "--dir", str(directory)).returncode == 0
    assert cli("stack", "down", "--dir", str(directory)).returncode == 0
    conf = directory / "source" / "data" / "cdcsync.conf"
    conf.write_text("shared_buffers = 'plenty'\n")
    os.chmod(conf, 0o644)
    done = cli("stack", "up", "source", "--dir", str(directory))
    assert done.returncode == 3
    assert "PostgreSQL failed to start" in done.stderr
    assert "log tail" in done.stderr
    assert "shared_buffers" in done.stderr  # the server's own complaint, from its log


def test_missing_java_names_the_package(tmp_path: Path) -> None:
    done = cli(
        "stack",
        "up",
        "kafka",
        "--no-install",
        "--dir",
        str(tmp_path / "s"),
        env={"CDCSYNC_JAVA_BIN": str(tmp_path / "no-java")},
    )
    assert done.returncode == 3
    assert "openjdk-17-jre-headless" in done.stderr


def test_missing_maven_names_the_package(tmp_path: Path) -> None:
    done = cli(
        "stack",
        "up",
        "kafka",
        "--no-install",
        "--dir",
        str(tmp_path / "s"),
        env={
            "CDCSYNC_MVN_BIN": str(tmp_path / "no-mvn"),
            "CDCSYNC_JAR_CACHE": str(tmp_path / "jars"),
        },
    )
    assert done.returncode == 3
    assert "maven" in done.stderr


def test_connect_without_debezium_plugin_fails_with_log(tmp_path: Path) -> None:
    empty = tmp_path / "no-plugins"
    empty.mkdir()
    directory = tmp_path / "s"
    started = time.monotonic()
    done = cli(
        "stack",
        "up",
        "connect",
        "--dir",
        str(directory),
        env={"CDCSYNC_STACK_PLUGIN_PATH": str(empty)},
    )
    try:
        assert done.returncode == 3, done.stdout + done.stderr
        assert "does not list io.debezium.connector.postgresql.PostgresConnector" in done.stderr
        assert "log tail" in done.stderr
        assert time.monotonic() - started < 240
    finally:
        assert cli("stack", "down", "--dir", str(directory)).returncode == 0
