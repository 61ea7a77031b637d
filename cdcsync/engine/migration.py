"""``cdcsync run``: snapshot when none is recorded, then stream the way the state says."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg

from cdcsync.adapters.pg import connect
from cdcsync.adapters.reach import check_services
from cdcsync.config import Settings
from cdcsync.engine.daemon import Supervisor
from cdcsync.engine.observe import Observability
from cdcsync.engine.stream import Endpoint, StreamLoop
from cdcsync.snapshot.runner import migration_state, run_snapshot

log = logging.getLogger("cdcsync.run")


def _check_plan(target: psycopg.Connection[Any], settings: Settings) -> None:
    """Refuse to stream under a plan other than the one the snapshot was taken with."""
    from cdcsync.core import plan as plan_mod
    from cdcsync.errors import ConfigError
    from cdcsync.snapshot import state as st

    found = st.read(target, settings)
    if found is None:
        return
    recorded = (found.data.get("fingerprint_inputs") or {}).get("plan")
    current = plan_mod.load(settings.plan).fingerprint() if settings.plan else None
    if recorded != current:
        raise ConfigError(
            f"migration {settings.migration_id} was snapshotted under "
            f"{'plan ' + recorded if recorded else 'no plan'}, but the plan now is "
            f"{'plan ' + current if current else 'none'}: the snapshot does not match it; "
            "restore the plan it was taken with, or re-snapshot under a new CDCSYNC_MIGRATION_ID"
        )


def _needs_snapshot(target: psycopg.Connection[Any], settings: Settings) -> bool:
    state = migration_state(target, settings)
    return state is None or state[0] == "snapshot"


def _lock_key(settings: Settings) -> str:
    return f"cdcsync.snapshot:{settings.state_schema}:{settings.migration_id}"


def _snapshot_turn(
    target: psycopg.Connection[Any], settings: Settings, stop: threading.Event
) -> bool:
    """Hold the migration's snapshot lock (session-level, on ``target``); False if stopped."""
    waited = False
    while not stop.is_set():
        row = target.execute(
            "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (_lock_key(settings),)
        ).fetchone()
        if row and row[0]:
            return True
        if not waited:
            log.info(
                "another process of migration %s is snapshotting: waiting", settings.migration_id
            )
            waited = True
        stop.wait(1.0)
    return False


def run(settings: Settings, *, stop: threading.Event | None = None) -> int:
    settings.require("source_dsn", "target_dsn", "kafka_bootstrap", "connect_url")
    check_services(settings)  # before anything is created on either side
    # Endpoints, lag probe and operator requests for the whole life of the process.
    with Observability(settings) as observer:
        return _run(settings, observer, stop)


def _run(settings: Settings, observer: Observability, stop: threading.Event | None) -> int:
    with connect(settings.target_conninfo(), "target", autocommit=True) as target:
        if _needs_snapshot(target, settings):
            # Several daemons of one migration start together: one snapshots, the others
            # wait for it and then stream.
            if not _snapshot_turn(target, settings, stop or threading.Event()):
                return 0
            if _needs_snapshot(target, settings):
                with observer.snapshot_phase():
                    result = run_snapshot(
                        settings, progress=observer.progress, limiter=observer.limiter
                    )
                log.info(
                    "snapshot done: %d rows in %.1fs", result.rows, result.timings.get("total", 0)
                )
            target.execute(
                "SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (_lock_key(settings),)
            )
        _check_plan(target, settings)

    # Forward before cutover, reverse after it: the supervisor follows the state.
    def make_loop(endpoint: Endpoint, loop_stop: threading.Event) -> Callable[[], int]:
        return StreamLoop(settings, endpoint, stop=loop_stop, observer=observer).run

    return Supervisor(
        settings, make_loop, stop=stop, heartbeat=observer.heartbeat, on_direction=observer.follow
    ).run()
