"""Cutover and rollback: the steps of :mod:`cdcsync.core.switchover`, carried out.

One protocol serves both directions. A cutover moves the primary role from the source
to the target, a rollback moves it back; :class:`Route` names the databases, slots,
publications, connectors and topics of each side for the switch at hand.

Every step is idempotent and recorded in the target's state once done, under an
advisory lock held for the whole command, so a crash leaves a state that ``--resume``
finishes or (before ``commit``) ``abort`` undoes. While both sides are fenced the
switch runs against ``freeze_timeout``: when the drain or the verification does not
finish inside it, the switch aborts by itself and the old primary takes writes again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from cdcsync import metrics
from cdcsync.adapters import fence, offset_store
from cdcsync.adapters.connect_rest import ConnectClient
from cdcsync.adapters.debezium_connector import source_connector_config
from cdcsync.adapters.pg import connect
from cdcsync.adapters.state_store import ensure_schema
from cdcsync.config import Settings, redact_dsn
from cdcsync.core import switchover as sw
from cdcsync.core.events import TableId
from cdcsync.core.switchover import Kind, State, Step
from cdcsync.engine import drain as drain_mod
from cdcsync.errors import (
    AbortedSafely,
    CdcsyncError,
    LockHeld,
    PreconditionError,
    StateUnknown,
)
from cdcsync.snapshot import boundary, catalog, sequences

log = logging.getLogger("cdcsync.switch")

#: Set to a step name to SIGKILL the command right after that step is recorded (the
#: fault suite's named crash points, as Ghostferry's integration tests use them).
FAULT_ENV = "CDCSYNC_FAULT_AFTER_STEP"

VerifyLevel = Literal["none", "counts", "checksum"]


@dataclass(frozen=True)
class Stream:
    """One direction of replication: where it reads, what it creates, where it applies."""

    direction: sw.Direction
    reads: sw.Side  # the database whose WAL it streams
    applies: sw.Side  # the database it writes into (its offsets are stored there)
    connector: str
    slot: str
    publication: str
    topic_prefix: str


def streams(settings: Settings) -> dict[sw.Direction, Stream]:
    return {
        "forward": Stream(
            "forward",
            "source",
            "target",
            settings.connector_name,
            settings.slot_name,
            settings.publication_name,
            settings.topic_prefix,
        ),
        "reverse": Stream(
            "reverse",
            "target",
            "source",
            settings.reverse_connector_name,
            settings.reverse_slot_name,
            settings.reverse_publication_name,
            settings.reverse_topic_prefix,
        ),
    }


@dataclass(frozen=True)
class Route:
    """The switch at hand: which stream retires and which one it hands over to."""

    kind: Kind
    old: sw.Side
    new: sw.Side
    retiring: Stream
    arming: Stream

    @classmethod
    def of(cls, settings: Settings, kind: Kind) -> Route:
        both = streams(settings)
        if kind == Kind.CUTOVER:
            return cls(kind, "source", "target", both["forward"], both["reverse"])
        return cls(kind, "target", "source", both["reverse"], both["forward"])


@dataclass
class Options:
    """What the operator asked for (CLI options over the configuration)."""

    verify: VerifyLevel = "counts"
    freeze_timeout: float = 10.0
    max_lag: float = 30.0
    on_switch: str | None = None
    dry_run: bool = False
    resume: bool = False
    actor: str = "unknown"
    argv: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    """What a switch did: per-step seconds, the freeze, the positions that prove it."""

    kind: str
    migration_id: str
    result: str = "running"
    steps: dict[str, float] = field(default_factory=dict)
    freeze_seconds: float | None = None
    positions: dict[str, str] = field(default_factory=dict)
    gates: list[dict[str, Any]] = field(default_factory=list)
    verification: dict[str, Any] | None = None
    drain: dict[str, Any] | None = None
    sequences: int | None = None
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "migration_id": self.migration_id,
            "result": self.result,
            "steps": {k: round(v, 4) for k, v in self.steps.items()},
            "freeze_seconds": None
            if self.freeze_seconds is None
            else round(self.freeze_seconds, 4),
            "positions": self.positions,
            "gates": self.gates,
            "verification": self.verification,
            "drain": self.drain,
            "sequences": self.sequences,
            "message": self.message,
        }


def lsn_text(lsn: int | None) -> str:
    return "" if lsn is None else f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


# ------------------------------------------------------------------ state store
def read_state(conn: psycopg.Connection[Any], settings: Settings) -> tuple[State, dict[str, Any]]:
    """The migration's switch state and its data; a migration must exist."""
    row = conn.execute(
        sql.SQL("SELECT phase, data FROM {}.migration WHERE migration_id = %s").format(
            sql.Identifier(settings.state_schema)
        ),
        (settings.migration_id,),
    ).fetchone()
    conn.rollback()
    if row is None:
        raise PreconditionError(
            f"migration {settings.migration_id} has no state on the target: run cdcsync snapshot"
        )
    data = dict(row[1] or {})
    try:
        state = sw.parse(str(row[0]), data.get("switch"))
    except sw.InvalidTransition as exc:
        raise StateUnknown(f"migration state unreadable: {exc}") from None
    return state, data


def write_state(
    conn: psycopg.Connection[Any],
    settings: Settings,
    state: State,
    extra: dict[str, Any] | None = None,
    *,
    durable: bool = True,
) -> None:
    """Persist phase and switch record (and any other data keys) in one transaction.

    ``durable=False`` skips the WAL flush: for the records of steps a resume may simply
    run again (each is idempotent), never for ``commit``, which moves the primary.
    """
    switch = sw.dump(state)
    payload: dict[str, Any] = dict(extra or {})
    with conn.transaction():
        if not durable:
            conn.execute("SET LOCAL synchronous_commit = off")
        current = conn.execute(
            sql.SQL("SELECT data FROM {}.migration WHERE migration_id = %s FOR UPDATE").format(
                sql.Identifier(settings.state_schema)
            ),
            (settings.migration_id,),
        ).fetchone()
        data = dict(current[0] or {}) if current else {}
        if switch is None:
            data.pop("switch", None)
        else:
            data["switch"] = {**dict(data.get("switch") or {}), **switch}
        data.update(payload)
        conn.execute(
            sql.SQL(
                "UPDATE {}.migration SET phase = %s, data = %s, updated_at = now() "
                "WHERE migration_id = %s"
            ).format(sql.Identifier(settings.state_schema)),
            (str(state.phase), Jsonb(data), settings.migration_id),
        )


