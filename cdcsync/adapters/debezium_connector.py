"""The Debezium PostgreSQL connector cdcsync registers, rendered from ``connectors/``.

cdcsync creates the publication and the replication slot itself (so the snapshot can
read under the slot's exported snapshot); the connector streams from that slot with
``snapshot.mode=no_data``. The database password never travels through the REST API:
the configuration references it in the worker's secrets file.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import psycopg

from cdcsync.config import Settings
from cdcsync.core.connector_config import converter_settings, render, table_include_list
from cdcsync.core.events import TableId
from cdcsync.errors import ConfigError

TEMPLATES = Path(__file__).resolve().parents[2] / "connectors"


def fidelity() -> dict[str, str]:
    """The settings exact decoding depends on (owned by the decoder)."""
    try:
        from cdcsync.core.debezium import fidelity_settings
    except ImportError:  # pragma: no cover - the decoder ships with the package
        return {}
    return dict(fidelity_settings())


def source_connector_config(
    settings: Settings,
    tables: Iterable[TableId],
    *,
    dsn: str | None = None,
    side: str = "source",
    topic_prefix: str | None = None,
    slot_name: str | None = None,
    publication_name: str | None = None,
    snapshot_mode: str = "no_data",
) -> dict[str, str]:
    """Connector properties for streaming ``tables`` of one database (either side)."""
    if not settings.connect_secrets_file:
        raise ConfigError(
            "CDCSYNC_CONNECT_SECRETS_FILE is not set: Debezium reads the database password "
            "from that properties file on the Connect worker (keys source.password, "
            "target.password), so it never travels through the REST API"
        )
    info = psycopg.conninfo.conninfo_to_dict(dsn or settings.source_dsn)
    values = {
        "host": str(info.get("host") or "127.0.0.1"),
        "port": str(info.get("port") or "5432"),
        "user": str(info.get("user") or "postgres"),
        "password": f"${{file:{settings.connect_secrets_file}:{side}.password}}",
        "dbname": str(info.get("dbname") or info.get("user") or "postgres"),
        "topic_prefix": topic_prefix or settings.topic_prefix,
        "slot_name": slot_name or settings.slot_name,
        "publication_name": publication_name or settings.publication_name,
        "snapshot_mode": snapshot_mode,
        "table_include_list": table_include_list(tables),
        "heartbeat_interval_ms": str(settings.connector.heartbeat_interval_ms),
        "max_batch_size": str(settings.connector.max_batch_size),
        "max_queue_size": str(settings.connector.max_queue_size),
        "poll_interval_ms": str(settings.connector.poll_interval_ms),
    }
    template = (TEMPLATES / "postgres-source.json").read_text(encoding="utf-8")
    converters = converter_settings(settings.kafka.format, settings.kafka.schema_registry_url)
    return render(template, values, {**fidelity(), **converters, **settings.connector.extra})
