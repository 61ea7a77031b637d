"""Operator requests to the running daemon, kept in the ``request`` table of the state schema.

The CLI never acts behind the daemon's back: it records a request and waits; the
daemon's loop claims it (:func:`poll_requests`), carries it out and records the result
(:func:`complete_request`). A request moves ``pending`` → ``running`` → ``done`` or
``failed``; a request nobody took is ``cancelled`` by the CLI that gave up waiting, so
a command either happened or did not. The effective control state — paused or not, the
snapshot rate limit — is whatever the last completed requests set, so a restarted
daemon picks it up again with :func:`control_state`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

PAUSE: Final = "pause"
RESUME: Final = "resume"
THROTTLE: Final = "throttle"

RequestState = Literal["pending", "running", "done", "failed", "cancelled"]
FINAL_STATES: Final[frozenset[str]] = frozenset({"done", "failed", "cancelled"})

_COLUMNS = "id, migration_id, kind, args, requested_by, requested_at, state, result, done_at"


@dataclass(frozen=True)
class Request:
    id: int
    migration_id: str
    kind: str
    args: dict[str, Any]
    requested_by: str
    requested_at: datetime
    state: str
    result: str | None
    done_at: datetime | None

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


@dataclass(frozen=True)
class ControlState:
    """What completed requests have set: the daemon applies it at start and on change."""

    paused: bool = False
    pause_reason: str | None = None
    paused_by: str | None = None
    paused_at: datetime | None = None
    snapshot_rows_per_second: float | None = None  # None: unlimited
    pending: tuple[Request, ...] = field(default=())


def _table(schema: str) -> sql.Composable:
    return sql.Identifier(schema, "request")


def _request(row: dict[str, Any]) -> Request:
    args = row["args"]
    if isinstance(args, str):  # jsonb arrives decoded; text only from a foreign loader
        args = json.loads(args)
    return Request(
        id=int(row["id"]),
        migration_id=str(row["migration_id"]),
        kind=str(row["kind"]),
        args=dict(args or {}),
        requested_by=str(row["requested_by"]),
        requested_at=row["requested_at"],
        state=str(row["state"]),
        result=row["result"],
        done_at=row["done_at"],
    )


def submit_request(
    conn: psycopg.Connection[Any],
    migration_id: str,
    kind: str,
    args: dict[str, Any],
    requested_by: str,
    *,
    schema: str = "cdcsync",
) -> Request:
    """Record a request for the daemon; returns it with its id (committed unless nested)."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            sql.SQL(
                "INSERT INTO {} (migration_id, kind, args, requested_by) VALUES (%s, %s, %s, %s) "
                "RETURNING {}"
            ).format(_table(schema), sql.SQL(_COLUMNS)),
            (migration_id, kind, Jsonb(args), requested_by),
        )
        row = cur.fetchone()
    assert row is not None
    return _request(row)


def poll_requests(
    conn: psycopg.Connection[Any],
    migration_id: str,
    *,
    schema: str = "cdcsync",
    kinds: Sequence[str] | None = None,
    limit: int = 10,
) -> list[Request]:
    """Claim pending requests, oldest first: they become ``running`` for this caller.

    ``SKIP LOCKED`` lets two pollers run at once without taking the same request.
    The daemon must :func:`complete_request` every request it claimed.
    """
    kind_filter = sql.SQL("")
    params: list[Any] = [migration_id]
    if kinds is not None:
        kind_filter = sql.SQL(" AND kind = ANY(%s)")
        params.append(list(kinds))
    params.append(limit)
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            sql.SQL(
                "UPDATE {t} SET state = 'running' WHERE id IN ("
                "SELECT id FROM {t} WHERE migration_id = %s AND state = 'pending'{k} "
                "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING {c}"
            ).format(t=_table(schema), k=kind_filter, c=sql.SQL(_COLUMNS)),
            params,
        )
        rows = cur.fetchall()
    return sorted((_request(r) for r in rows), key=lambda r: r.id)


def complete_request(
    conn: psycopg.Connection[Any],
    request: Request | int,
    *,
    ok: bool,
    result: str,
    actor: str = "daemon",
    schema: str = "cdcsync",
) -> None:
    """Record the outcome of a claimed request, and an audit row saying who asked for what."""
    request_id = request.id if isinstance(request, Request) else request
    state = "done" if ok else "failed"
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            sql.SQL(
                "UPDATE {} SET state = %s, result = %s, done_at = now() "
                "WHERE id = %s AND state = 'running' RETURNING {}"
            ).format(_table(schema), sql.SQL(_COLUMNS)),
            (state, result, request_id),
        )
        row = cur.fetchone()
        if row is None:
            raise ValueError(f"request {request_id} is not running: it cannot be completed")
        done = _request(row)
        _audit(cur, schema, done, actor, state, result)