def audit(
    conn: psycopg.Connection[Any],
    settings: Settings,
    actor: str,
    command: str,
    args: dict[str, Any],
    result: str,
    detail: dict[str, Any] | None = None,
) -> None:
    with conn.transaction():
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (migration_id, actor, command, args, result, detail) "
                "VALUES (%s, %s, %s, %s, %s, %s)"
            ).format(sql.Identifier(settings.state_schema, "audit")),
            (settings.migration_id, actor, command, Jsonb(args), result, Jsonb(detail or {})),
        )


@contextlib.contextmanager
def switch_lock(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    """The advisory lock that lets one cutover, rollback, abort or finalize run at a time."""
    conn = connect(settings.target_conninfo(), "target", autocommit=True)
    try:
        key = f"cdcsync.switch:{settings.migration_id}"
        row = conn.execute(
            "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (key,)
        ).fetchone()
        if not row or not row[0]:
            holder = conn.execute(
                "SELECT a.pid, a.application_name, a.client_addr::text, a.backend_start "
                "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND l.granted AND l.objid = "
                "(hashtextextended(%s, 0) & 4294967295)::oid LIMIT 1",
                (key,),
            ).fetchone()
            who = f" (backend {holder[0]}, since {holder[3]})" if holder else ""
            raise LockHeld(
                f"another cutover, rollback, abort or finalize of {settings.migration_id} "
                f"is running{who}"
            )
        yield conn
    finally:
        conn.close()


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM interrupts like Ctrl-C, so a switch stopped before commit is undone."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        del signum, frame
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------ the switch
class Switcher:
    """Runs one cutover or rollback from its recorded state to the end."""

    def __init__(
        self,
        settings: Settings,
        kind: Kind,
        options: Options,
        *,
        say: Callable[[str], None] = lambda line: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.kind = kind
        self.options = options
        self.route = Route.of(settings, kind)
        self.say = say
        self.clock = clock
        self.report = Report(str(kind), settings.migration_id)
        self.dsn: dict[sw.Side, str] = {
            "source": settings.source_conninfo(),
            "target": settings.target_conninfo(),
        }
        self.connect_client = ConnectClient(settings.connect_url)
        self.tables: list[TableId] = []
        self.data: dict[str, Any] = {}
        self.freeze_started: float | None = None
        self._conns: dict[str, psycopg.Connection[Any]] = {}
        self._offsets: Any = None

    # ------------------------------------------------------------- plumbing
    def db(self, side: sw.Side) -> psycopg.Connection[Any]:
        conn = self._conns.get(side)
        if conn is None or conn.closed:
            conn = connect(self.dsn[side], side, autocommit=True)
            conn.execute("SET application_name = 'cdcsync-switch'")
            self._conns[side] = conn
        return conn

    def close(self) -> None:
        for conn in self._conns.values():
            with contextlib.suppress(Exception):
                conn.close()
        if self._offsets is not None:
            with contextlib.suppress(Exception):
                self._offsets.close()

    def offsets_consumer(self) -> Any:
        """One watermark reader for every drain of this command (connected before the freeze)."""
        if self._offsets is None:
            self._offsets = drain_mod.offsets_consumer(self.settings.kafka_bootstrap)
        return self._offsets

    def _state_conn(self) -> psycopg.Connection[Any]:
        conn = self._conns.get("state")
        if conn is None or conn.closed:
            conn = connect(self.dsn["target"], "target")
            self._conns["state"] = conn
        return conn

    def named(self, side: sw.Side) -> list[TableId]:
        """The migrated tables as ``side`` names them (the plan may rename them on the target)."""
        return named_on(self.settings, side, self.tables)

    def budget_left(self) -> float:
        if self.freeze_started is None:
            return self.options.freeze_timeout
        return self.options.freeze_timeout - (self.clock() - self.freeze_started)

    # ---------------------------------------------------------------- run
    def run(self) -> Report:
        with switch_lock(self.settings), _interruptible():
            try:
                return self._run()
            finally:
                self.close()

    def _run(self) -> Report:
        conn = self._state_conn()
        state, self.data = read_state(conn, self.settings)
        self.tables = [TableId(str(s), str(n)) for s, n in self.data.get("tables", [])]
        if not self.tables:
            raise PreconditionError(f"migration {self.settings.migration_id} records no tables")
        try:
            state = sw.begin(state, self.kind, resume=self.options.resume)
        except sw.InvalidTransition as exc:
            raise PreconditionError(str(exc)) from None
        if self.options.dry_run:
            return self._dry_run(state)
        audit(conn, self.settings, self.options.actor, str(self.kind), self.options.argv, "started")
        if not self.options.resume:
            write_state(conn, self.settings, state, {"switch_log": {}})
        else:
            self.freeze_started = self.clock() if sw.writable(state) == frozenset() else None
        try:
            state = self._steps(state)
        except CdcsyncError as exc:
            self.report.result = "failed"
            self.report.message = str(exc)
            audit(
                conn,
                self.settings,
                self.options.actor,
                str(self.kind),
                self.options.argv,
                type(exc).__name__,
                self.report.as_dict(),
            )
            raise
        self.report.result = "done"
        audit(
            conn,
            self.settings,
            self.options.actor,
            str(self.kind),
            self.options.argv,
            "done",
            self.report.as_dict(),
        )
        return self.report

    def _steps(self, state: State) -> State:
        conn = self._state_conn()
        while True:
            current = state.in_progress
            if current is None:
                return state
            step = current.next_step()
            assert step is not None
            started = self.clock()
            self.say(f"{self.kind} {step} …")
            try:
                extra = self._do(step) or {}
            except (Exception, KeyboardInterrupt) as exc:  # Ctrl-C or SIGTERM aborts too
                if step == Step.PREFLIGHT:
                    write_state(conn, self.settings, sw.abort(state))  # nothing was changed
                elif not current.committed and step != Step.COMMIT:
                    self._abort_after_failure(state, step, exc)
                raise
            self.data.update(extra)
            seconds = self.clock() - started
            self.report.steps[str(step)] = seconds
            state = sw.complete(state, step)
            log_entry = dict(self.data.get("switch_log") or {})
            log_entry[str(step)] = round(seconds, 4)
            self.data["switch_log"] = log_entry
            write_state(
                conn,
                self.settings,
                state,
                {"switch_log": log_entry, **extra},
                durable=step not in sw.FROZEN_STEPS,  # inside the freeze every ms counts
            )
            self.say(f"{self.kind} {step} done in {seconds * 1000:.0f} ms")
            if step in sw.FROZEN_STEPS and self.budget_left() < 0:
                exc2 = AbortedSafely(
                    f"{self.kind}: the freeze passed its budget of "
                    f"{self.options.freeze_timeout:.1f}s after step {step}"
                )
                self._abort_after_failure(state, step, exc2)
                raise exc2
            if os.environ.get(FAULT_ENV) == str(step):
                log.warning("fault injection: killing the process after %s", step)
                os.kill(os.getpid(), signal.SIGKILL)

    def _abort_after_failure(self, state: State, step: Step, exc: BaseException) -> None:
        """Undo a switch that failed before commit; if even that fails, page someone."""
        log.error("%s failed at %s: %s — aborting", self.kind, step, exc)
        try:
            undo(self.settings, self.route, self.db, self.tables)
            write_state(self._state_conn(), self.settings, sw.abort(state))
        except Exception as undo_exc:
            raise StateUnknown(
                f"{self.kind} failed at {step} ({exc}) and undoing it failed too ({undo_exc}): "
                f"check the fences on {self.route.old} and {self.route.new}, then run "
                "`cdcsync abort`"
            ) from undo_exc
        if isinstance(exc, AbortedSafely):
            return
        raise AbortedSafely(
            f"{self.kind} failed at step {step}: {exc}; aborted: the {self.route.old} takes "
            "writes again and streaming goes on"
        ) from exc

    # --------------------------------------------------------------- steps
    def _do(self, step: Step) -> dict[str, Any] | None:
        handler = getattr(self, f"step_{step}")
        result: dict[str, Any] | None = handler()
        return result

    def step_preflight(self) -> dict[str, Any] | None:
        gates = self.gates()
        self.report.gates = [g.as_dict() for g in gates]
        for warning in (g for g in gates if not g.ok and not g.blocking):
            self.say(f"warning: {warning.name}: {warning.detail}")
            log.warning("%s preflight: %s: %s", self.kind, warning.name, warning.detail)
        failed = [g for g in gates if not g.ok and g.blocking]
        if failed:
            raise PreconditionError(
                f"{self.kind} preflight failed: "
                + "; ".join(f"{g.name}: {g.detail}" for g in failed)
            )
        return None

    def step_freeze(self) -> dict[str, Any] | None:
        self.freeze_started = self.clock()
        frozen_at = time.time()
        pool = self.settings.pgbouncer
        if pool is not None:
            from cdcsync.adapters.pgbouncer import PgbouncerAdmin

            admin = PgbouncerAdmin(pool.admin_dsn)
            try:
                admin.pause(pool.database)
            finally:
                admin.close()
        fence.install(
            self.db(self.route.old),
            self.tables,
            self.settings.migration_id,
            schema=self.settings.state_schema,
            lock_timeout_ms=self.settings.cutover.lock_timeout_ms,
            attempts=self.settings.cutover.fence_attempts,
        )
        return {"frozen_at": frozen_at}

    def _drain(
        self, stream: Stream, target: psycopg.Connection[Any], timeout: float
    ) -> drain_mod.DrainResult:
        """Prove every change committed on ``stream``'s origin so far is applied."""
        return drain_mod.drain(
            source=self.db(stream.reads),
            target=target,
            connect=self.connect_client,
            connector=stream.connector,
            bootstrap=self.settings.kafka_bootstrap,
            topic_prefix=stream.topic_prefix,
            migration_id=self.settings.migration_id,
            state_schema=self.settings.state_schema,
            direction=stream.direction,
            timeout=timeout,
            poll=0.02,
            consumer=self.offsets_consumer(),
        )

    def step_drain(self) -> dict[str, Any] | None:
        stream = self.route.retiring
        target = connect(self.dsn[stream.applies], stream.applies)
        try:
            result = self._drain(stream, target, max(0.5, self.budget_left()))
        finally:
            target.close()
        self.report.positions["marker_lsn"] = lsn_text(result.marker_lsn)
        self.report.positions["connector_lsn"] = lsn_text(result.connector_lsn)
        self.report.drain = {
            "marker_lsn": lsn_text(result.marker_lsn),
            "connector_lsn": lsn_text(result.connector_lsn),
            "seconds_to_kafka": round(result.seconds_to_kafka, 4),
            "seconds_to_target": round(result.seconds_to_target, 4),
            "partitions": len(result.end_offsets),
        }
        return {"drain": self.report.drain}

    def step_verify(self) -> dict[str, Any] | None:
        level = self.options.verify
        if level == "none":
            self.report.verification = {"level": "none"}
            return {"verification": {"level": "none", "at": time.time()}}
        from cdcsync.engine.verify import under_plan

        # Under a plan the source is compared as the plan maps it onto the target, in
        # either direction; once the target has been the primary (a rollback, a second
        # cutover) in reverse mode (see cdcsync.core.verify_plan).
        plan, reverse = under_plan(self.settings)
        reverse = reverse or self.kind == Kind.ROLLBACK
        mapped = plan is not None and (plan.maps_columns or bool(plan.filters()))
        if level == "counts" and not (plan is not None and plan.filters()):
            summary = count_sides(self.db("source"), self.db("target"), self.tables, plan)
        else:
            summary = verify_sides(
                self.dsn["source"],
                self.dsn["target"],
                self.tables,
                level,
                self.settings.state_schema,
                plan=plan if mapped else None,
                reverse=reverse,
            )
        self.report.verification = summary
        if summary["mismatches"]:
            raise AbortedSafely(
                f"verification ({level}) found differences under the freeze: "
                + ", ".join(f"{t}: {n}" for t, n in summary["mismatches"].items())
            )
        return {"verification": {**summary, "at": time.time()}}

    def step_sequences(self) -> dict[str, Any] | None:
        schemas = sorted({t.schema for t in self.named(self.route.old)})
        old = self.db(self.route.old)
        values = sequences.read(old, catalog.sequences(old, schemas))
        if self.settings.plan:
            from cdcsync.core import plan as plan_mod

            # Owned sequences of a table the plan moves into another schema moved with it.
            moved = plan_mod.load(self.settings.plan).sequence_names(
                sequence_owners(old, [v.sequence for v in values]),
                from_target=self.route.old == "target",
            )
            values = [
                sequences.SequenceValue(
                    moved.get(v.sequence, v.sequence), v.last_value, v.is_called
                )
                for v in values
            ]
        new = connect(self.dsn[self.route.new], self.route.new)
        try:
            done = sequences.write(new, values)
        finally:
            new.close()
        self.report.sequences = done
        return {"sequences_synced": done}

    def step_prepare(self) -> dict[str, Any] | None:
        stream = self.route.arming
        conn = self.db(stream.reads)
        exists = conn.execute(
            "SELECT 1 FROM pg_publication WHERE pubname = %s", (stream.publication,)
        ).fetchone()
        if not exists:
            boundary.create_publication(
                conn, stream.publication, _with_kind(conn, self.named(stream.reads))
            )
        info = boundary.slot_info(conn, stream.slot)
        if info is None:
            row = conn.execute(
                "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')",
                (stream.slot,),
            ).fetchone()
            assert row is not None
            point = str(row[0])
        else:
            point = str(info.confirmed_flush_lsn or "")
        self.report.positions["new_slot_lsn"] = point
        return {"armed": {"direction": stream.direction, "slot": stream.slot, "lsn": point}}

    def step_commit(self) -> dict[str, Any] | None:
        return {"primary": self.route.new}

    def step_unfreeze(self) -> dict[str, Any] | None:
        fence.remove(self.db(self.route.new), self.tables, schema=self.settings.state_schema)
        pool = self.settings.pgbouncer
        if pool is not None:
            from cdcsync.adapters.pgbouncer import PgbouncerAdmin, backend_of

            admin = PgbouncerAdmin(pool.admin_dsn)
            try:
                admin.switch(
                    pool.database, pool.databases_file, backend_of(self.dsn[self.route.new])
                )
                admin.resume(pool.database)
            finally:
                admin.close()
        frozen_at = self.data.get("frozen_at")
        if self.options.resume and isinstance(frozen_at, int | float):
            # The freeze began before the crash: count it from there, not from the resume.
            self.report.freeze_seconds = time.time() - float(frozen_at)
        elif self.freeze_started is not None:
            self.report.freeze_seconds = self.clock() - self.freeze_started
        if self.report.freeze_seconds is not None:
            metrics.record_cutover_freeze(self.report.freeze_seconds)
        return {"last_freeze_seconds": self.report.freeze_seconds, "switched_at": time.time()}

    def step_retire(self) -> dict[str, Any] | None:
        stream = self.route.retiring
        stop_connector(self.connect_client, stream.connector)
        conn = self.db(stream.reads)
        deadline = time.monotonic() + 60
        while True:
            info = boundary.slot_info(conn, stream.slot)
            if info is None or info.active_pid is None:
                break
            if time.monotonic() > deadline:
                raise PreconditionError(
                    f"slot {stream.slot} on the {stream.reads} is still in use by backend "
                    f"{info.active_pid} after its connector stopped"
                )
            time.sleep(0.1)
        boundary.drop_slot(conn, stream.slot)
        return None

    def step_arm(self) -> dict[str, Any] | None:
        stream = self.route.arming
        armed = dict(self.data.get("armed") or {})
        point = str(armed.get("lsn") or "")
        into = connect(self.dsn[stream.applies], stream.applies, autocommit=True)
        try:
            ensure_schema(into, self.settings.state_schema)
            into.autocommit = False
            skip_to_end(into, self.settings, stream)
        finally:
            into.close()
        arm_connector(self.settings, stream, self.tables, point)
        return {"streams": {stream.direction: {"slot": stream.slot, "consistent_point": point}}}

    def step_hook(self) -> dict[str, Any] | None:
        command = self.options.on_switch
        if not command:
            return None
        from cdcsync.adapters.pgbouncer import backend_of

        new = backend_of(self.dsn[self.route.new])
        env = {
            **os.environ,
            "CDCSYNC_SWITCH": str(self.kind),
            "CDCSYNC_MIGRATION_ID": self.settings.migration_id,
            "CDCSYNC_NEW_PRIMARY": self.route.new,
            "CDCSYNC_NEW_PRIMARY_HOST": new.host,
            "CDCSYNC_NEW_PRIMARY_PORT": str(new.port),
            "CDCSYNC_NEW_PRIMARY_DBNAME": new.dbname,
            "CDCSYNC_NEW_PRIMARY_DSN": redact_dsn(
                self.settings.target_dsn if self.route.new == "target" else self.settings.source_dsn
            ),
        }
        proc = subprocess.run(
            ["/bin/sh", "-c", command], env=env, capture_output=True, timeout=120, check=False
        )
        if proc.returncode != 0:
            tail = proc.stderr.decode(errors="replace")[-500:]
            raise CdcsyncError(
                f"{self.kind} is done (the {self.route.new} is the primary) but the "
                f"--on-switch command exited {proc.returncode}: {tail}"
            )
        return {"hook_rc": 0}

    def step_done(self) -> dict[str, Any] | None:
        return None

    # ------------------------------------------------------------- gates
    def _plan_gate(self) -> Gate:
        """Verification under the freeze follows the plan; refused only for what the plan's
        SQL cannot evaluate there (checked now, before anything is frozen)."""
        from cdcsync.core import plan as plan_mod
        from cdcsync.engine.verify import plan_problems
        from cdcsync.engine.verify_store import target_has_been_primary

        plan = plan_mod.load(self.settings.plan) if self.settings.plan else plan_mod.EMPTY
        mapped = plan.maps_columns or bool(plan.filters())
        if not mapped:
            return Gate("plan", True, "no column mapping or row filter")
        if self.options.verify == "none":
            return Gate(
                "plan", True, "mapped tables: no verification at the switch (--verify none)"
            )
        reverse = self.kind == Kind.ROLLBACK or target_has_been_primary(
            self.db("target"), self.settings.state_schema, self.settings.migration_id
        )
        problems = plan_problems(
            self.db("source"), self.db("target"), plan, self.tables, reverse=reverse
        )
        return Gate(
            "plan",
            not problems,
            "; ".join(problems[:5]) + ("; use --verify none" if problems else "")
            if problems
            else "verification at the switch compares the tables as the plan maps them",
        )

    def gates(self) -> list[Gate]:
        out: list[Gate] = []
        stream = self.route.retiring
        state = self.connect_client.state(stream.connector)
        out.append(Gate("connector", state == "RUNNING", f"{stream.connector} is {state}"))
        halted = self.data.get("halted")
        out.append(
            Gate(
                "applier",
                not halted,
                f"halted: {halted}" if halted else "no halted partition recorded",
            )
        )
        out.append(self._lag_gate(stream))
        out.append(self._plan_gate())
        out.append(self._catch_up_gate(stream))
        out.append(self._dead_letter_gate(stream))
        new = self.db(self.route.new)
        unfenced = fence.check(new, self.tables, schema=self.settings.state_schema)
        out.append(
            Gate(
                "new primary fenced",
                not unfenced,
                (
                    f"the {self.route.new} lacks its write fence on "
                    + ", ".join(str(t) for t in unfenced[:10])
                    + ": something may have written there outside cdcsync; run "
                    "`cdcsync verify --level checksum` and re-snapshot if it differs"
                )
                if unfenced
                else f"every migrated table on the {self.route.new} is fenced",
            )
        )
        out.extend(self._reverse_path_gates())
        if self.kind == Kind.CUTOVER:
            out.append(self._backup_gate())
        return out

    def _backup_gate(self) -> Gate:
        """A warning, not a refusal: a verified backup newer than the snapshot exists."""
        backup = self.data.get("backup") or {}
        conn = self._state_conn()
        row = conn.execute(
            sql.SQL(
                "SELECT extract(epoch FROM created_at) FROM {}.migration WHERE migration_id = %s"
            ).format(sql.Identifier(self.settings.state_schema)),
            (self.settings.migration_id,),
        ).fetchone()
        conn.rollback()
        since = float(row[0]) if row and row[0] is not None else 0.0
        at = backup.get("at")
        ok = bool(backup.get("verified")) and isinstance(at, int | float) and float(at) >= since
        detail = (
            f"verified backup at {backup.get('location')}"
            if ok
            else "no verified backup newer than the snapshot: run `cdcsync backup` first"
        )
        return Gate("backup", ok, detail, blocking=False)

    def _lag_gate(self, stream: Stream) -> Gate:
        into = connect(self.dsn[stream.applies], stream.applies)
        try:
            stored = offset_store.load(
                into, self.settings.state_schema, self.settings.migration_id, stream.direction
            )
            into.rollback()
        finally:
            into.close()
        ends = drain_mod.end_offsets(
            self.settings.kafka_bootstrap, stream.topic_prefix, consumer=self.offsets_consumer()
        )
        behind = drain_mod.lagging(ends, stored)
        events = sum(behind.values())
        lag = oldest_unapplied_age(
            self.settings.kafka_bootstrap, {tp: stored.get(tp, 0) for tp in behind}
        )
        return Gate(
            "lag",
            lag <= self.options.max_lag,
            f"{events} event(s) behind, the oldest {lag:.1f}s old "
            f"(limit {self.options.max_lag:.1f}s)",
        )

    def _catch_up_gate(self, stream: Stream) -> Gate:
        """Drains before the freeze, until one is quick enough to fit the freeze budget.

        Each writes one logical message on the old primary (no table changes) and waits
        until the whole chain, source WAL to applied rows, is past it. A drain that takes
        longer than half of ``freeze_timeout`` means the chain lags under the current load:
        the freeze would last about as long, so the switch keeps waiting (up to
        ``max_lag``) and then refuses instead of freezing and aborting.
        """
        quick = self.options.freeze_timeout / 2
        deadline = time.monotonic() + max(1.0, self.options.max_lag)
        took: list[float] = []
        target = connect(self.dsn[stream.applies], stream.applies)
        try:
            while True:
                left = deadline - time.monotonic()
                started = time.monotonic()
                try:
                    self._drain(stream, target, max(0.5, left))
                except AbortedSafely as exc:
                    return Gate("caught up", False, f"{exc} (limit --max-lag)")
                took.append(time.monotonic() - started)
                if took[-1] <= quick:
                    shown = ", ".join(f"{t:.2f}s" for t in took)
                    return Gate("caught up", True, f"a marker went through the chain in {shown}")
                if time.monotonic() >= deadline:
                    return Gate(
                        "caught up",
                        False,
                        f"the chain needs {took[-1]:.1f}s to drain under the current load, more "
                        f"than half the {self.options.freeze_timeout:.1f}s freeze budget; "
                        "waited --max-lag for it to catch up",
                    )
        finally:
            target.close()

    def _dead_letter_gate(self, stream: Stream) -> Gate:
        topic = self.settings.apply.dead_letter_topic or f"{stream.topic_prefix}-dlq"
        count = topic_size(self.settings.kafka_bootstrap, topic)
        acked = int((self.data.get("dead_letters_acknowledged") or {}).get(topic, 0))
        return Gate(
            "dead letters",
            count <= acked,
            f"{count} in {topic}, {acked} acknowledged"
            + ("" if count <= acked else " (run with --ack-dead-letters once handled)"),
        )

    def _reverse_path_gates(self) -> list[Gate]:
        stream = self.route.arming
        conn = self.db(stream.reads)
        level = conn.execute("SHOW wal_level").fetchone()
        out = [
            Gate(
                "reverse path",
                bool(level and level[0] == "logical"),
                f"wal_level on the {stream.reads} is {level[0] if level else '?'}"
                + ("" if level and level[0] == "logical" else " (needs logical)"),
            )
        ]
        row = conn.execute(
            "SELECT (SELECT count(*) FROM pg_replication_slots), "
            "current_setting('max_replication_slots')::int, "
            "(SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)"
        ).fetchone()
        assert row is not None
        used, limit, may = int(row[0]), int(row[1]), bool(row[2])
        own = boundary.slot_info(conn, stream.slot)
        out.append(
            Gate(
                "reverse slot",
                (used < limit or own is not None) and (own is None or own.active_pid is None),
                f"{used}/{limit} slots used on the {stream.reads}"
                + (f"; {stream.slot} exists and is in use" if own and own.active_pid else ""),
            )
        )
        out.append(
            Gate(
                "replication privilege",
                may,
                f"the {stream.reads} user "
                + ("may replicate" if may else "lacks REPLICATION: ALTER ROLE … REPLICATION"),
            )
        )
        return out

    def _dry_run(self, state: State) -> Report:
        gates = self.gates()
        self.report.gates = [g.as_dict() for g in gates]
        current = state.in_progress
        start = current.next_step() if current else Step.PREFLIGHT
        plan = [
            f"{step}: {what}"
            for step, what in sw.describe(self.kind)
            if start is None or sw.index(step) >= sw.index(start)
        ]
        self.report.result = "dry-run"
        self.report.message = "\n".join(plan)
        if any(not g.ok and g.blocking for g in gates):
            self.report.result = "dry-run: preflight would fail"
        return self.report


@dataclass(frozen=True)
class Gate:
    name: str
    ok: bool
    detail: str
    blocking: bool = True  # a failed non-blocking gate is a warning

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "blocking": self.blocking}


# ------------------------------------------------------------------ shared pieces
def undo(
    settings: Settings,
    route: Route,
    db: Callable[[sw.Side], psycopg.Connection[Any]],
    tables: list[TableId],
) -> None:
    """Undo an uncommitted switch: new slot dropped, old primary unfenced, pool resumed."""
    new_conn = db(route.new)
    info = boundary.slot_info(new_conn, route.arming.slot)
    if info is not None and info.active_pid is None:
        boundary.drop_slot(new_conn, route.arming.slot)
    fence.remove(db(route.old), tables, schema=settings.state_schema)
    pool = settings.pgbouncer
    if pool is not None:
        from cdcsync.adapters.pgbouncer import PgbouncerAdmin

        admin = PgbouncerAdmin(pool.admin_dsn)
        try:
            with contextlib.suppress(PreconditionError):  # not paused: nothing to resume
                admin.resume(pool.database)
        finally:
            admin.close()


def stop_connector(client: ConnectClient, name: str, timeout: float = 60.0) -> None:
    """Stop a connector (it keeps its configuration; its tasks and walsender go away)."""
    status = client.status(name)
    if status is None or status["connector"]["state"] == "STOPPED":
        return
    client._call("PUT", f"/connectors/{name}/stop")
    deadline = time.monotonic() + timeout
    while True:
        status = client.status(name)
        if status is None or (status["connector"]["state"] == "STOPPED" and not status["tasks"]):
            return
        if time.monotonic() > deadline:
            raise PreconditionError(f"connector {name} did not stop within {timeout:.0f}s")
        time.sleep(0.1)


def named_on(settings: Settings, side: sw.Side, tables: list[TableId]) -> list[TableId]:
    """``tables`` (the source's names) as ``side`` names them: the plan may rename them on
    the target."""
    if side != "target" or not settings.plan:
        return tables
    from cdcsync.core import plan as plan_mod

    return plan_mod.load(settings.plan).on_target(tables)


def arm_connector(settings: Settings, stream: Stream, tables: list[TableId], point: str) -> None:
    """Register (or re-point) the connector of ``stream`` on its slot; stale offsets go.

    ``tables`` are the source's names; the connector reads them as its side names them.
    """
    side = stream.reads
    tables = named_on(settings, side, tables)
    dsn = settings.source_dsn if side == "source" else settings.target_dsn
    config = source_connector_config(
        settings,
        tables,
        dsn=dsn,
        side=side,
        topic_prefix=stream.topic_prefix,
        slot_name=stream.slot,
        publication_name=stream.publication,
    )
    conninfo = settings.source_conninfo() if side == "source" else settings.target_conninfo()
    with connect(conninfo, side, autocommit=True) as conn:
        without_key = keyless(conn, tables)
    ensure_topics(
        settings.kafka_bootstrap,
        stream.topic_prefix,
        tables,
        partitions=settings.topic_partitions,
        keyless=without_key,
    )
    ensure_connector(ConnectClient(settings.connect_url), stream.connector, config, point)


def keyless(conn: psycopg.Connection[Any], tables: list[TableId]) -> set[TableId]:
    """The tables without a primary key: Debezium sends their events with a null key."""
    rows = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) "
        "AND (n.nspname, c.relname) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
        ([t.schema for t in tables], [t.name for t in tables]),
    ).fetchall()
    return {TableId(str(s), str(n)) for s, n in rows}


