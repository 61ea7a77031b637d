"""The chain works end to end: PostgreSQL → Debezium on Kafka Connect → Kafka → consumer.

This proves the stack, not the product: a table, a filtered publication, a connector
registered through the REST API, three changes, and their envelopes read back.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer

from cdcsync.adapters.connect_rest import ConnectClient
from cdcsync.core.connector_config import render, table_include_list
from cdcsync.core.events import TableId

pytestmark = pytest.mark.stack

TEMPLATE = Path(__file__).resolve().parents[2] / "connectors" / "postgres-source.json"


def _conninfo(dsn: str) -> dict[str, Any]:
    return psycopg.conninfo.conninfo_to_dict(dsn)


def register_source_connector(
    client: ConnectClient,
    name: str,
    dsn: str,
    secrets_file: str,
    *,
    topic_prefix: str,
    tables: list[TableId],
    publication: str,
    slot: str,
    extra: dict[str, str] | None = None,
) -> None:
    info = _conninfo(dsn)
    config = render(
        TEMPLATE.read_text(),
        {
            "host": str(info.get("host", "127.0.0.1")),
            "port": str(info.get("port", "5432")),
            "user": str(info.get("user", "postgres")),
            "password": f"${{file:{secrets_file}:source.password}}",
            "dbname": str(info["dbname"]),
            "topic_prefix": topic_prefix,
            "slot_name": slot,
            "publication_name": publication,
            "snapshot_mode": "no_data",
            "table_include_list": table_include_list(tables),
            "heartbeat_interval_ms": "1000",
            "max_batch_size": "2048",
            "max_queue_size": "8192",
            "poll_interval_ms": "20",
        },
        extra,
    )
    client.put_config(name, config)


def _consume(bootstrap: str, topic: str, count: int, timeout: float) -> list[tuple[Any, Any]]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"smoke-{topic}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    out: list[tuple[Any, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < count and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None or msg.error():
                continue
            key = json.loads(msg.key() or b"null") if msg.key() else None
            value = json.loads(msg.value() or b"null") if msg.value() is not None else None
            out.append((key, value))
    finally:
        consumer.close()
    return out


def test_chain_carries_insert_update_delete(
    source_dsn: str,
    kafka_bootstrap: str,
    connect_url: str,
    connect_secrets_file: str,
    topic_prefix: str,
    connectors: list[str],
) -> None:
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.items (id int PRIMARY KEY, name text, qty numeric)")
        conn.execute("CREATE TABLE public.ignored (id int PRIMARY KEY)")
        conn.execute(f"CREATE PUBLICATION {topic_prefix}_pub FOR TABLE public.items")

    client = ConnectClient(connect_url)
    name = f"{topic_prefix}-smoke"
    connectors.append(name)
    slot = f"{topic_prefix}_slot"
    register_source_connector(
        client,
        name,
        source_dsn,
        connect_secrets_file,
        topic_prefix=topic_prefix,
        tables=[TableId("public", "items")],
        publication=f"{topic_prefix}_pub",
        slot=slot,
    )
    client.wait_running(name, timeout=90)

    # RUNNING precedes the slot: changes count only once the slot streams.
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        deadline = time.monotonic() + 60
        while True:
            row = conn.execute(
                "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)
            ).fetchone()
            if row and row[0]:
                break
            assert time.monotonic() < deadline, "Debezium never started streaming its slot"
            time.sleep(0.5)
        with conn.transaction():
            conn.execute("INSERT INTO public.items VALUES (1, 'bolt', 1.50)")
            conn.execute("INSERT INTO public.ignored VALUES (1)")
        conn.execute("UPDATE public.items SET qty = 2.25 WHERE id = 1")
        conn.execute("DELETE FROM public.items WHERE id = 1")

    events = _consume(kafka_bootstrap, f"{topic_prefix}.public.items", 4, timeout=90)
    assert len(events) == 4, f"expected create, update, delete, tombstone; got {events}"
    (k1, create), (_, update), (_, delete), (k4, tombstone) = events

    assert k1["payload"] == {"id": 1}
    assert create["payload"]["op"] == "c"
    assert create["payload"]["before"] is None
    assert create["payload"]["after"]["name"] == "bolt"
    assert update["payload"]["op"] == "u"
    assert update["payload"]["after"]["id"] == 1
    assert delete["payload"]["op"] == "d"
    assert delete["payload"]["before"]["id"] == 1
    assert delete["payload"]["after"] is None
    assert k4["payload"] == {"id": 1} and tombstone is None

    sources = [e["payload"]["source"] for e in (create, update, delete)]
    lsns = [s["lsn"] for s in sources]
    assert all(isinstance(lsn, int) and lsn > 0 for lsn in lsns)
    assert lsns == sorted(lsns) and len(set(lsns)) == 3
    tx_ids = [s["txId"] for s in sources]
    assert all(isinstance(t, int) for t in tx_ids) and len(set(tx_ids)) == 3
    assert {s["table"] for s in sources} == {"items"}
    assert {s["schema"] for s in sources} == {"public"}
