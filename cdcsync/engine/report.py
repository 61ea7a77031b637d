"""Gather what the final report judges: the target's state, the audit trail, a fresh discovery.

Everything is read, nothing written: the migration row and its ``data`` (snapshot,
switch record, verification, backup, finalize), the stored Kafka offsets of each
direction (forward ones on the target, reverse ones on the source, where each applier
commits them with its rows), the audit rows of every cutover, rollback, abort, finalize
and backup, and the findings of :func:`cdcsync.adapters.discovery.discover`, which runs
read-only because ``assess`` does not persist its findings. The result is one plain
document that :func:`cdcsync.core.report_model.build` judges.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from cdcsync.adapters.pg import connect
from cdcsync.errors import CdcsyncError

if TYPE_CHECKING:
    from cdcsync.config import Settings

SWITCH_COMMANDS = ("cutover", "rollback")
OTHER_COMMANDS = ("abort", "finalize", "backup")


def gather(settings: Settings, *, discovery: bool = True) -> dict[str, Any]:
    """The report document for the configured migration."""
    settings.require("source_dsn", "target_dsn")
    doc: dict[str, Any] = {
        "migration_id": settings.migration_id,
        "generated_at": time.time(),
        "plan": None,  # from the snapshot's record, when it was taken under a plan
    }
    with connect(settings.target_conninfo(), "target", autocommit=True) as target:
        target.read_only = True
        if _has_table(target, settings.state_schema, "migration"):
            _migration(target, settings, doc)
            doc["streams"] = _streams(target, settings, "forward")
        if _has_table(target, settings.state_schema, "audit"):
            _audit(target, settings, doc)
    try:
        with connect(settings.source_conninfo(), "source", autocommit=True) as source:
            source.read_only = True
            doc.setdefault("streams", [])
            doc["streams"] += _streams(source, settings, "reverse")
    except CdcsyncError as exc:
        doc.setdefault("errors", []).append(str(exc))
    if discovery:
        doc["discovery"] = _discover(settings)
    return doc


def _has_table(conn: psycopg.Connection[Any], schema: str, name: str) -> bool:
    row = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (sql.Identifier(schema, name).as_string(conn),)
    ).fetchone()
    return bool(row and row[0])


def _migration(conn: psycopg.Connection[Any], settings: Settings, doc: dict[str, Any]) -> None:
    row = conn.execute(
        sql.SQL(
            "SELECT phase, slot_name, publication_name, consistent_point::text, data "
            "FROM {} WHERE migration_id = %s"
        ).format(sql.Identifier(settings.state_schema, "migration")),
        (settings.migration_id,),
    ).fetchone()
    if row is None:
        return
    phase, slot, publication, point, raw = row
    data: dict[str, Any] = dict(raw or {})
    doc["phase"] = phase
    doc["snapshot"] = {
        "step": data.get("step"),
        "consistent_point": point,
        "slot_name": slot,
        "publication_name": publication,
        "tables": len(data.get("tables") or []),
        "rows": data.get("rows"),
        "bytes": data.get("bytes"),
        "sequences": data.get("sequences"),
        "timings": data.get("timings"),
    }
    doc["plan"] = data.get("plan")
    doc["primary"] = data.get("primary") or ("target" if phase == "cut_over" else "source")
    doc["armed_streams"] = data.get("streams")
    doc["halted"] = data.get("halted")
    switch = data.get("switch")
    if isinstance(switch, dict) and switch.get("done") != "done":
        doc["switch_in_progress"] = switch
    doc["verification"] = data.get("verification")
    doc["backup"] = data.get("backup")
    doc["finalized_at"] = data.get("finalized_at")
    doc["switch_log"] = data.get("switch_log")
    doc["last_freeze_seconds"] = data.get("last_freeze_seconds")


def _streams(conn: psycopg.Connection[Any], settings: Settings, direction: str) -> list[Any]:
    if not _has_table(conn, settings.state_schema, "kafka_offset"):
        return []
    row = conn.execute(
        sql.SQL(
            "SELECT count(*), sum(next_offset), max(last_lsn)::text, "
            "extract(epoch FROM max(last_commit_ts))::float8, "
            "extract(epoch FROM max(updated_at))::float8 "
            "FROM {} WHERE migration_id = %s AND direction = %s"
        ).format(sql.Identifier(settings.state_schema, "kafka_offset")),
        (settings.migration_id, direction),
    ).fetchone()
    if row is None or not row[0]:
        return []
    return [
        {
            "direction": direction,
            "partitions": int(row[0]),
            "applied_offsets": int(row[1] or 0),
            "last_lsn": row[2],
            "last_commit_ts": row[3],
            "updated_at": row[4],
        }
    ]


def _audit(conn: psycopg.Connection[Any], settings: Settings, doc: dict[str, Any]) -> None:
    rows = conn.execute(
        sql.SQL(
            "SELECT extract(epoch FROM at)::float8, actor, command, result, detail FROM {} "
            "WHERE migration_id = %s AND command = ANY(%s) AND result IS DISTINCT FROM "
            "'started' ORDER BY id"
        ).format(sql.Identifier(settings.state_schema, "audit")),
        (settings.migration_id, [*SWITCH_COMMANDS, *OTHER_COMMANDS]),
    ).fetchall()
    switches: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for at, actor, command, result, detail in rows:
        info = dict(detail or {})
        if command in SWITCH_COMMANDS:
            switches.append(
                {
                    "kind": command,
                    "at": at,
                    "actor": actor,
                    "result": result,
                    "steps": info.get("steps"),
                    "freeze_seconds": info.get("freeze_seconds"),
                    "positions": info.get("positions"),
                    "verification": info.get("verification"),
                    "message": info.get("message"),
                }
            )
        else:
            events.append({"command": command, "at": at, "actor": actor, "result": result})
    doc["switches"] = switches
    doc["events"] = events


def _discover(settings: Settings) -> dict[str, Any]:
    """Findings of a read-only discovery, or why it could not run."""
    from cdcsync.adapters.discovery import discover
    from cdcsync.core import findings as fnd

    try:
        facts = discover(settings)
    except (CdcsyncError, psycopg.Error) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return {"error": reason, "at": time.time()}
    return {"findings": [f.to_dict() for f in fnd.evaluate(facts)], "at": time.time()}
