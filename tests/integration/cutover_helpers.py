"""What the cutover tests share: an application that follows the primary, and drains.

:data:`App` is the lost-write checker (the demo's :class:`Ledger`): it inserts rows with
unique, increasing tokens and remembers every commit the database acknowledged. On the
fence error it asks the file the ``--on-switch`` hook writes which side is primary now
and moves there, as an application repointed by its operator would. At the end every
acknowledged token must exist exactly once on the primary.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg

from cdcsync.adapters.connect_rest import ConnectClient
from cdcsync.cli.demo_cmd import Ledger
from cdcsync.config import load_settings
from cdcsync.engine.drain import DrainResult, drain
from tests.integration import workload
from tests.integration.test_e2e_stream import Daemon, wait_streaming

LEDGER_DDL = (
    "CREATE TABLE public.ledger (id bigserial PRIMARY KEY, token bigint NOT NULL, side text)"
)


#: The application the demo runs is the one the tests check: same writer, same proof.
App = Ledger


def settings_for(env: dict[str, str]) -> Any:
    keys = {
        "CDCSYNC_SOURCE_DSN": "source_dsn",
        "CDCSYNC_TARGET_DSN": "target_dsn",
        "CDCSYNC_KAFKA_BOOTSTRAP": "kafka_bootstrap",
        "CDCSYNC_CONNECT_URL": "connect_url",
        "CDCSYNC_CONNECT_SECRETS_FILE": "connect_secrets_file",
        "CDCSYNC_MIGRATION_ID": "migration_id",
    }
    return load_settings(None, **{name: env[var] for var, name in keys.items()})


def drain_direction(env: dict[str, str], direction: str, timeout: float = 120) -> DrainResult:
    """Wait until every change committed so far on the stream's origin is applied."""
    settings = settings_for(env)
    if direction == "forward":
        origin, into = env["CDCSYNC_SOURCE_DSN"], env["CDCSYNC_TARGET_DSN"]
        connector, prefix = settings.connector_name, settings.topic_prefix
    else:
        origin, into = env["CDCSYNC_TARGET_DSN"], env["CDCSYNC_SOURCE_DSN"]
        connector, prefix = settings.reverse_connector_name, settings.reverse_topic_prefix
    with (
        psycopg.connect(origin, autocommit=True) as source,
        psycopg.connect(into) as target,
    ):
        return drain(
            source=source,
            target=target,
            connect=ConnectClient(env["CDCSYNC_CONNECT_URL"]),
            connector=connector,
            bootstrap=env["CDCSYNC_KAFKA_BOOTSTRAP"],
            topic_prefix=prefix,
            migration_id=settings.migration_id,
            direction=direction,
            timeout=timeout,
        )


def cdcsync(
    env: dict[str, str], *args: str, extra_env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as an operator would, with no terminal."""
    return subprocess.run(
        [sys.executable, "-m", "cdcsync", *args],
        env={**os.environ, **env, **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def hook(primary_file: Path) -> str:
    """An --on-switch command that tells the application where to write now."""
    return f'printf %s "$CDCSYNC_NEW_PRIMARY" > {primary_file}'


def fenced_tables(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(DISTINCT tgrelid) FROM pg_trigger WHERE tgname = 'cdcsync_fence'"
        ).fetchone()
    return int(row[0]) if row else 0


def writable(dsn: str) -> bool:
    """Whether an application write to the ledger goes through (rolled back)."""
    with psycopg.connect(dsn) as conn:
        try:
            conn.execute("INSERT INTO public.ledger (token, side) VALUES (-1, 'probe')")
        except psycopg.Error as exc:
            if exc.sqlstate == "CDC01":
                return False
            raise
        finally:
            conn.rollback()
    return True


def start_migration(
    source_dsn: str, env: dict[str, str], daemon: Daemon, connectors: list[str]
) -> None:
    """The workload's source plus the ledger, the daemon streaming it; both connectors cleaned."""
    connectors.append(settings_for(env).reverse_connector_name)
    workload.create_source(source_dsn, scale=1)
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(LEDGER_DDL)
    daemon.start()
    wait_streaming(env, daemon)
