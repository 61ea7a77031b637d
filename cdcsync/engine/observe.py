"""The daemon's observability, started once per process: endpoints, lag probe, control.

One :class:`Observability` serves ``/metrics``, ``/livez`` and ``/readyz``, runs the lag
probe thread (figures the applier cannot see from inside its loop: Kafka end offsets,
the slot's retained WAL, the connector's state) and polls the operator's requests
(``cdcsync pause`` / ``resume`` / ``throttle``). Every StreamLoop of the process — one
per direction — reports to the same object; it never assumes a single direction.

Requests are carried out by the loops themselves: the poller only records the intent
(paused with a reason, a new snapshot pace) and completes a pause once every streaming
loop has seen it between two batches, i.e. once nothing more is being applied. The
effective control state survives restarts (it is read back from the request table),
so a daemon restarted while paused stays paused.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg

from cdcsync import health, metrics
from cdcsync.adapters import requests_store as rs
from cdcsync.adapters.lag_probe import LagProbe, ProbeTarget
from cdcsync.adapters.pg import connect
from cdcsync.config import Settings
from cdcsync.core.events import Event, TableId
from cdcsync.errors import CdcsyncError
from cdcsync.snapshot.catalog import exists
from cdcsync.snapshot.copy import RateLimiter
from cdcsync.snapshot.progress import Progress

log = logging.getLogger("cdcsync.observe")

#: How long a pause request waits for the streaming loops to confirm they stopped.
PAUSE_CONFIRM_SECONDS = 20.0


def halt_kind(reason: str) -> str:
    """The error kind (metrics.ERROR_KINDS) of a halt, from the applier's message."""
    if reason.startswith("cannot decode"):
        return "decode"
    if reason.startswith("cannot apply"):
        return "apply"
    if reason.startswith(("Kafka", "dead-letter topic")):
        return "kafka"
    if reason.startswith("target connection"):
        return "target_connection"
    return "other"


