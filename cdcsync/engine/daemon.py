"""The daemon's supervisor: runs whichever stream the migration's state calls for.

Before cutover that is the forward stream (source → target); after it the reverse one
(target → old source); during a switch's hand-over neither (:func:`switchover.applying`
decides). The cutover and rollback commands change the state; this loop notices and
stops one stream before it starts the other, so a process never applies both
directions at once. A stream that halts is recorded in the migration state (cutover
preflight refuses while one is) and retried from its stored offsets every
``apply.halt_retry_seconds``: the process stays up, /readyz says why it is not ready, and
streaming goes on by itself once the operator has fixed the cause. The one exception is
a replication slot lost behind the daemon's back (:mod:`cdcsync.engine.slot_watch`): that
halt stays, since nothing short of a new snapshot closes the hole.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from confluent_kafka import KafkaException
from psycopg import sql
from psycopg.types.json import Jsonb

from cdcsync.adapters.pg import connect
from cdcsync.config import Settings
from cdcsync.core import switchover as sw
from cdcsync.core.events import TableId
from cdcsync.engine import switch
from cdcsync.engine.slot_watch import SlotWatch
from cdcsync.engine.stream import Endpoint
from cdcsync.errors import HaltedError, PreconditionError

log = logging.getLogger("cdcsync.daemon")

LoopFactory = Callable[[Endpoint, threading.Event], Callable[[], int]]


def endpoint(settings: Settings, direction: sw.Direction, tables: list[TableId]) -> Endpoint:
    """Where ``direction``'s events come from and which database they go to."""
    if direction == "forward":
        return Endpoint(
            "forward",
            settings.topic_prefix,
            settings.target_conninfo(),
            settings.source_conninfo(),
            set(tables),
        )
    return Endpoint(
        "reverse",
        settings.reverse_topic_prefix,
        settings.source_conninfo(),
        settings.target_conninfo(),
        set(tables),
    )


class _Running:
    """One stream loop in a thread of its own, with the error it ended on."""

    def __init__(self, direction: sw.Direction, body: Callable[[], int], stop: threading.Event):
        self.direction = direction
        self.stop = stop
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._main, args=(body,), name=f"stream-{direction}")
        self.thread.daemon = True
        self.thread.start()

    def _main(self, body: Callable[[], int]) -> None:
        try:
            body()
        except BaseException as exc:  # handed to the supervisor, which decides
            self.error = exc

    def healthy_for(self) -> float:
        """Seconds this stream has run without ending on an error."""
        return 0.0 if self.error is not None else time.monotonic() - self.started

    def end(self, timeout: float = 120.0) -> None:
        self.stop.set()
        self.thread.join(timeout)


