"""What the cutover tests share: an application that follows the primary, and drains.

:class:`App` is the lost-write checker: it inserts rows with unique, increasing tokens
and remembers every commit the database acknowledged. On the fence error it asks the
file the ``--on-switch`` hook writes which side is primary now and moves there, as an
application repointed by its operator would. At the end every acknowledged token must
exist exactly once on the primary.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from cdcsync.adapters.connect_rest import ConnectClient
from cdcsync.config import load_settings
from cdcsync.engine.drain import DrainResult, drain

LEDGER_DDL = (
    "CREATE TABLE public.ledger (id bigserial PRIMARY KEY, token bigint NOT NULL, side text)"
)


@dataclass
class App:
    dsns: dict[str, str]
    primary_file: Path
    acked: list[int] = field(default_factory=list)
    fence_errors: int = 0
    other_errors: list[str] = field(default_factory=list)
    in_doubt: list[int] = field(default_factory=list)
    sides: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _turn: threading.Lock = field(default_factory=threading.Lock)

    def primary(self) -> str:
        try:
            return self.primary_file.read_text().strip() or "source"
        except FileNotFoundError:
            return "source"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def pause(self) -> None:
        """Hold the writer between two writes (for a comparison at a quiet instant)."""
        self._turn.acquire()

    def resume(self) -> None:
        self._turn.release()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        token = 0
        conn: psycopg.Connection[Any] | None = None
        side = ""
        while not self._stop.is_set():
            with self._turn:
                token, conn, side = self._once(token, conn, side)
            time.sleep(0.003)

    def _once(
        self, token: int, conn: psycopg.Connection[Any] | None, side: str
    ) -> tuple[int, psycopg.Connection[Any] | None, str]:
        """One write; on the fence error, move to the primary the hook named."""
        try:
            if conn is None or conn.closed:
                side = self.primary()
                conn = psycopg.connect(self.dsns[side], autocommit=True, connect_timeout=5)
            token += 1
            try:
                conn.execute(
                    "INSERT INTO public.ledger (token, side) VALUES (%s, %s)", (token, side)
                )
            except psycopg.OperationalError:
                self.in_doubt.append(token)
                raise
            self.acked.append(token)
            self.sides[side] = self.sides.get(side, 0) + 1
        except psycopg.Error as exc:
            if exc.sqlstate == "CDC01":
                self.fence_errors += 1
                if self.primary() != side and conn is not None:
                    conn.close()
            else:
                self.other_errors.append(repr(exc))
                if conn is not None:
                    conn.close()
        return token, conn, side

    def check(self, dsn: str) -> dict[str, int]:
        """Every acknowledged token exactly once on ``dsn``; returns the counts."""
        with psycopg.connect(dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT token, count(*) FROM public.ledger GROUP BY token"
            ).fetchall()
        present = {int(t): int(n) for t, n in rows}
        lost = [t for t in self.acked if t not in present]
        doubled = [t for t, n in present.items() if n > 1]
        unexpected = [t for t in present if t not in set(self.acked) and t not in self.in_doubt]
        return {
            "acknowledged": len(self.acked),
            "lost": len(lost),
            "doubled": len(doubled),
            "unexpected": len(unexpected),
        }


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
