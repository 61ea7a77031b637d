"""The slot watchdog: a replication slot dropped behind cdcsync's back halts its stream.

Debezium reads changes through a named logical slot, and everything committed after
the slot's confirmed position exists only in the WAL that slot retains. Once the slot
is gone those changes are out of reach: Kafka's offsets and the applier's stored
offsets stay contiguous, so nothing downstream can see the hole. A slot created again
under the same name (by Debezium when its offsets were reset, or by hand) starts at
the WAL position of its creation and the changes in between are skipped silently.
Debezium 3.x refuses to stream when its stored offset is older than the slot's
``restart_lsn`` or the slot is missing (``log.position.check.enable``), but only while
its offsets survive; cdcsync does not rely on that.

So the daemon's supervisor asks :class:`SlotWatch` before it starts a stream and every
:data:`WATCH_INTERVAL_SECONDS` while one runs. Only the slot of the direction being
applied is watched, and only while the migration state says it must exist: a switch
drops the old direction's slot on purpose (``retire``, after ``commit``), ``finalize``
drops both under the switch lock. A slot seen missing counts only when, after the slot
reading, no switch holds the lock and the state read after that is the very state read
before it, so a cutover, rollback or finalize racing the check never raises a false alarm.

A lost slot is recorded in the migration state (``slot_lost``, and ``halted`` for
cutover preflight and ``/readyz``); it is sticky: the direction does not stream again
in this migration, whether or not a slot of that name reappears. The cure is a new
snapshot, with a new slot and consistent point.

Not seen: a slot dropped and created again between two checks, or while no daemon runs
(Debezium's own position check fails the connector then, as long as it has offsets).
A ``finalize`` interrupted after dropping the slots but before recording its phase
looks like a loss to a daemon still applying: running ``finalize`` again ends it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from cdcsync import health
from cdcsync.adapters.lag_probe import read_slot
from cdcsync.adapters.pg import connect
from cdcsync.config import Settings
from cdcsync.core import switchover as sw
from cdcsync.engine import switch
from cdcsync.errors import CdcsyncError

log = logging.getLogger("cdcsync.slot_watch")

#: How often a running stream's slot is looked at (one small query on its origin).
WATCH_INTERVAL_SECONDS = 2.0


# --------------------------------------------------------------------------- decisions
def slot_expected(state: sw.State) -> sw.Direction | None:
    """The direction being applied whose slot must exist now, or None.

    The applied direction's slot exists for as long as it is applied: the old
    direction's slot is dropped only after ``commit``, once :func:`sw.applying` has
    stopped naming it; the new one is created at ``prepare``, before it is armed.
    """
    if state.phase in (sw.Phase.SNAPSHOT, sw.Phase.FINALIZED):
        return None
    return sw.applying(state)


def judge(
    before: sw.State,
    after: sw.State,
    direction: sw.Direction,
    *,
    slot_exists: bool,
    switch_running: bool,
) -> bool:
    """Whether a slot reading taken between ``before`` and ``after`` proves the slot lost.

    Only a missing slot of the watched direction counts, and only when nothing that may
    drop slots on purpose ran meanwhile: the state did not change and no switch (or
    finalize) holds the lock.
    """
    if slot_exists or switch_running or before != after:
        return False
    return slot_expected(before) == direction


def lost_reason(
    direction: str, slot: str, side: str, last_confirmed: int | None, current_lsn: int | None
) -> str:
    """The halt message: which slot, where, since when, and what the operator must do."""
    seen = (
        f"last seen confirming {lsn_text(last_confirmed)}"
        if last_confirmed is not None
        else "not seen by this daemon before"
    )
    now = f"; the {side}'s WAL is at {lsn_text(current_lsn)}" if current_lsn is not None else ""
    return (
        f"replication slot {slot} on the {side} is gone ({seen}{now}): changes the {direction} "
        f"stream had not read yet cannot be read any more, and a slot created again under "
        f"that name would skip them — {direction} streaming stays halted; re-snapshot the "
        f"migration (a new slot and consistent point)"
    )


def lsn_text(lsn: int | None) -> str:
    if lsn is None:
        return "?"
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


# --------------------------------------------------------------------------- the watch
class SlotWatch:
    """Watches the applied direction's slot on behalf of the supervisor's loop."""

    def __init__(
        self,
        settings: Settings,
        *,
        interval: float = WATCH_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        state: health.HealthState | None = None,
    ) -> None:
        self.settings = settings
        self.interval = interval
        self.clock = clock
        self.health = state or health.state
        self._last_check = float("-inf")
        self._origin: dict[str, psycopg.Connection[Any]] = {}
        self._confirmed: dict[str, int] = {}  # slot → last confirmed_flush_lsn seen
        self._reported: set[str] = set()

    def lost(
        self,
        conn: psycopg.Connection[Any],
        state: sw.State,
        data: dict[str, Any],
        want: sw.Direction | None,
        *,
        force: bool = False,
    ) -> str | None:
        """Why ``want`` must not stream (its slot is lost), or None.

        ``conn`` is the supervisor's connection to the target (state schema); ``state``
        and ``data`` were read on it just before. ``force`` checks now (before a start)
        instead of at the next interval. A slot that cannot be read (its database is
        restarting) proves nothing and is looked at again later.
        """
        if want is None:
            return None
        recorded = data.get("slot_lost")
        if isinstance(recorded, dict) and recorded.get("direction") == want:
            reason = str(recorded.get("reason") or "replication slot lost")
            self._report(want, reason, first_seen=False)
            return reason
        now = self.clock()
        if not force and now - self._last_check < self.interval:
            return None
        self._last_check = now
        if slot_expected(state) != want:
            return None
        slot, side, dsn = self._slot_of(want)
        try:
            origin = self._origin_conn(side, dsn)
            reading = read_slot(origin, slot)
        except (psycopg.Error, CdcsyncError) as exc:
            log.debug("slot %s on the %s not readable now: %s", slot, side, exc)
            self._drop_origin(side)
            return None
        if reading.exists:
            if reading.confirmed_flush_lsn is not None:
                self._confirmed[slot] = reading.confirmed_flush_lsn
            return None
        # The lock first, then the state: a finalize (or switch) that dropped the slot
        # either still holds the lock, or has recorded its new state before letting go.
        running = switch_running(conn, self.settings)
        after, _data = switch.read_state(conn, self.settings)
        if not judge(state, after, want, slot_exists=False, switch_running=running):
            return None
        reason = lost_reason(
            want, slot, side, self._confirmed.get(slot), reading.current_lsn or None
        )
        record_lost(conn, self.settings, want, slot, reason)
        self._report(want, reason, first_seen=True)
        return reason

    def close(self) -> None:
        for side in list(self._origin):
            self._drop_origin(side)

    # ------------------------------------------------------------- plumbing
    def _slot_of(self, direction: sw.Direction) -> tuple[str, str, str]:
        if direction == "forward":
            return self.settings.slot_name, "source", self.settings.source_conninfo()
        return self.settings.reverse_slot_name, "target", self.settings.target_conninfo()

    def _origin_conn(self, side: str, dsn: str) -> psycopg.Connection[Any]:
        conn = self._origin.get(side)
        if conn is None or conn.closed or conn.broken:
            conn = connect(dsn, side, autocommit=True, connect_timeout=5)
            self._origin[side] = conn
        return conn

    def _drop_origin(self, side: str) -> None:
        conn = self._origin.pop(side, None)
        if conn is not None:
            conn.close()

    def _report(self, direction: str, reason: str, *, first_seen: bool) -> None:
        self.health.set_halted(direction, reason)
        if direction in self._reported:
            return
        self._reported.add(direction)
        if first_seen:
            log.error("%s stream halted: %s", direction, reason)
        else:
            log.error("%s stream stays halted (recorded earlier): %s", direction, reason)


def switch_running(conn: psycopg.Connection[Any], settings: Settings) -> bool:
    """Whether a cutover, rollback, abort or finalize holds the switch lock right now."""
    key = f"cdcsync.switch:{settings.migration_id}"
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND classid = ((hashtextextended(%s, 0) >> 32) & 4294967295)::oid "
        "AND objid = (hashtextextended(%s, 0) & 4294967295)::oid AND objsubid = 1)",
        (key, key),
    ).fetchone()
    conn.rollback()
    return bool(row and row[0])


def record_lost(
    conn: psycopg.Connection[Any], settings: Settings, direction: str, slot: str, reason: str
) -> None:
    """Keep the loss in the migration state: ``slot_lost`` (sticky) and ``halted``."""
    lost = {"direction": direction, "slot": slot, "reason": reason, "at": time.time()}
    with conn.transaction():
        conn.execute(
            sql.SQL(
                "UPDATE {}.migration SET data = coalesce(data, '{{}}'::jsonb) "
                "|| jsonb_build_object('slot_lost', %s::jsonb, 'halted', %s::jsonb) "
                "WHERE migration_id = %s"
            ).format(sql.Identifier(settings.state_schema)),
            (Jsonb(lost), Jsonb(f"{direction}: {reason}"), settings.migration_id),
        )
