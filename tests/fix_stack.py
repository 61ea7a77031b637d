"""Pytest plugin: the real stack for integration tests, and an isolated slice per test.

One stack serves the whole test session. It is the stack named by the environment
(``CDCSYNC_SOURCE_DSN``, ``CDCSYNC_TARGET_DSN``, ``CDCSYNC_KAFKA_BOOTSTRAP``,
``CDCSYNC_CONNECT_URL`` all set: reused as is), or a local-process stack in
``CDCSYNC_TEST_STACK_DIR`` (default ``.stack/test``) started on first use — services
start lazily, so a test that only needs PostgreSQL never waits for Kafka. A stack the
session started is stopped at its end unless ``CDCSYNC_TEST_KEEP_STACK=1``.

Backends: ``CDCSYNC_TEST_BACKEND=local`` (default, the one CI runs) or
``testcontainers`` (needs a Docker engine; chosen explicitly, never as a fallback).

Each test gets fresh databases (``source_dsn``, ``target_dsn``) and a fresh topic
prefix, and its connectors and replication slots are removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from cdcsync.adapters.connect_rest import ConnectClient
from cdcsync.stack.local import LocalStack

REPO = Path(__file__).resolve().parents[1]


@dataclass
class StackHandle:
    """The session's stack; ``ensure`` starts services on first use."""

    local: LocalStack | None
    external: dict[str, str] = field(default_factory=dict)
    started: set[str] = field(default_factory=set)

    def ensure(self, *services: str) -> None:
        if self.local is None:
            return
        missing = [s for s in services if s not in self.started]
        if missing:
            self.local.up(tuple(missing))
            self.started.update(missing)

    def admin_dsn(self, side: str) -> str:
        if self.local is None:
            return self.external[f"CDCSYNC_{side.upper()}_DSN"]
        self.ensure(side)
        return self.local.dsn(side)

    @property
    def kafka_bootstrap(self) -> str:
        if self.local is None:
            return self.external["CDCSYNC_KAFKA_BOOTSTRAP"]
        self.ensure("kafka")
        return self.local.kafka_bootstrap()

    @property
    def connect_url(self) -> str:
        if self.local is None:
            return self.external["CDCSYNC_CONNECT_URL"]
        self.ensure("connect")
        return self.local.connect_url()

    @property
    def connect_secrets_file(self) -> str:
        if self.local is None:
            return self.external.get("CDCSYNC_CONNECT_SECRETS_FILE", "")
        self.ensure("connect")
        return str(self.local.connect_secrets)

    @property
    def registry_url(self) -> str:
        """The schema registry's root URL; started on first use only (Avro tests)."""
        if self.local is None:
            url = self.external.get("CDCSYNC_KAFKA__SCHEMA_REGISTRY_URL")
            if not url:
                raise pytest.UsageError(
                    "Avro tests need CDCSYNC_KAFKA__SCHEMA_REGISTRY_URL with an external stack"
                )
            return url
        self.ensure("registry")
        return self.local.registry_url()

    def env(self) -> dict[str, str]:
        """The four contract variables for this stack (starts everything)."""
        return {
            "CDCSYNC_SOURCE_DSN": self.admin_dsn("source"),
            "CDCSYNC_TARGET_DSN": self.admin_dsn("target"),
            "CDCSYNC_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "CDCSYNC_CONNECT_URL": self.connect_url,
            "CDCSYNC_CONNECT_SECRETS_FILE": self.connect_secrets_file,
        }


_CONTRACT = (
    "CDCSYNC_SOURCE_DSN",
    "CDCSYNC_TARGET_DSN",
    "CDCSYNC_KAFKA_BOOTSTRAP",
    "CDCSYNC_CONNECT_URL",
)


@pytest.fixture(scope="session")
def stack() -> Iterator[StackHandle]:
    backend = os.environ.get("CDCSYNC_TEST_BACKEND", "local")
    if backend == "testcontainers":
        from tests.fix_testcontainers import testcontainers_stack

        with testcontainers_stack() as env:
            yield StackHandle(None, env)
        return
    if backend != "local":
        raise pytest.UsageError(f"CDCSYNC_TEST_BACKEND={backend!r}: use local or testcontainers")
    if all(os.environ.get(v) for v in _CONTRACT):
        yield StackHandle(
            None,
            {
                v: os.environ[v]
                for v in (
                    *_CONTRACT,
                    "CDCSYNC_CONNECT_SECRETS_FILE",
                    "CDCSYNC_KAFKA__SCHEMA_REGISTRY_URL",
                )
                if v in os.environ
            },
        )
        return
    root = Path(os.environ.get("CDCSYNC_TEST_STACK_DIR", REPO / ".stack" / "test"))
    local = LocalStack(root)
    before = {
        name for name, entry in local.status()["services"].items() if entry["state"] == "ready"
    }
    handle = StackHandle(local)
    yield handle
    if os.environ.get("CDCSYNC_TEST_KEEP_STACK") == "1":
        return
    if handle.started - before:
        local.down()


def _new_database(admin_dsn: str, prefix: str) -> tuple[str, str]:
    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = psycopg.conninfo.make_conninfo(admin_dsn, dbname=name)
    return name, dsn


def _drop_database(admin_dsn: str, name: str, timeout: float = 60.0) -> None:
    """Drop a test database, its slots first (their walsenders ended).

    A connector just deleted may still be stopping and reconnect to its slot between the
    termination and the drop: asked again until the database is gone.
    """
    deadline = time.monotonic() + timeout
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        while True:
            conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                "WHERE database = %s AND active_pid IS NOT NULL",
                (name,),
            )
            rows = conn.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE database = %s", (name,)
            ).fetchall()
            for (slot,) in rows:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            try:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
                return
            except psycopg.errors.ObjectInUse:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


@pytest.fixture
def connectors(stack: StackHandle) -> Iterator[list[str]]:
    """Names appended here are deleted from Kafka Connect after the test."""
    names: list[str] = []
    yield names
    if names:
        client = ConnectClient(stack.connect_url)
        for name in names:
            with contextlib.suppress(Exception):
                client.delete(name)


@pytest.fixture
def source_dsn(stack: StackHandle, connectors: list[str]) -> Iterator[str]:
    admin = stack.admin_dsn("source")
    name, dsn = _new_database(admin, "src")
    yield dsn
    # Connectors stream from this database's slots: stop them first.
    if connectors and stack.local is not None and "connect" in stack.started:
        client = ConnectClient(stack.connect_url)
        for connector in connectors:
            with contextlib.suppress(Exception):
                client.delete(connector)
    _drop_database(admin, name)


@pytest.fixture
def target_dsn(stack: StackHandle) -> Iterator[str]:
    admin = stack.admin_dsn("target")
    name, dsn = _new_database(admin, "tgt")
    yield dsn
    _drop_database(admin, name)


@pytest.fixture(scope="session")
def kafka_bootstrap(stack: StackHandle) -> str:
    return stack.kafka_bootstrap


@pytest.fixture(scope="session")
def connect_url(stack: StackHandle) -> str:
    return stack.connect_url


@pytest.fixture(scope="session")
def connect_secrets_file(stack: StackHandle) -> str:
    """Path of the properties file holding DB passwords on the Connect worker."""
    return stack.connect_secrets_file


@pytest.fixture(scope="session")
def schema_registry_url(stack: StackHandle) -> str:
    """Root URL of the stack's schema registry (Apicurio; started lazily)."""
    return stack.registry_url


@pytest.fixture
def topic_prefix() -> str:
    return f"t{secrets.token_hex(5)}"
