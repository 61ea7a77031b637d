"""A poison event halts the applier; the daemon stays up, unready, and recovers by itself.

The target carries a CHECK constraint the source does not have, so one streamed row
cannot be applied: the daemon halts at it (nothing past it is committed), ``/readyz``
turns 503 naming the halt, and the process keeps running. Once the operator drops the
constraint, the next retry applies the row and ``/readyz`` is ready again.
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request

import psycopg
import pytest

from tests.integration.test_e2e_stream import Daemon, wait_streaming

pytestmark = pytest.mark.stack


def _readyz(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{url}/readyz?verbose", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _wait(predicate: object, timeout: float, what: str, daemon: Daemon) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        assert daemon.alive(), f"daemon exited while waiting for {what}:\n{daemon.tail()}"
        time.sleep(0.5)
    raise AssertionError(f"{what} not seen within {timeout}s:\n{daemon.tail()}")


def test_halt_makes_unready_and_the_fix_makes_ready_again(
    source_dsn: str, target_dsn: str, migration_env: dict[str, str], daemon: Daemon
) -> None:
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.items (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO public.items VALUES (1, 'before')")
    daemon.env = {**daemon.env, "CDCSYNC_APPLY__HALT_RETRY_SECONDS": "2"}
    daemon.start()
    wait_streaming(migration_env, daemon)
    found = re.search(r"metrics and health on (http://[0-9.:]+)", daemon.log.read_text())
    assert found, daemon.tail()
    url = found.group(1)
    _wait(lambda: _readyz(url)[0] == 200, 60, "ready while streaming", daemon)

    with psycopg.connect(target_dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.items ADD CONSTRAINT no_poison CHECK (v <> 'poison')")
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO public.items VALUES (2, 'poison')")
        conn.execute("INSERT INTO public.items VALUES (3, 'after')")

    _wait(lambda: _readyz(url)[0] == 503, 60, "unready after the poison event", daemon)
    code, body = _readyz(url)
    assert code == 503, body
    assert "halt" in body.lower() and "no_poison" in body, body
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT id FROM public.items ORDER BY id").fetchall()
        assert rows == [(1,)], rows  # nothing at or past the poison event was committed
    time.sleep(5)  # a few retries halt again at the same event: still unready, still up
    assert _readyz(url)[0] == 503 and daemon.alive(), daemon.tail()

    with psycopg.connect(target_dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.items DROP CONSTRAINT no_poison")
    _wait(lambda: _readyz(url)[0] == 200, 90, "ready again after the fix", daemon)
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT id, v FROM public.items ORDER BY id").fetchall()
    assert rows == [(1, "before"), (2, "poison"), (3, "after")], rows