class _LiveSnapshotProbe(LagProbe):
    """The lag probe, reading snapshot progress from this process's live counters.

    While (and after) this process copies, its :class:`Progress` counters are fresher
    than the chunks committed in the state schema; two writers of the same gauges would
    make them flicker, so the probe takes the live figures when there are any.
    """

    def __init__(self, settings: Settings, progress: Progress, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self._progress = progress

    def _snapshot(
        self, state: psycopg.Connection[Any], target: ProbeTarget
    ) -> list[metrics.SnapshotTable]:
        live = snapshot_tables(self._progress)
        return live or super()._snapshot(state, target)


def snapshot_tables(progress: Progress) -> list[metrics.SnapshotTable]:
    """The live counters as metrics rows (planned figures are estimates until done)."""
    return [
        metrics.SnapshotTable(
            str(t.table), t.rows_done, t.bytes_done, max(t.rows_total, 0), max(t.bytes_total, 0)
        )
        for t in progress.tables()
    ]


class Observability:
    """Health server, lag probe and control poller of one daemon process."""

    def __init__(
        self,
        settings: Settings,
        *,
        state: health.HealthState | None = None,
        probe_targets: list[ProbeTarget] | None = None,
        poll_interval: float = 1.0,
        progress: Progress | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.settings = settings
        self.health = state or health.state
        self.probe_targets = probe_targets
        self.poll_interval = poll_interval
        #: Passed to run_snapshot: live counters for the metrics, a pace ``throttle`` changes.
        self.progress = progress or Progress("auto")
        self.limiter = limiter or RateLimiter()
        self.server: health.HealthServer | None = None
        self.probe: LagProbe | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._pause_reason: str | None = None
        self._pause_generation = 0
        self._seen_generation: dict[str, int] = {}  # streaming direction → pause seen
        self._seen = threading.Condition(self._lock)
        self._snapshot_running = False
        self._last_poll_error: str | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> Observability:
        """Serve the endpoints (the bound URL is logged), start the probe and the poller."""
        self.server = health.start(self.settings, self.health)  # logs the bound URL
        self.probe = _LiveSnapshotProbe(
            self.settings, self.progress, targets=self.probe_targets, health=self.health
        ).start()
        self._restore_control()
        self._poller = threading.Thread(target=self._poll_loop, name="cdcsync-control", daemon=True)
        self._poller.start()
        return self

    def follow(self, direction: str) -> None:
        """Probe the direction the daemon applies now; the other one is not checked."""
        from cdcsync.adapters.lag_probe import forward_target, reverse_target

        target = forward_target if direction == "forward" else reverse_target
        if self.probe is not None:
            self.probe.targets = [target(self.settings)]
        self.health.forget_direction("reverse" if direction == "forward" else "forward")

    @property
    def url(self) -> str | None:
        return None if self.server is None else self.server.url

    def close(self) -> None:
        """Stop the poller, the probe and the server (idempotent)."""
        self._stop.set()
        with self._seen:
            self._seen.notify_all()
        if self._poller is not None:
            self._poller.join(timeout=PAUSE_CONFIRM_SECONDS + 10)
            self._poller = None
        if self.probe is not None:
            self.probe.stop()
            self.probe = None
        if self.server is not None:
            self.server.close()
            self.server = None
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def __enter__(self) -> Observability:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ snapshot phase
    @contextmanager
    def snapshot_phase(self, beat_interval: float = 1.0) -> Iterator[None]:
        """While the snapshot runs in this thread: keep /livez fresh, publish live progress.

        The snapshot call blocks for as long as the copy takes (hours for big databases),
        so a ticker beats for it; its own statement and lock timeouts bound a stuck copy.
        """
        done = threading.Event()

        def tick() -> None:
            while not done.wait(beat_interval):
                self.health.heartbeat()
                tables = snapshot_tables(self.progress)
                if tables:
                    metrics.set_snapshot_progress(tables)

        with self._lock:
            self._snapshot_running = True
        ticker = threading.Thread(target=tick, name="cdcsync-snapshot-beat", daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join(timeout=5)
            with self._lock:
                self._snapshot_running = False
            tables = snapshot_tables(self.progress)
            if tables:
                metrics.set_snapshot_progress(tables)
            self.health.heartbeat()

    # ------------------------------------------------------------ what a StreamLoop calls
    def stream_started(self, direction: str, tables: Iterable[TableId] | None) -> None:
        """A loop of ``direction`` starts: its tables become the allowed label values."""
        d = metrics.direction_label(direction)
        if tables is not None:
            metrics.declare_tables(d, tables)
        # A halt stays reported until a batch commits: a retry that halts again at the
        # same event must not make /readyz flap.
        with self._seen:
            self._seen_generation[d] = -1
        self.health.heartbeat()

    def stream_stopped(self, direction: str) -> None:
        """The loop ended (stopped or halted): a pause no longer waits for it."""
        with self._seen:
            self._seen_generation.pop(direction, None)
            self._seen.notify_all()

    def heartbeat(self) -> None:
        """The loop turned (also while paused or idle): /livez stays fresh."""
        self.health.heartbeat()

    def batch_applied(
        self,
        direction: str,
        events: Sequence[Event],
        seconds: float,
        nbytes: int = 0,
        *,
        messages: int | None = None,
    ) -> None:
        """A batch committed with its offsets: counts, latency, applied source position."""
        metrics.record_batch(direction, events, seconds, nbytes, messages=messages)
        self.health.clear_halted(metrics.direction_label(direction))

    def halted(self, direction: str, reason: str, partitions: int = 1) -> None:
        """The loop stopped at an event it cannot apply: /readyz says so, metrics count it."""
        metrics.record_error(halt_kind(reason))
        self.health.set_halted(direction, reason, partitions)

    def dead_lettered(self, direction: str, table: TableId | None, kind: str = "decode") -> None:
        """An event went to the dead-letter topic instead of being applied."""
        metrics.record_dead_letter(direction, table)
        metrics.record_error(kind)

    def paused(self, direction: str | None = None) -> str | None:
        """The operator's pause reason, or None; a loop calling it between batches confirms."""
        with self._seen:
            reason = self._pause_reason
            if direction is not None and direction in self._seen_generation:
                self._seen_generation[direction] = self._pause_generation
                self._seen.notify_all()
        return reason

    # ------------------------------------------------------------ control
    def _db(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(
                self.settings.target_conninfo(),
                "target",
                autocommit=True,
                application_name="cdcsync-control",
            )
        return self._conn

    def _has_requests(self, conn: psycopg.Connection[Any]) -> bool:
        return exists(conn, TableId(self.settings.state_schema, "request"))

    def _restore_control(self) -> None:
        """Requests a crashed daemon left running go back to pending; the last state holds."""
        try:
            conn = self._db()
            if not self._has_requests(conn):
                return
            schema, mig = self.settings.state_schema, self.settings.migration_id
            reclaimed = rs.reclaim_requests(conn, mig, schema=schema)
            if reclaimed:
                log.info(
                    "%d request(s) left running by an earlier daemon are pending again", reclaimed
                )
            control = rs.control_state(conn, mig, schema=schema)
        except (psycopg.Error, CdcsyncError) as exc:
            metrics.record_error("request")
            log.warning("control state unreadable at start: %s", _short(exc))
            return
        if control.paused:
            log.warning(
                "still paused by %s: %s (cdcsync resume to continue)",
                control.paused_by,
                control.pause_reason,
            )
            self._set_pause(control.pause_reason or "paused")
        self._set_rate(control.snapshot_rows_per_second)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self.poll_once()
                self._last_poll_error = None
            except Exception as exc:  # the poller must never take the daemon down
                message = _short(exc)
                metrics.record_error("request")
                if message != self._last_poll_error:
                    log.warning("control requests: %s", message)
                self._last_poll_error = message
                if self._conn is not None:
                    with contextlib.suppress(Exception):
                        self._conn.close()
                self._conn = None

    def poll_once(self) -> int:
        """Claim and carry out pending pause/resume/throttle requests; returns how many."""
        conn = self._db()
        if not self._has_requests(conn):
            return 0
        schema, mig = self.settings.state_schema, self.settings.migration_id
        claimed = rs.poll_requests(
            conn, mig, schema=schema, kinds=[rs.PAUSE, rs.RESUME, rs.THROTTLE]
        )
        for req in claimed:
            try:
                ok, result = self._carry_out(req)
            except Exception as exc:
                metrics.record_error("request")
                ok, result = False, f"failed: {_short(exc)}"
            rs.complete_request(conn, req, ok=ok, result=result, schema=schema)
            log.info("request #%d (%s by %s): %s", req.id, req.kind, req.requested_by, result)
        return len(claimed)

    def _carry_out(self, req: rs.Request) -> tuple[bool, str]:
        if req.kind == rs.PAUSE:
            reason = str(req.args.get("reason") or "paused")
            generation = self._set_pause(reason)
            return True, self._await_pause(generation, reason)
        if req.kind == rs.RESUME:
            with self._lock:
                was = self._pause_reason
            self._set_pause(None)
            return True, "resumed" if was is not None else "was not paused"
        if req.kind == rs.THROTTLE:
            rate = req.args.get("snapshot_rows_per_second")
            value = float(rate) if rate else None
            self._set_rate(value)
            with self._lock:
                running = self._snapshot_running
            shown = f"{value:g} rows/s" if value else "unlimited"
            return True, f"snapshot rate limit {shown}" + (
                "" if running else " (no snapshot copy running now)"
            )
        return False, f"unknown request kind {req.kind!r}"

    def _set_pause(self, reason: str | None) -> int:
        with self._seen:
            self._pause_reason = reason
            self._pause_generation += 1
            generation = self._pause_generation
        self.health.set_paused(reason)
        return generation

    def _await_pause(self, generation: int, reason: str) -> str:
        """Wait until every streaming loop has seen the pause between two batches."""
        deadline = time.monotonic() + PAUSE_CONFIRM_SECONDS
        with self._seen:
            while True:
                waiting = sorted(d for d, g in self._seen_generation.items() if g < generation)
                if not waiting or self._stop.is_set():
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._seen.wait(min(left, 0.5))
            streaming = sorted(self._seen_generation)
        if waiting:
            return (
                f"paused ({reason}); {', '.join(waiting)} not confirmed within "
                f"{PAUSE_CONFIRM_SECONDS:g}s (a batch in flight stops at its end)"
            )
        if not streaming:
            return f"paused ({reason}); no applier is streaming yet, it starts paused"
        return f"paused ({reason}); {', '.join(streaming)} applier stopped after its last batch"

    def _set_rate(self, rows_per_second: float | None) -> None:
        self.limiter.set_limits(
            bytes_per_second=self.limiter.bytes_per_second, rows_per_second=rows_per_second
        )
        metrics.set_snapshot_rate_limit(rows_per_second)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