class Supervisor:
    """Polls the migration state and keeps the right stream running."""

    def __init__(
        self,
        settings: Settings,
        make_loop: LoopFactory,
        *,
        stop: threading.Event | None = None,
        poll: float = 0.25,
        heartbeat: Callable[[], None] | None = None,
        on_direction: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.make_loop = make_loop
        self.stop = stop or threading.Event()
        self.poll = poll
        self.heartbeat = heartbeat or (lambda: None)
        self.on_direction = on_direction or (lambda direction: None)
        self.running: _Running | None = None
        self._ensured: set[str] = set()
        self._retry_at = 0.0
        self.slot_watch = SlotWatch(settings)

    def run(self) -> int:
        conn: psycopg.Connection[Any] | None = None
        backoff = 1.0
        try:
            while not self.stop.is_set():
                try:
                    if conn is None or conn.closed or conn.broken:
                        conn = connect(self.settings.target_conninfo(), "target")
                    code = self._turn(conn)
                    backoff = 1.0
                except (psycopg.OperationalError, PreconditionError, KafkaException) as exc:
                    # The target restarting, Connect or Kafka unreachable (arming a stream
                    # creates topics and registers a connector): wait and try again; the
                    # stream thread halts and is retried on its own.
                    log.warning("supervisor: %s — retrying in %.0fs", _first_line(exc), backoff)
                    if conn is not None:
                        conn.close()
                    conn = None
                    self.heartbeat()
                    self.stop.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                if code is not None:
                    return code
                time.sleep(self.poll)
            return 0
        finally:
            if self.running is not None:
                self.running.end()
            if conn is not None:
                conn.close()
            self.slot_watch.close()

    def _turn(self, conn: psycopg.Connection[Any]) -> int | None:
        """One look at the state; an exit code when the daemon should end."""
        self.heartbeat()
        state, data = switch.read_state(conn, self.settings)
        if state.phase == sw.Phase.FINALIZED:
            log.info("migration %s is finalized: nothing to stream", self.settings.migration_id)
            return 0
        want = sw.applying(state)
        current = self.running
        if (
            current is not None
            and current.error is None
            and not current.thread.is_alive()
            and not current.stop.is_set()
        ):
            # Ended without an error it could hand over (stopped by nobody): retry it.
            current.error = HaltedError(f"the {current.direction} stream ended unexpectedly")
        if current is not None and current.error is not None:
            self._ended(conn, current)
            current = None
        if current is not None and current.direction != want:
            log.info("state %s: stopping the %s stream", state.phase, current.direction)
            current.end()
            if current.error is not None:
                self._ended(conn, current)
            self.running = current = None
        starting = current is None and time.monotonic() >= self._retry_at
        if self.slot_watch.lost(conn, state, data, want, force=starting) is not None:
            if current is not None:  # nothing more is applied from a stream with a hole
                current.end()
                self.running = None
            return None
        if current is not None and data.get("halted") and current.healthy_for() > 30:
            _record_halt(conn, self.settings, None)  # the retry got past the cause
        if current is None and want is not None and time.monotonic() >= self._retry_at:
            self._start(conn, want, state, data)
        return None

    def _start(
        self,
        conn: psycopg.Connection[Any],
        direction: sw.Direction,
        state: sw.State,
        data: dict[str, Any],
    ) -> None:
        tables = [TableId(str(s), str(n)) for s, n in data.get("tables", [])]
        if state.in_progress is None and direction not in self._ensured:
            # A settled migration: make sure this direction's connector streams (after a
            # restart or a worker that lost it); a switch in progress arms its own.
            stream = switch.streams(self.settings)[direction]
            point = str(
                ((data.get("streams") or {}).get(direction) or {}).get("consistent_point")
                or (_consistent_point(conn, self.settings) if direction == "forward" else "")
            )
            switch.arm_connector(self.settings, stream, tables, point)
            self._ensured.add(direction)
        log.info("starting the %s stream", direction)
        self.on_direction(direction)
        stop = threading.Event()
        body = self.make_loop(endpoint(self.settings, direction, tables), stop)
        self.running = _Running(direction, body, stop)

    def _ended(self, conn: psycopg.Connection[Any], ended: _Running) -> None:
        """A stream ended on an error: a halt is recorded and retried, the rest re-raised."""
        exc = ended.error
        assert exc is not None
        self.running = None
        if not isinstance(exc, HaltedError):
            raise exc
        retry = self.settings.apply.halt_retry_seconds
        log.error("%s stream halted: %s — retrying in %.0fs", ended.direction, exc, retry)
        _record_halt(conn, self.settings, f"{ended.direction}: {exc}")
        self._retry_at = time.monotonic() + retry


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _record_halt(conn: psycopg.Connection[Any], settings: Settings, reason: str | None) -> None:
    """Keep (or clear) the halt in the state, where cutover preflight looks for it."""
    with conn.transaction():
        conn.execute(
            sql.SQL(
                "UPDATE {}.migration SET data = CASE WHEN %s::jsonb IS NULL "
                "THEN data - 'halted' ELSE jsonb_set(data, '{{halted}}', %s::jsonb) END "
                "WHERE migration_id = %s"
            ).format(sql.Identifier(settings.state_schema)),
            (
                None if reason is None else Jsonb(reason),
                None if reason is None else Jsonb(reason),
                settings.migration_id,
            ),
        )


def _consistent_point(conn: psycopg.Connection[Any], settings: Settings) -> str:
    row = conn.execute(
        sql.SQL("SELECT consistent_point::text FROM {}.migration WHERE migration_id = %s").format(
            sql.Identifier(settings.state_schema)
        ),
        (settings.migration_id,),
    ).fetchone()
    conn.rollback()
    return str(row[0]) if row and row[0] else ""
