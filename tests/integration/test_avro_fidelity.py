"""Type fidelity end to end with Avro events: Debezium → Apicurio's Avro converter →
a real Apicurio Registry → Kafka → the applier, compared as the JSON tests compare.

The daemon runs as the operator runs it, in ``kafka.format=avro``: it snapshots, registers
the connector with the Avro converters, and streams. The source then gets every typed
row again under new keys, updates of them, and the hard-case writer under pgbench load;
both databases are compared by digests computed independently on each side.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition
from psycopg import sql

from cdcsync.adapters.connect_rest import ConnectClient
from cdcsync.config import load_settings
from cdcsync.core.avro_decode import MAGIC
from tests.integration import workload
from tests.integration.test_e2e_stream import (
    Daemon,
    _settings_args,
    drain_and_compare,
    wait_streaming,
)

pytestmark = pytest.mark.stack


@pytest.fixture
def avro_env(migration_env: dict[str, str], schema_registry_url: str) -> dict[str, str]:
    """The shared migration environment, with the connector and the applier in Avro."""
    return {
        **migration_env,
        "CDCSYNC_KAFKA__FORMAT": "avro",
        "CDCSYNC_KAFKA__SCHEMA_REGISTRY_URL": schema_registry_url,
    }


@pytest.fixture
def avro_daemon(avro_env: dict[str, str], tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(avro_env, tmp_path / "daemon.log")
    yield d
    if d.alive():
        d.kill(signal.SIGTERM)


def _first_value(bootstrap: str, topic: str) -> bytes:
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"peek-{topic}", "enable.auto.commit": False}
    )
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            data = msg.value() if msg is not None and not msg.error() else None
            if data:
                return bytes(data)
        raise AssertionError(f"no message on {topic} within 60s")
    finally:
        consumer.close()


def test_typed_rows_arrive_equal_through_avro_and_a_real_registry(
    source_dsn: str,
    avro_env: dict[str, str],
    avro_daemon: Daemon,
    schema_registry_url: str,
) -> None:
    started = time.monotonic()
    workload.create_source(source_dsn, scale=1)
    avro_daemon.start()
    wait_streaming(avro_env, avro_daemon)
    settings = load_settings(**_settings_args(avro_env))
    client = ConnectClient(avro_env["CDCSYNC_CONNECT_URL"])
    config = client._call("GET", f"/connectors/{settings.connector_name}/config")
    assert config["value.converter"] == "io.apicurio.registry.utils.converter.AvroConverter"

    load = workload.Load(source_dsn, seconds=15, seed=3)
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        # Inserted before the load starts: its writer takes keys past the largest one
        # it finds, so none of its inserts can meet these.
        for i, values in enumerate(workload.ROW_VALUES, start=900_000):
            workload.insert_typed(conn, i, values)
        load.start()
        # Every typed value once more, as an UPDATE's new image.
        update = sql.SQL("UPDATE public.all_types SET ({}) = ROW({}) WHERE id = %s").format(
            sql.SQL(", ").join(map(sql.Identifier, workload.COLUMNS)),
            sql.SQL(", ").join(sql.Placeholder() * len(workload.COLUMNS)),
        )
        for i, values in enumerate(reversed(workload.ROW_VALUES), start=900_000):
            conn.execute(update, (*values, i))
        conn.execute("UPDATE public.all_types SET txt = txt || '!' WHERE id >= 900000")
    output = load.wait()
    assert not load.errors, load.errors
    assert "number of failed transactions: 0" in output
    drain_and_compare(avro_env, avro_daemon)

    # The events really were Avro in the registry's framing, their schema in the registry.
    value = _first_value(
        avro_env["CDCSYNC_KAFKA_BOOTSTRAP"], f"{settings.topic_prefix}.public.all_types"
    )
    assert value[0] == MAGIC, value[:16]
    schema_id = int.from_bytes(value[1:5], "big")
    url = f"{schema_registry_url}/apis/ccompat/v6/schemas/ids/{schema_id}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        schema = json.loads(json.loads(resp.read())["schema"])
    assert schema["type"] == "record" and schema["name"] == "Envelope"
    assert avro_daemon.alive(), avro_daemon.tail()
    avro_daemon.kill(signal.SIGTERM)
    assert avro_daemon.proc is not None and avro_daemon.proc.returncode == 0, avro_daemon.tail()
    print(f"avro end-to-end: {time.monotonic() - started:.1f}s")
