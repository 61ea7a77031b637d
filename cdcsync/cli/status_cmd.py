"""``cdcsync status``: the figures on-call needs, read where they live.

Phase, pause and rate limit from the target's state schema; lag from the same probes
the daemon exports as metrics (source WAL and slot, Kafka end offsets against the
offsets stored with the applied rows, the connector's state); and the daemon's own
readiness from its ``/readyz?verbose``. Works whether or not the daemon runs.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console, Group
from rich.table import Table

from cdcsync.cli.main import app

if TYPE_CHECKING:
    from cdcsync.adapters.lag_probe import LagProbe
    from cdcsync.config import Settings

console = Console()


def gather(settings: Settings, probe: LagProbe) -> dict[str, Any]:
    """One status document (what ``--output json`` prints)."""
    from cdcsync.adapters import requests_store as rs
    from cdcsync.adapters.pg import connect
    from cdcsync.core.events import TableId
    from cdcsync.snapshot.catalog import exists

    report = probe.probe()
    daemon = daemon_health(settings.metrics_addr)
    applied = daemon.pop("applied", {})
    for r in report.directions:
        proven = applied.get(r.direction)
        if proven is not None and proven > (r.applied_source_ts or 0.0):
            r.applied_source_ts = proven
            r.time_lag_seconds = max(report.at - proven, 0.0)
    doc: dict[str, Any] = {
        "migration_id": settings.migration_id,
        "at": _iso(report.at),
        "phase": report.phase,
        "control": None,
        "daemon": daemon,
        "directions": [_direction(r) for r in report.directions],
        "snapshot": _snapshot(report.snapshot),
        "errors": list(report.errors),
    }
    try:
        with connect(settings.target_conninfo(), "target", autocommit=True) as conn:
            if exists(conn, TableId(settings.state_schema, "request")):
                control = rs.control_state(
                    conn, settings.migration_id, schema=settings.state_schema
                )
                doc["control"] = {
                    "paused": control.paused,
                    "pause_reason": control.pause_reason,
                    "paused_by": control.paused_by,
                    "paused_at": control.paused_at.isoformat() if control.paused_at else None,
                    "snapshot_rows_per_second": control.snapshot_rows_per_second,
                    "pending_requests": [
                        {
                            "id": r.id,
                            "kind": r.kind,
                            "state": r.state,
                            "requested_by": r.requested_by,
                            "requested_at": r.requested_at.isoformat(),
                        }
                        for r in control.pending
                    ],
                }
    except Exception as exc:  # status shows what it can
        doc["errors"].append(f"control: {str(exc).strip().splitlines()[0][:300]}")
    return doc


def daemon_health(addr: str, timeout: float = 1.0) -> dict[str, Any]:
    """The running daemon's /readyz?verbose and applied positions, or that it does not answer.

    The daemon's probe keeps a history of source positions, so it can prove an applied
    position on an idle source where a single reading here cannot.
    """
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - listening everywhere: ask locally
        host = "127.0.0.1"
    base = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    try:
        resp = requests.get(f"{base}/readyz?verbose", timeout=timeout)
        exposition = requests.get(f"{base}/metrics", timeout=timeout).text
    except requests.RequestException:
        return {"address": addr, "reachable": False, "ready": None, "checks": [], "applied": {}}
    checks = []
    for line in resp.text.splitlines():
        if line.startswith(("[+]", "[-]")):
            name, _, rest = line[3:].partition(" ")
            detail = rest.split(": ", 1)[1] if ": " in rest else rest
            checks.append({"name": name, "ok": line.startswith("[+]"), "detail": detail})
    applied: dict[str, float] = {}
    try:
        for fam in text_string_to_metric_families(exposition):
            if fam.name == "cdcsync_last_applied_source_timestamp_seconds":
                applied = {s.labels["direction"]: s.value for s in fam.samples}
    except ValueError:  # not a cdcsync daemon on that address
        applied = {}
    return {
        "address": addr,
        "reachable": True,
        "ready": resp.status_code == 200,
        "checks": checks,
        "applied": applied,
    }


def _direction(r: Any) -> dict[str, Any]:
    slot = r.slot
    return {
        "direction": r.direction,
        "connector_state": r.connector,
        "offset_lag_messages": r.offset_lag,
        "caught_up": r.caught_up,
        "time_lag_seconds": _round(r.time_lag_seconds),
        "last_applied_source_time": _iso(r.applied_source_ts),
        "wal_lag_bytes": r.wal_lag_bytes,
        "slot": None
        if slot is None
        else {
            "name": slot.slot_name,
            "exists": slot.exists,
            "wal_status": slot.wal_status,
            "retained_wal_bytes": slot.retained_bytes,
            "safe_wal_size_bytes": slot.safe_wal_size,
            "max_slot_wal_keep_size_bytes": slot.max_wal_keep_size,
        },
        "partitions": [
            {
                "topic": p.topic,
                "partition": p.partition,
                "stored_offset": p.stored,
                "end_offset": p.end,
                "lag": p.lag,
            }
            for p in r.partitions
        ],
        "errors": list(r.errors),
    }


def _snapshot(tables: list[Any]) -> dict[str, Any] | None:
    if not tables:
        return None
    return {
        "rows_copied": sum(t.rows_copied for t in tables),
        "rows_planned": sum(max(t.rows_planned, t.rows_copied) for t in tables),
        "bytes_copied": sum(t.bytes_copied for t in tables),
        "bytes_planned": sum(max(t.bytes_planned, t.bytes_copied) for t in tables),
        "tables": [
            {
                "table": t.table,
                "rows_copied": t.rows_copied,
                "rows_planned": t.rows_planned,
                "bytes_copied": t.bytes_copied,
                "bytes_planned": t.bytes_planned,
            }
            for t in tables
        ],
    }


def render(doc: dict[str, Any]) -> Group:
    """The document as tables for a terminal."""
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("migration", str(doc["migration_id"]))
    head.add_row("phase", str(doc["phase"] or "none recorded"))
    control = doc["control"]
    if control is not None:
        paused = (
            f"[bold yellow]paused[/] by {control['paused_by']} since {control['paused_at']}: "
            f"{control['pause_reason']}"
            if control["paused"]
            else "applying"
        )
        head.add_row("control", paused)
        rate = control["snapshot_rows_per_second"]
        head.add_row("snapshot limit", f"{rate:g} rows/s" if rate else "none")
        for r in control["pending_requests"]:
            head.add_row("request", f"#{r['id']} {r['kind']} {r['state']} by {r['requested_by']}")
    daemon = doc["daemon"]
    if not daemon["reachable"]:
        head.add_row("daemon", f"[yellow]not answering on {daemon['address']}[/]")
    else:
        verdict = "[green]ready[/]" if daemon["ready"] else "[red]not ready[/]"
        failed = [f"{c['name']} ({c['detail']})" for c in daemon["checks"] if not c["ok"]]
        head.add_row("daemon", verdict + (": " + "; ".join(failed) if failed else ""))
    lag = Table(title="lag", title_justify="left")
    for col in ("direction", "connector", "offset lag", "time lag", "WAL lag", "slot WAL"):
        lag.add_column(col, justify="right" if "lag" in col or "WAL" in col else "left")
    for d in doc["directions"]:
        slot = d["slot"] or {}
        retained = slot.get("retained_wal_bytes")
        limit = slot.get("max_slot_wal_keep_size_bytes")
        slot_text = "no slot" if not slot.get("exists") else _bytes(retained)
        if slot.get("exists") and limit:
            slot_text += f" of {_bytes(limit)} ({slot.get('wal_status')})"
        lag.add_row(
            d["direction"],
            str(d["connector_state"] or "-"),
            "-" if d["offset_lag_messages"] is None else f"{d['offset_lag_messages']:,}",
            "-" if d["time_lag_seconds"] is None else f"{d['time_lag_seconds']:.1f}s",
            _bytes(d["wal_lag_bytes"]),
            slot_text,
        )
    parts: list[Any] = [head, lag]
    snap = doc["snapshot"]
    if snap is not None:
        table = Table(title="snapshot", title_justify="left")
        for col in ("table", "rows", "bytes"):
            table.add_column(col, justify="left" if col == "table" else "right")
        for t in snap["tables"]:
            table.add_row(
                t["table"],
                f"{t['rows_copied']:,} / ~{max(t['rows_planned'], t['rows_copied']):,}",
                f"{_bytes(t['bytes_copied'])} / ~{_bytes(max(t['bytes_planned'], 0))}",
            )
        parts.append(table)
    problems = list(doc["errors"]) + [
        f"{d['direction']} {e}" for d in doc["directions"] for e in d["errors"]
    ]
    if problems:
        errors = Table(title="could not read", title_justify="left", show_header=False)
        errors.add_column(style="yellow")
        for p in problems:
            errors.add_row(p)
        parts.append(errors)
    return Group(*parts)


@app.command()
def status(
    config: Annotated[Path | None, typer.Option("--config", help="YAML configuration file")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="refresh until interrupted")] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.5, help="seconds between refreshes (--watch)")
    ] = 2.0,
    output: Annotated[
        str, typer.Option("--output", "-o", help="text or json (one document per refresh)")
    ] = "text",
) -> None:
    """Phase, lag per direction (offsets, time, WAL bytes), slot, snapshot, pause, daemon."""
    from cdcsync.adapters.lag_probe import LagProbe
    from cdcsync.config import load_settings
    from cdcsync.errors import ConfigError

    if output not in ("text", "json"):
        raise ConfigError(f"--output {output!r}: use text or json")
    settings = load_settings(config)
    settings.require("source_dsn", "target_dsn")
    probe = LagProbe(settings)
    try:
        if not watch:
            doc = gather(settings, probe)
            _show(doc, output)
            problems = unreachable(doc)
            if problems:
                # Printed in full above; a script or a probe must not read "all is well".
                print(
                    f"status incomplete: {len(problems)} part(s) could not be read",
                    file=sys.stderr,
                )
                raise typer.Exit(code=3)
            return
        if output == "json":
            while True:
                _show(gather(settings, probe), output)
                time.sleep(interval)
        from rich.live import Live

        with Live(render(gather(settings, probe)), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(render(gather(settings, probe)), refresh=True)
    except KeyboardInterrupt:
        return
    finally:
        probe.close()


def unreachable(doc: dict[str, Any]) -> list[str]:
    """What status could not read (a database, Kafka, Connect): exit code 3 when any."""
    return list(doc["errors"]) + [
        f"{d['direction']}: {e}" for d in doc["directions"] for e in d["errors"]
    ]


def _show(doc: dict[str, Any], output: str) -> None:
    if output == "json":
        print(json.dumps(doc), flush=True)
    else:
        console.print(render(doc))


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
