"""The process that owns the replication connection while the snapshot is copied.

``CREATE_REPLICATION_SLOT … EXPORT_SNAPSHOT`` exports a snapshot that other sessions
can import only while the connection that created it stays open and idle. Holding that
connection in a small process of its own lets the snapshot outlive a crash of the
copying process: a ``cdcsync snapshot`` run again within the hold time imports the same
snapshot and finishes the remaining chunks instead of starting over.

Protocol (one JSON line each way, then plain lines):

* stdin, first line: ``{"dsn": …, "slot": …, "orphan_seconds": …}`` (the DSN travels
  here rather than in argv or the environment, where other users could read it);
* stdout: ``{"slot_name", "consistent_point", "snapshot_name", "pid"}`` or ``{"error"}``;
* stdin ``release``: close the connection and exit. End of stdin without ``release``
  (the parent died): keep holding for ``orphan_seconds``, or until the server ends the
  connection (a resuming run terminates it with ``pg_terminate_backend`` when done,
  finding it by its application_name).

The slot is not "active" while its creator idles (the walsender releases it once
created), so ``pg_replication_slots.active_pid`` does not point at the holder.
"""

from __future__ import annotations

import json
import os
import selectors
import sys
import time
from typing import Any

import psycopg
from psycopg import sql


def holder_name(slot: str) -> str:
    """The holder's application_name: how a later run finds its walsender to end it."""
    return f"cdcsync holder {slot}"[:63]


def _emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def hold(conn: psycopg.Connection[Any], orphan_seconds: float) -> str:
    """Wait until released, orphaned too long, or disconnected; returns why."""
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ, "parent")
    selector.register(conn.pgconn.socket, selectors.EVENT_READ, "server")
    deadline: float | None = None
    while True:
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            return "orphan timeout"
        for key, _ in selector.select(timeout):
            if key.data == "parent":
                data = os.read(0, 4096)
                if b"release" in data:
                    return "released"
                if not data:
                    selector.unregister(0)
                    deadline = time.monotonic() + orphan_seconds
            else:
                # An idle replication connection hears from the server only when it ends.
                try:
                    conn.pgconn.consume_input()
                except psycopg.Error:
                    return "disconnected"
                if conn.pgconn.status != psycopg.pq.ConnStatus.OK:
                    return "disconnected"


def main() -> int:
    line = sys.stdin.readline()
    if not line:
        return 0  # spawned ahead of need, and not needed after all
    request = json.loads(line)
    try:
        conn = psycopg.connect(
            psycopg.conninfo.make_conninfo(
                request["dsn"],
                replication="database",
                application_name=holder_name(request["slot"]),
            ),
            autocommit=True,
        )
    except psycopg.Error as exc:
        _emit({"error": f"replication connection to the source failed: {_reason(exc)}"})
        return 3
    try:
        # The replication protocol takes no parameters; the slot name is quoted here.
        row = conn.execute(
            sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT").format(
                sql.Identifier(request["slot"])
            )
        ).fetchone()
    except psycopg.Error as exc:
        _emit({"error": f"creating replication slot {request['slot']} failed: {_reason(exc)}"})
        conn.close()
        return 3
    assert row is not None
    _emit(
        {
            "slot_name": str(row[0]),
            "consistent_point": str(row[1]),
            "snapshot_name": str(row[2]),
            "pid": os.getpid(),
        }
    )
    hold(conn, float(request.get("orphan_seconds", 900)))
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