def topic_names(prefix: str, tables: list[TableId]) -> list[str]:
    """The topics a connector will write: one per table, logical messages, heartbeats.

    Debezium names a table's topic ``<prefix>.<schema>.<table>`` with every character
    Kafka does not allow replaced by ``_``.
    """
    from cdcsync.core.debezium import HEARTBEAT_TOPIC_PREFIX

    names = [table_topic(prefix, t) for t in tables]
    return [*names, f"{prefix}.message", f"{HEARTBEAT_TOPIC_PREFIX}.{prefix}"]


def table_topic(prefix: str, table: TableId) -> str:
    """The topic Debezium writes ``table``'s changes to."""

    def clean(name: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]", "_", name)

    return f"{prefix}.{clean(table.schema)}.{clean(table.name)}"


def ensure_topics(
    bootstrap: str,
    prefix: str,
    tables: list[TableId],
    *,
    partitions: int = 1,
    keyless: set[TableId] | None = None,
) -> None:
    """Create a stream's topics before its connector runs.

    The applier subscribes by pattern; a topic that first appears later (the first
    logical message of a drain, a table's first change) rebalances the consumer group,
    and one landing inside a cutover's freeze would stall its drain. Table topics get
    ``partitions`` partitions — one row's history stays in one partition, since
    Debezium keys by primary key — except tables without a key: their events carry a
    null key, would be spread over partitions and applied out of order, so they get one.
    """
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    single = {table_topic(prefix, t) for t in keyless or ()}
    count = {
        table_topic(prefix, t): 1 if table_topic(prefix, t) in single else partitions
        for t in tables
    }
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = admin.list_topics(timeout=10).topics
    for topic in single & set(existing):
        if len(existing[topic].partitions) > 1:
            raise PreconditionError(
                f"Kafka topic {topic} has {len(existing[topic].partitions)} partitions, but its "
                "table has no primary key: its events (null keys) would be applied out of "
                "order; delete the topic or give the table a primary key"
            )
    wanted = [t for t in topic_names(prefix, tables) if t not in existing]
    if not wanted:
        return
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=count.get(t, 1), replication_factor=-1) for t in wanted]
    )
    for topic, future in futures.items():
        try:
            future.result(timeout=30)
        except Exception as exc:  # TOPIC_ALREADY_EXISTS from a concurrent creator is fine
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise PreconditionError(f"cannot create Kafka topic {topic}: {exc}") from exc


