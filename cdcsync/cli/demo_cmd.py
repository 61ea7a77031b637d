"""``cdcsync demo``: the change stream made visible on the local stack.

It creates a sample table on the source, registers the Debezium connector through the
Connect REST API, makes changes and prints the events as they arrive from Kafka.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import psycopg
import typer
from psycopg import sql
from rich.console import Console
from rich.table import Table

from cdcsync.adapters.connect_rest import ConnectClient
from cdcsync.adapters.debezium_connector import source_connector_config
from cdcsync.cli.main import app
from cdcsync.config import load_settings
from cdcsync.core.events import TableId
from cdcsync.errors import PreconditionError

console = Console()


@app.command()
def demo() -> None:
    """Show changes flowing PostgreSQL → Debezium → Kafka on the local stack."""
    from confluent_kafka import Consumer

    settings = load_settings()
    settings.require("source_dsn", "kafka_bootstrap", "connect_url")
    run_id = f"demo{secrets.token_hex(3)}"
    admin = settings.source_conninfo()
    dbname = f"cdcsync_{run_id}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    dsn = psycopg.conninfo.make_conninfo(admin, dbname=dbname)
    client = ConnectClient(settings.connect_url)
    name = f"{run_id}-source"
    slot = f"{run_id}_slot"
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE public.orders (id int PRIMARY KEY, customer text, "
                "total numeric(12,2), placed_at timestamptz DEFAULT now())"
            )
            conn.execute(
                sql.SQL("CREATE PUBLICATION {} FOR TABLE public.orders").format(
                    sql.Identifier(f"{run_id}_pub")
                )
            )
        config = source_connector_config(
            settings.model_copy(update={"migration_id": run_id}),
            [TableId("public", "orders")],
            dsn=dsn,
            slot_name=slot,
            publication_name=f"{run_id}_pub",
        )
        console.print(f"registering connector [bold]{name}[/] (pgoutput, slot {slot})")
        client.put_config(name, config)
        client.wait_running(name, timeout=90)
        _wait_slot_active(dsn, slot)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO public.orders (id, customer, total) VALUES (1, 'ada', 10.50)")
            conn.execute("INSERT INTO public.orders (id, customer, total) VALUES (2, 'bob', 99.99)")
            conn.execute("UPDATE public.orders SET total = 12.75 WHERE id = 1")
            conn.execute("DELETE FROM public.orders WHERE id = 2")
        console.print("made 4 changes on the source; reading them from Kafka …")
        consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "group.id": run_id,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        consumer.subscribe([f"{run_id}.public.orders"])
        table = Table("offset", "op", "key", "before", "after", "lsn", "txId")
        seen = 0
        deadline = time.monotonic() + 60
        while seen < 5 and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None or msg.error():
                continue
            seen += 1
            key = json.loads(msg.key() or b"null")["payload"] if msg.key() else None
            if msg.value() is None:
                table.add_row(str(msg.offset()), "tombstone", json.dumps(key), "", "", "", "")
                continue
            payload: dict[str, Any] = json.loads(msg.value() or b"null")["payload"]
            table.add_row(
                str(msg.offset()),
                payload["op"],
                json.dumps(key),
                json.dumps(payload["before"]),
                json.dumps(payload["after"]),
                str(payload["source"]["lsn"]),
                str(payload["source"]["txId"]),
            )
        consumer.close()
        console.print(table)
        if seen < 5:
            raise PreconditionError(f"expected 5 messages, saw {seen} within 60 s")
        console.print("[green]the chain works[/]: PostgreSQL → Debezium → Kafka")
    finally:
        client.delete(name)
        _drop(admin, dbname)


def _wait_slot_active(dsn: str, slot: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)
            ).fetchone()
            if row and row[0]:
                return
            time.sleep(0.5)
    raise PreconditionError(f"Debezium never started streaming slot {slot}")


def _drop(admin: str, dbname: str) -> None:
    for _ in range(20):
        try:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                    "WHERE database = %s AND NOT active",
                    (dbname,),
                )
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(dbname)
                    )
                )
            return
        except psycopg.errors.ObjectInUse:
            time.sleep(0.5)
    raise typer.Exit(1)
