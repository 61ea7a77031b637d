"""End to end through the real chain: snapshot, Debezium, Kafka, the applier — under load.

The daemon runs as the operator runs it (``python -m cdcsync run`` with the contract
variables), the source is loaded with pgbench plus a writer of the hard cases, and at
the end both databases are compared by digests computed independently on each side.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdcsync.adapters.connect_rest import ConnectClient
from cdcsync.config import load_settings
from cdcsync.engine.drain import drain
from tests.fix_stack import StackHandle
from tests.integration import workload

pytestmark = pytest.mark.stack


class Daemon:
    """``cdcsync run`` as a subprocess, with its log kept for failures."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cdcsync", "run"],
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-60:])


@pytest.fixture
def migration_env(
    stack: StackHandle,
    source_dsn: str,
    target_dsn: str,
    topic_prefix: str,
    connectors: list[str],
) -> dict[str, str]:
    connectors.append(f"{topic_prefix}-source")
    return {
        "CDCSYNC_SOURCE_DSN": source_dsn,
        "CDCSYNC_TARGET_DSN": target_dsn,
        "CDCSYNC_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
        "CDCSYNC_CONNECT_URL": stack.connect_url,
        "CDCSYNC_CONNECT_SECRETS_FILE": stack.connect_secrets_file,
        "CDCSYNC_MIGRATION_ID": topic_prefix,
        "CDCSYNC_METRICS_ADDR": "127.0.0.1:0",
        "CDCSYNC_LOG_FORMAT": "json",
    }


@pytest.fixture
def daemon(migration_env: dict[str, str], tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(migration_env, tmp_path / "daemon.log")
    yield d
    if d.alive():
        d.kill(signal.SIGTERM)


def wait_streaming(env: dict[str, str], daemon: Daemon, timeout: float = 180) -> None:
    """Until the snapshot is done and the connector streams from the slot."""
    settings = load_settings(**_settings_args(env))
    deadline = time.monotonic() + timeout
    client = ConnectClient(env["CDCSYNC_CONNECT_URL"])
    while time.monotonic() < deadline:
        assert daemon.alive(), f"daemon exited:\n{daemon.tail()}"
        if client.state(settings.connector_name) == "RUNNING":
            with psycopg.connect(env["CDCSYNC_SOURCE_DSN"], autocommit=True) as conn:
                row = conn.execute(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                    (settings.slot_name,),
                ).fetchone()
            if row and row[0]:
                return
        time.sleep(0.5)
    raise AssertionError(f"not streaming after {timeout}s:\n{daemon.tail()}")


def _settings_args(env: dict[str, str]) -> dict[str, Any]:
    keys = {
        "CDCSYNC_SOURCE_DSN": "source_dsn",
        "CDCSYNC_TARGET_DSN": "target_dsn",
        "CDCSYNC_KAFKA_BOOTSTRAP": "kafka_bootstrap",
        "CDCSYNC_CONNECT_URL": "connect_url",
        "CDCSYNC_CONNECT_SECRETS_FILE": "connect_secrets_file",
        "CDCSYNC_MIGRATION_ID": "migration_id",
    }
    return {name: env[var] for var, name in keys.items()}


def drain_and_compare(env: dict[str, str], daemon: Daemon, timeout: float = 180) -> None:
    settings = load_settings(**_settings_args(env))
    with (
        psycopg.connect(env["CDCSYNC_SOURCE_DSN"], autocommit=True) as source,
        psycopg.connect(env["CDCSYNC_TARGET_DSN"]) as target,
    ):
        drain(
            source=source,
            target=target,
            connect=ConnectClient(env["CDCSYNC_CONNECT_URL"]),
            connector=settings.connector_name,
            bootstrap=env["CDCSYNC_KAFKA_BOOTSTRAP"],
            topic_prefix=settings.topic_prefix,
            migration_id=settings.migration_id,
            timeout=timeout,
        )
    diff = workload.differences(env["CDCSYNC_SOURCE_DSN"], env["CDCSYNC_TARGET_DSN"])
    assert not diff, f"source and target differ: {diff}\n{daemon.tail()}"


def test_snapshot_then_stream_under_load(
    source_dsn: str, migration_env: dict[str, str], daemon: Daemon
) -> None:
    workload.create_source(source_dsn, scale=1)
    load = workload.Load(source_dsn, seconds=20)
    load.start()  # the snapshot runs under load too
    daemon.start()
    wait_streaming(migration_env, daemon)
    output = load.wait()
    assert not load.errors, load.errors
    assert "number of failed transactions: 0" in output
    drain_and_compare(migration_env, daemon)
    assert daemon.alive(), daemon.tail()
    daemon.kill(signal.SIGTERM)
    assert daemon.proc is not None and daemon.proc.returncode == 0, daemon.tail()


def test_kill_nine_five_times_loses_and_doubles_nothing(
    source_dsn: str, migration_env: dict[str, str], daemon: Daemon
) -> None:
    workload.create_source(source_dsn, scale=1)
    daemon.start()
    wait_streaming(migration_env, daemon)
    load = workload.Load(source_dsn, seconds=30, seed=11)
    load.start()
    rng = random.Random(5)
    for _ in range(5):
        time.sleep(rng.uniform(1.0, 4.0))
        daemon.kill(signal.SIGKILL)
        daemon.start()
    load.wait()
    assert not load.errors, load.errors
    drain_and_compare(migration_env, daemon)
