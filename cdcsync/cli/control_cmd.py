"""``cdcsync pause``, ``resume`` and ``throttle``: requests the running daemon carries out.

The command records a request in the migration's state and waits (bounded) for the
daemon's loop to take it and say how it went; it never acts behind the daemon's back.
A request no daemon took within the wait is cancelled, so the command either happened
or did not; ``--no-wait`` leaves it queued for the next daemon that runs.
"""

from __future__ import annotations

import getpass
import socket
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from cdcsync.cli.main import app

console = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML configuration file")]
WaitOpt = Annotated[
    bool,
    typer.Option(
        "--wait/--no-wait",
        help="wait for the daemon to carry the request out (--no-wait: leave it queued)",
    ),
]
TimeoutOpt = Annotated[
    float,
    typer.Option("--timeout", min=0.1, help="seconds to wait for the daemon"),
]


def requester() -> str:
    """``user@host`` of whoever runs the command, for the audit trail."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def send(config: Path | None, kind: str, args: dict[str, Any], wait: bool, timeout: float) -> None:
    """Record the request; wait for its outcome; exit non-zero unless it was carried out."""
    from cdcsync.adapters import requests_store as rs
    from cdcsync.adapters.pg import connect
    from cdcsync.config import load_settings
    from cdcsync.errors import PreconditionError, StateUnknown

    settings = load_settings(config)
    settings.require("target_dsn")
    schema, mig = settings.state_schema, settings.migration_id
    who = requester()
    with connect(settings.target_conninfo(), "target", autocommit=True) as conn:
        _require_migration(conn, schema, mig)
        req = rs.submit_request(conn, mig, kind, args, who, schema=schema)
        console.print(f"request #{req.id} ({kind}) recorded for migration {mig}")
        if not wait:
            console.print("not waiting: the daemon carries it out when its loop next polls")
            return
        done = rs.wait_for_request(conn, req.id, timeout, schema=schema)
        if not done.finished and rs.cancel_request(conn, req.id, actor=who, schema=schema):
            raise PreconditionError(
                f"no running daemon took request #{req.id} within {timeout:g}s, so it was "
                "cancelled: is `cdcsync run` running for this migration? (--no-wait queues it)"
            )
        if not done.finished:
            done = rs.wait_for_request(conn, req.id, timeout, schema=schema)
        if not done.finished:
            raise StateUnknown(
                f"the daemon took request #{req.id} but has not finished it after "
                f"{2 * timeout:g}s; see `cdcsync status`"
            )
    if done.state != "done":
        raise PreconditionError(f"request #{req.id} {done.state}: {done.result or 'no reason'}")
    console.print(f"request #{req.id} done: {escape(done.result or 'ok')}")


def _require_migration(conn: Any, schema: str, migration_id: str) -> None:
    from cdcsync.adapters.lag_probe import read_phase
    from cdcsync.errors import PreconditionError

    if read_phase(conn, schema, migration_id) is None:
        raise PreconditionError(
            f"no migration {migration_id!r} in the target's {schema!r} schema: "
            "nothing to control (check CDCSYNC_MIGRATION_ID)"
        )


@app.command()
def pause(
    reason: Annotated[
        str, typer.Option("--reason", help="why (kept in the audit trail and shown in status)")
    ],
    config: ConfigOpt = None,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = 30.0,
) -> None:
    """Stop applying changes; the daemon stays up, says so in status, metrics and /readyz."""
    if not reason.strip():
        raise typer.BadParameter("give a reason", param_hint="--reason")
    send(config, "pause", {"reason": reason.strip()}, wait, timeout)


@app.command()
def resume(
    reason: Annotated[str, typer.Option("--reason", help="optional note for the audit")] = "",
    config: ConfigOpt = None,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = 30.0,
) -> None:
    """Apply changes again after ``cdcsync pause``."""
    args = {"reason": reason.strip()} if reason.strip() else {}
    send(config, "resume", args, wait, timeout)


@app.command()
def throttle(
    snapshot_rows_per_second: Annotated[
        float,
        typer.Option(
            "--snapshot-rows-per-second",
            min=0,
            help="limit the snapshot copy to this many rows per second (0: no limit)",
        ),
    ],
    config: ConfigOpt = None,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = 30.0,
) -> None:
    """Change the snapshot copy's rate limit while it runs."""
    rate = snapshot_rows_per_second or None
    send(config, "throttle", {"snapshot_rows_per_second": rate}, wait, timeout)
