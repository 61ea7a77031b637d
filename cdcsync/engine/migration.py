"""``cdcsync run``: snapshot when none is recorded, then stream the way the state says."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from cdcsync.adapters.pg import connect
from cdcsync.config import Settings
from cdcsync.engine.daemon import Supervisor
from cdcsync.engine.observe import Observability
from cdcsync.engine.stream import Endpoint, StreamLoop
from cdcsync.snapshot.runner import migration_state, run_snapshot

log = logging.getLogger("cdcsync.run")


def run(settings: Settings, *, stop: threading.Event | None = None) -> int:
    settings.require("source_dsn", "target_dsn", "kafka_bootstrap", "connect_url")
    # Endpoints, lag probe and operator requests for the whole life of the process.
    with Observability(settings) as observer:
        return _run(settings, observer, stop)


def _run(settings: Settings, observer: Observability, stop: threading.Event | None) -> int:
    with connect(settings.target_conninfo(), "target") as target:
        state = migration_state(target, settings)
    if state is None or state[0] in ("snapshot",):
        with observer.snapshot_phase():
            result = run_snapshot(settings, progress=observer.progress, limiter=observer.limiter)
        log.info("snapshot done: %d rows in %.1fs", result.rows, result.timings.get("total", 0))

    # Forward before cutover, reverse after it: the supervisor follows the state.
    def make_loop(endpoint: Endpoint, loop_stop: threading.Event) -> Callable[[], int]:
        return StreamLoop(settings, endpoint, stop=loop_stop, observer=observer).run

    return Supervisor(
        settings, make_loop, stop=stop, heartbeat=observer.heartbeat, on_direction=observer.follow
    ).run()