def ensure_connector(
    client: ConnectClient, name: str, config: dict[str, str], consistent_point: str
) -> None:
    """Register ``name``; a connector left from an earlier slot forgets its offsets first."""
    current = client.status(name)
    registered_for = None
    existing: dict[str, Any] = {}
    if current is not None:
        existing = client._call("GET", f"/connectors/{name}/config") or {}
        registered_for = existing.get("cdcsync.consistent.point")
    config = {**config, "cdcsync.consistent.point": consistent_point}
    if current is not None and registered_for != consistent_point:
        log.info("connector %s belongs to an earlier slot: resetting its offsets", name)
        client.reset_offsets(name)
    if current is None or _without_name(existing) != _without_name(config):
        # The same config again would restart the connector for nothing (several daemons
        # of one migration each make sure of it when they start).
        client.put_config(name, config)
    # A stopped connector keeps its target state across the config update; resume it,
    # and again if the worker applied the two out of order.
    deadline = time.monotonic() + 120
    while True:
        status = client.status(name)
        if status is not None and status["connector"]["state"] in ("STOPPED", "PAUSED"):
            client._call("PUT", f"/connectors/{name}/resume")
        try:
            client.wait_running(name, timeout=min(2.0, max(1.0, deadline - time.monotonic())))
            return
        except PreconditionError:
            if time.monotonic() > deadline:
                raise


