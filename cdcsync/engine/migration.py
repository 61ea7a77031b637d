"""``cdcsync run``: snapshot when none is recorded, register the connector, stream."""

from __future__ import annotations

import logging
import threading
from typing import Any

import psycopg
from psycopg import sql

from cdcsync.adapters.connect_rest import ConnectClient
from cdcsync.adapters.debezium_connector import source_connector_config
from cdcsync.adapters.pg import connect
from cdcsync.config import Settings
from cdcsync.core.events import TableId
from cdcsync.engine.stream import StreamLoop, forward_endpoint
from cdcsync.snapshot.runner import migration_state, run_snapshot

log = logging.getLogger("cdcsync.run")


def ensure_connector(settings: Settings, tables: list[TableId], consistent_point: str) -> None:
    """Register the source connector on cdcsync's slot; stale offsets are forgotten."""
    client = ConnectClient(settings.connect_url)
    name = settings.connector_name
    config = source_connector_config(settings, tables)
    current = client.status(name)
    registered_for = None
    if current is not None:
        existing = client._call("GET", f"/connectors/{name}/config") or {}
        registered_for = existing.get("cdcsync.consistent.point")
    config["cdcsync.consistent.point"] = consistent_point
    if current is not None and registered_for != consistent_point:
        log.info("connector %s belongs to an earlier slot: resetting its offsets", name)
        client.reset_offsets(name)
    client.put_config(name, config)
    if current is not None and current["connector"]["state"] == "STOPPED":
        client._call("PUT", f"/connectors/{name}/resume")
    client.wait_running(name, timeout=120)


def run(settings: Settings, *, stop: threading.Event | None = None) -> int:
    settings.require("source_dsn", "target_dsn", "kafka_bootstrap", "connect_url")
    with connect(settings.target_conninfo(), "target") as target:
        state = migration_state(target, settings)
    if state is None or state[0] in ("snapshot",):
        result = run_snapshot(settings)
        log.info("snapshot done: %d rows in %.1fs", result.rows, result.timings.get("total", 0))
    with psycopg.connect(settings.target_conninfo()) as target:
        state = migration_state(target, settings)
        assert state is not None
        point = _consistent_point(target, settings)
    tables = [TableId(s, t) for s, t in state[1].get("tables", [])]
    ensure_connector(settings, tables, point)
    endpoint = forward_endpoint(settings)
    endpoint.tables = set(tables)
    return StreamLoop(settings, endpoint, stop=stop).run()


def _consistent_point(target: psycopg.Connection[Any], settings: Settings) -> str:
    row = target.execute(
        sql.SQL("SELECT consistent_point::text FROM {}.migration WHERE migration_id = %s").format(
            sql.Identifier(settings.state_schema)
        ),
        (settings.migration_id,),
    ).fetchone()
    return str(row[0]) if row else ""
