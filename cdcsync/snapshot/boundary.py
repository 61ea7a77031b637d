"""The consistent boundary: cdcsync's publication, then a slot exporting its snapshot.

Every row committed before the slot's consistent point is visible to a transaction
that imports the exported snapshot; every change after it is decoded from the slot.
The snapshot can be imported only while the replication connection that created it
stays open and idle, so that connection lives in a process of its own
(:mod:`cdcsync.snapshot.holder`) that does nothing else until the copy is done — and
that survives a crash of the copying process, so a re-run can finish under the same
snapshot.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from cdcsync.config import redact_dsn
from cdcsync.core.events import TableId
from cdcsync.errors import PreconditionError
from cdcsync.snapshot.holder import holder_name


@dataclass(frozen=True)
class Boundary:
    slot_name: str
    consistent_point: str
    snapshot_name: str
    holder_pid: int


@dataclass(frozen=True)
class SlotInfo:
    active_pid: int | None
    confirmed_flush_lsn: str | None
    database: str | None
    plugin: str | None


def create_publication(
    conn: psycopg.Connection[Any],
    name: str,
    tables: Iterable[tuple[TableId, bool]],
    row_filters: Mapping[TableId, str] | None = None,
) -> None:
    """cdcsync's own filtered publication; partitioned tables stream as their root.

    ``tables`` pairs each table with whether it is partitioned: plain tables are named
    with ONLY so inheritance children are not pulled in behind the operator's back.
    ``row_filters`` are the plan's (operator-written SQL): PostgreSQL then sends an
    update that moves a row into or out of the filter as an insert or a delete.
    """
    filters = row_filters or {}
    items = [
        sql.SQL("{}{}{}").format(
            sql.SQL("" if partitioned else "ONLY "),
            sql.Identifier(t.schema, t.name),
            sql.SQL(" WHERE ({})").format(sql.SQL(filters[t])) if t in filters else sql.SQL(""),
        )
        for t, partitioned in tables
    ]
    conn.execute(
        sql.SQL(
            "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)"
        ).format(sql.Identifier(name), sql.SQL(", ").join(items))
    )


def drop_publication(conn: psycopg.Connection[Any], name: str) -> None:
    conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)))


def slot_info(conn: psycopg.Connection[Any], slot: str) -> SlotInfo | None:
    row = conn.execute(
        "SELECT active_pid, confirmed_flush_lsn::text, database, plugin "
        "FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    if row is None:
        return None
    return SlotInfo(
        None if row[0] is None else int(row[0]),
        None if row[1] is None else str(row[1]),
        None if row[2] is None else str(row[2]),
        None if row[3] is None else str(row[3]),
    )


def end_holder(conn: psycopg.Connection[Any], slot: str, timeout: float = 15.0) -> None:
    """End the walsender of ``slot``'s snapshot holder, if one still runs (the slot stays).

    Its exported snapshot goes with it, which lets the source vacuum again.
    """
    deadline = time.monotonic() + timeout
    while True:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'walsender' "
            "AND application_name = %s AND datname = current_database()",
            (holder_name(slot),),
        ).fetchall()
        if not rows:
            return
        for (pid,) in rows:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        if time.monotonic() > deadline:
            raise PreconditionError(
                f"the snapshot holder of slot {slot} (backend {rows[0][0]}) does not exit: "
                "end it with pg_terminate_backend and run again"
            )
        time.sleep(0.1)


def open_transactions(conn: psycopg.Connection[Any], older_than: float) -> list[str]:
    """Sessions whose transaction (with a transaction id) began ``older_than`` s ago or more.

    These are what a new slot waits for before it can export a consistent snapshot.
    """
    rows = conn.execute(
        "SELECT pid, usename, application_name, state, "
        "extract(epoch FROM now() - xact_start)::int FROM pg_stat_activity "
        "WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() "
        "AND xact_start < now() - make_interval(secs => %s) ORDER BY xact_start",
        (older_than,),
    ).fetchall()
    return [
        f"pid {pid} ({user}, {app or 'no application_name'}, {state}, open {age} s)"
        for pid, user, app, state, age in rows
    ]


def drop_slot(conn: psycopg.Connection[Any], slot: str, timeout: float = 15.0) -> None:
    """Drop ``slot`` if it exists, ending its snapshot holder first."""
    end_holder(conn, slot, timeout)
    info = slot_info(conn, slot)
    if info is not None and info.active_pid is not None:
        raise PreconditionError(
            f"replication slot {slot} is in use by backend {info.active_pid}: stop whatever "
            "streams from it (a Debezium connector?) and run again"
        )
    conn.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    )


def import_snapshot(conn: psycopg.Connection[Any], snapshot_name: str) -> None:
    """Open a repeatable-read, read-only transaction seeing exactly the exported snapshot.

    Works on autocommit connections (an explicit BEGIN) and on ordinary ones (psycopg's
    own BEGIN, which must come from an idle connection).
    """
    if conn.autocommit:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    else:
        conn.rollback()
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
    conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name)))


def snapshot_identity(conn: psycopg.Connection[Any]) -> str:
    """``xmin:xmax:xip`` of the caller's snapshot: equal strings mean the same snapshot.

    Snapshot names are reused once their exporter is gone; comparing the identity
    recorded at the boundary makes sure a resumed copy imported the very same one.
    """
    row = conn.execute("SELECT pg_current_snapshot()::text").fetchone()
    assert row is not None
    return str(row[0])


def snapshot_alive(dsn: str, snapshot_name: str, identity: str) -> bool:
    """Whether the exported snapshot can still be imported, and is the one recorded."""
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            import_snapshot(conn, snapshot_name)
            return snapshot_identity(conn) == identity
    except psycopg.Error:
        return False


class Holder:
    """The holder process: spawned early (Python takes a moment to start), then asked to
    create the slot and export its snapshot, then told to let go."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.boundary: Boundary | None = None

    @classmethod
    def spawn(cls) -> Holder:
        return cls(
            subprocess.Popen(
                [sys.executable, "-m", "cdcsync.snapshot.holder"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                # Never the caller's stdout/stderr: an orphaned holder must not keep a
                # pipe of the caller's parent open.
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )

    @classmethod
    def start(cls, dsn: str, slot: str, orphan_seconds: float) -> Holder:
        holder = cls.spawn()
        holder.create(dsn, slot, orphan_seconds)
        return holder

    def create(
        self,
        dsn: str,
        slot: str,
        orphan_seconds: float,
        on_wait: Callable[[float], None] | None = None,
    ) -> Boundary:
        """Create the slot and export its snapshot; fails with the server's reason.

        Creating a slot waits for the transactions running at that moment to end;
        ``on_wait`` is called every 10 s of waiting with the seconds waited so far.
        """
        proc = self.proc
        assert proc.stdin is not None and proc.stdout is not None
        request = {"dsn": dsn, "slot": slot, "orphan_seconds": orphan_seconds}
        try:
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            proc.stdin.flush()
        except OSError:
            pass  # it died: reported below
        started = time.monotonic()
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while not selector.select(10.0):
                if on_wait is not None:
                    on_wait(time.monotonic() - started)
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout=30)
            raise PreconditionError(
                f"the snapshot holder exited ({proc.returncode}) before creating slot {slot} "
                f"on {redact_dsn(dsn)}"
            )
        reply = json.loads(line)
        if "error" in reply:
            proc.wait(timeout=30)
            raise PreconditionError(str(reply["error"]))
        self.boundary = Boundary(
            str(reply["slot_name"]),
            str(reply["consistent_point"]),
            str(reply["snapshot_name"]),
            int(reply["pid"]),
        )
        return self.boundary

    def detach(self) -> None:
        """Leave the holder to itself: it keeps the snapshot for its orphan time, then exits."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        if self.boundary is None:  # never asked for a slot: it exits at once
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)

    def release(self) -> None:
        """Close the replication connection (the slot stays, the snapshot goes)."""
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(b"release\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