def cancel_request(
    conn: psycopg.Connection[Any], request_id: int, *, actor: str, schema: str = "cdcsync"
) -> bool:
    """Cancel a request nobody took yet; False when the daemon already claimed it."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            sql.SQL(
                "UPDATE {} SET state = 'cancelled', result = 'not taken up by a daemon', "
                "done_at = now() WHERE id = %s AND state = 'pending' RETURNING {}"
            ).format(_table(schema), sql.SQL(_COLUMNS)),
            (request_id,),
        )
        row = cur.fetchone()
        if row is None:
            return False
        _audit(cur, schema, _request(row), actor, "cancelled", "not taken up by a daemon")
    return True


def get_request(
    conn: psycopg.Connection[Any], request_id: int, *, schema: str = "cdcsync"
) -> Request | None:
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            sql.SQL("SELECT {} FROM {} WHERE id = %s").format(sql.SQL(_COLUMNS), _table(schema)),
            (request_id,),
        )
        row = cur.fetchone()
    return None if row is None else _request(row)


def wait_for_request(
    conn: psycopg.Connection[Any],
    request_id: int,
    timeout: float,
    *,
    schema: str = "cdcsync",
    interval: float = 0.2,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Request:
    """Poll until the request is finished or ``timeout`` passes; returns its last state."""
    deadline = clock() + timeout
    while True:
        found = get_request(conn, request_id, schema=schema)
        if found is None:
            raise ValueError(f"request {request_id} does not exist")
        if found.finished or clock() >= deadline:
            return found
        sleep(min(interval, max(deadline - clock(), 0.0)))


def reclaim_requests(
    conn: psycopg.Connection[Any], migration_id: str, *, schema: str = "cdcsync"
) -> int:
    """Put requests left ``running`` by a crashed daemon back to ``pending`` (call at start).

    Pause, resume and throttle are idempotent, so carrying one out twice is harmless.
    """
    with conn.transaction():
        cur = conn.execute(
            sql.SQL(
                "UPDATE {} SET state = 'pending' WHERE migration_id = %s AND state = 'running'"
            ).format(_table(schema)),
            (migration_id,),
        )
    return cur.rowcount


def pending_requests(
    conn: psycopg.Connection[Any], migration_id: str, *, schema: str = "cdcsync"
) -> list[Request]:
    """Requests not finished yet (pending or running), oldest first."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            sql.SQL(
                "SELECT {} FROM {} WHERE migration_id = %s AND state IN ('pending', 'running') "
                "ORDER BY id"
            ).format(sql.SQL(_COLUMNS), _table(schema)),
            (migration_id,),
        )
        rows = cur.fetchall()
    return [_request(r) for r in rows]


def control_state(
    conn: psycopg.Connection[Any], migration_id: str, *, schema: str = "cdcsync"
) -> ControlState:
    """Paused or not and the snapshot rate limit, as the last completed requests set them."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            sql.SQL(
                "SELECT DISTINCT ON (kind = 'throttle') {} FROM {} "
                "WHERE migration_id = %s AND state = 'done' AND kind = ANY(%s) "
                "ORDER BY kind = 'throttle', id DESC"
            ).format(sql.SQL(_COLUMNS), _table(schema)),
            (migration_id, [PAUSE, RESUME, THROTTLE]),
        )
        latest = [_request(r) for r in cur.fetchall()]
    pending = tuple(pending_requests(conn, migration_id, schema=schema))
    pause = next((r for r in latest if r.kind in (PAUSE, RESUME)), None)
    throttle = next((r for r in latest if r.kind == THROTTLE), None)
    rate = throttle.args.get("snapshot_rows_per_second") if throttle else None
    paused = pause is not None and pause.kind == PAUSE
    return ControlState(
        paused=paused,
        pause_reason=str(pause.args.get("reason", "")) if paused and pause else None,
        paused_by=pause.requested_by if paused and pause else None,
        paused_at=pause.done_at if paused and pause else None,
        snapshot_rows_per_second=float(rate) if rate else None,
        pending=pending,
    )


def _audit(
    cur: psycopg.Cursor[Any], schema: str, req: Request, actor: str, state: str, result: str
) -> None:
    cur.execute(
        sql.SQL(
            "INSERT INTO {} (migration_id, actor, command, args, result, detail) "
            "VALUES (%s, %s, %s, %s, %s, %s)"
        ).format(sql.Identifier(schema, "audit")),
        (
            req.migration_id,
            req.requested_by,
            req.kind,
            Jsonb(req.args),
            state,
            Jsonb({"request_id": req.id, "handled_by": actor, "result": result}),
        ),
    )