def _without_name(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "name"}


def skip_to_end(conn: psycopg.Connection[Any], settings: Settings, stream: Stream) -> None:
    """Start ``stream``'s applier at the end of its topics: what is there was applied.

    A stream is armed only right after the other direction drained everything under a
    freeze, so events already in its topics (from an earlier cycle) are reflected on
    both sides; its new slot starts at the switch point.
    """
    ends = drain_mod.end_offsets(settings.kafka_bootstrap, stream.topic_prefix)
    with conn.transaction():
        for (topic, partition), high in ends.items():
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (migration_id, direction, topic, kafka_partition, next_offset) "
                    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (migration_id, direction, topic, "
                    "kafka_partition) DO UPDATE SET next_offset = greatest({}.next_offset, "
                    "EXCLUDED.next_offset), updated_at = now()"
                ).format(
                    sql.Identifier(settings.state_schema, "kafka_offset"),
                    sql.Identifier("kafka_offset"),
                ),
                (settings.migration_id, stream.direction, topic, partition, high),
            )


def oldest_unapplied_age(
    bootstrap: str, starts: dict[tuple[str, int], int], timeout: float = 5.0
) -> float:
    """Seconds since the oldest event not yet applied was written to Kafka (0 if none)."""
    if not starts:
        return 0.0
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "cdcsync-probe", "enable.auto.commit": False}
    )
    try:
        consumer.assign([TopicPartition(t, p, o) for (t, p), o in starts.items()])
        oldest: float | None = None
        pending = set(starts)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=len(pending), timeout=0.5):
                tp = (msg.topic(), msg.partition())
                if msg.error() or tp not in pending:
                    continue
                pending.discard(tp)
                _kind, stamp = msg.timestamp()
                if stamp > 0:
                    oldest = stamp / 1000.0 if oldest is None else min(oldest, stamp / 1000.0)
                consumer.pause([TopicPartition(tp[0], tp[1])])
        if pending:
            return float("inf")  # could not read what is behind: refuse rather than guess
        return 0.0 if oldest is None else max(0.0, time.time() - oldest)
    finally:
        consumer.close()


def topic_size(bootstrap: str, topic: str, timeout: float = 5.0) -> int:
    """Messages ever written to ``topic`` (0 when it does not exist)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "cdcsync-probe"})
    try:
        meta = consumer.list_topics(timeout=timeout)
        if topic not in meta.topics or meta.topics[topic].error is not None:
            return 0
        total = 0
        for partition in meta.topics[topic].partitions:
            _low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout, cached=False
            )
            total += int(high)
        return total
    finally:
        consumer.close()


def count_rows(conn: psycopg.Connection[Any], tables: list[TableId]) -> list[int]:
    """Row counts of ``tables`` in one statement: one snapshot, one round trip."""
    counts = sql.SQL(", ").join(
        sql.SQL("(SELECT count(*) FROM {})").format(sql.Identifier(t.schema, t.name))
        for t in tables
    )
    row = conn.execute(sql.SQL("SELECT ARRAY[{}]::bigint[]").format(counts)).fetchone()
    assert row is not None
    return [int(n) for n in row[0]]


def count_sides(
    old: psycopg.Connection[Any],
    new: psycopg.Connection[Any],
    tables: list[TableId],
    plan: Any = None,
) -> dict[str, Any]:
    """Counts on both sides at once (under the freeze neither side changes); tables the
    ``plan`` excludes are not counted (a row filter needs :func:`verify_sides`)."""
    from concurrent.futures import ThreadPoolExecutor

    if plan is not None:
        tables = plan.included(tables)
    there = tables if plan is None else plan.on_target(tables)  # ``new`` is the target

    with ThreadPoolExecutor(max_workers=2) as pool:
        on_old = pool.submit(count_rows, old, tables)
        on_new = pool.submit(count_rows, new, there)
        a, b = on_old.result(), on_new.result()
    return {
        "level": "counts",
        "tables": len(tables),
        "rows": sum(a),
        "mismatches": {str(t): abs(x - y) for t, x, y in zip(tables, a, b, strict=True) if x != y},
    }


def verify_sides(
    old_dsn: str,
    new_dsn: str,
    tables: list[TableId],
    level: str,
    state_schema: str,
    *,
    plan: Any = None,
    reverse: bool = False,
) -> dict[str, Any]:
    """Compare both sides at ``level``; the summary names each table that differs.

    Under ``plan`` the first DSN must be the plan's source (see ``verify_tables``).
    """
    from cdcsync.engine.verify import verify_tables

    checked = cast(Literal["counts", "checksum"], level)
    result = verify_tables(
        old_dsn, new_dsn, tables, checked, state_schema=state_schema, plan=plan, reverse=reverse
    )
    return {
        "level": level,
        "tables": len(tables),
        "rows": sum(r.source_rows or 0 for r in result.tables),
        "mismatches": {str(t): int(n) for t, n in result.mismatches.items() if n},
    }


def sequence_owners(conn: psycopg.Connection[Any], seqs: list[TableId]) -> dict[TableId, TableId]:
    """Sequence → the table owning it (serial and identity columns), for ``seqs``."""
    if not seqs:
        return {}
    rows = conn.execute(
        "SELECT sn.nspname, s.relname, tn.nspname, t.relname FROM pg_depend d "
        "JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' "
        "JOIN pg_namespace sn ON sn.oid = s.relnamespace "
        "JOIN pg_class t ON t.oid = d.refobjid JOIN pg_namespace tn ON tn.oid = t.relnamespace "
        "WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass "
        "AND d.deptype IN ('a', 'i') AND d.objid = ANY(%s::regclass[]::oid[])",
        ([catalog.qualified(s) for s in seqs],),
    ).fetchall()
    return {TableId(str(a), str(b)): TableId(str(c), str(d)) for a, b, c, d in rows}


def _with_kind(conn: psycopg.Connection[Any], tables: list[TableId]) -> list[tuple[TableId, bool]]:
    out: list[tuple[TableId, bool]] = []
    for table in tables:
        row = conn.execute(
            "SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass(%s)",
            (catalog.qualified(table),),
        ).fetchone()
        if row is None:
            raise PreconditionError(f"table {table} does not exist on this side")
        out.append((table, bool(row[0])))
    return out


# ------------------------------------------------------------------ abort / finalize
def abort_switch(settings: Settings, actor: str, argv: dict[str, Any]) -> str:
    """Undo an uncommitted cutover or rollback; returns what was undone."""
    with switch_lock(settings):
        state_conn = connect(settings.target_conninfo(), "target")
        conns: dict[str, psycopg.Connection[Any]] = {}

        def db(side: sw.Side) -> psycopg.Connection[Any]:
            if side not in conns:
                dsn = settings.source_conninfo() if side == "source" else settings.target_conninfo()
                conns[side] = connect(dsn, side, autocommit=True)
            return conns[side]

        try:
            state, data = read_state(state_conn, settings)
            try:
                new_state = sw.abort(state)
            except sw.InvalidTransition as exc:
                raise PreconditionError(str(exc)) from None
            current = state.in_progress
            assert current is not None
            tables = [TableId(str(s), str(n)) for s, n in data.get("tables", [])]
            undo(settings, Route.of(settings, current.kind), db, tables)
            write_state(state_conn, settings, new_state)
            what = (
                f"{current.kind} aborted after {current.done or 'nothing'}: the "
                f"{sw.old_primary(current.kind)} takes writes, streaming goes on"
            )
            audit(state_conn, settings, actor, "abort", argv, "done", {"undone": str(current.kind)})
            return what
        finally:
            state_conn.close()
            for conn in conns.values():
                conn.close()


def finalize_migration(settings: Settings, actor: str, argv: dict[str, Any]) -> list[str]:
    """Tear replication down after an accepted cutover; returns what was removed."""
    with switch_lock(settings):
        state_conn = connect(settings.target_conninfo(), "target")
        try:
            state, data = read_state(state_conn, settings)
            try:
                new_state = sw.finalize(state)
            except sw.InvalidTransition as exc:
                raise PreconditionError(str(exc)) from None
            tables = [TableId(str(s), str(n)) for s, n in data.get("tables", [])]
            client = ConnectClient(settings.connect_url)
            done: list[str] = []
            for stream in streams(settings).values():
                if client.status(stream.connector) is not None:
                    client.delete(stream.connector)
                    done.append(f"connector {stream.connector}")
            for stream in streams(settings).values():
                dsn = (
                    settings.source_conninfo()
                    if stream.reads == "source"
                    else settings.target_conninfo()
                )
                with connect(dsn, stream.reads, autocommit=True) as conn:
                    deadline = time.monotonic() + 60
                    while True:
                        info = boundary.slot_info(conn, stream.slot)
                        if info is None or info.active_pid is None or time.monotonic() > deadline:
                            break
                        time.sleep(0.2)
                    if boundary.slot_info(conn, stream.slot) is not None:
                        boundary.drop_slot(conn, stream.slot)
                        done.append(f"slot {stream.slot} on the {stream.reads}")
                    if conn.execute(
                        "SELECT 1 FROM pg_publication WHERE pubname = %s", (stream.publication,)
                    ).fetchone():
                        boundary.drop_publication(conn, stream.publication)
                        done.append(f"publication {stream.publication} on the {stream.reads}")
            for side, dsn in (
                ("source", settings.source_conninfo()),
                ("target", settings.target_conninfo()),
            ):
                with connect(dsn, side, autocommit=True) as conn:
                    if any(fence.fenced(conn, tables, schema=settings.state_schema).values()):
                        fence.remove(conn, tables, schema=settings.state_schema)
                        done.append(f"write fences on the {side}")
            write_state(state_conn, settings, new_state, {"finalized_at": time.time()})
            audit(state_conn, settings, actor, "finalize", argv, "done", {"removed": done})
            return done
        finally:
            state_conn.close()


def dumps(report: Report) -> str:
    return json.dumps(report.as_dict(), indent=2, sort_keys=True)


def acknowledge_dead_letters(settings: Settings, direction: sw.Direction) -> int:
    """Record the dead letters of ``direction`` so far as handled; returns their count."""
    stream = streams(settings)[direction]
    topic = settings.apply.dead_letter_topic or f"{stream.topic_prefix}-dlq"
    count = topic_size(settings.kafka_bootstrap, topic)
    with connect(settings.target_conninfo(), "target") as conn:
        _state, data = read_state(conn, settings)
        acked = dict(data.get("dead_letters_acknowledged") or {})
        acked[topic] = count
        with conn.transaction():
            conn.execute(
                sql.SQL(
                    "UPDATE {}.migration SET data = jsonb_set(data, "
                    "'{{dead_letters_acknowledged}}', %s) WHERE migration_id = %s"
                ).format(sql.Identifier(settings.state_schema)),
                (Jsonb(acked), settings.migration_id),
            )
    return count
