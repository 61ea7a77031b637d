"""Malformed and unapplicable messages: halt with their position, or go to the dead-letter topic.

Each case produces a good message, a bad one and another good one straight to a real
Kafka topic and runs the real streaming loop against a real target. By default the
loop halts naming topic, partition and offset, the first good message is committed and
the stored offset stops exactly at the bad one. In dead-letter mode the bad message is
in the dead-letter topic with the error in its headers and both good ones are applied.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, Producer

from cdcsync.adapters.offset_store import load as load_offsets
from cdcsync.adapters.state_store import ensure_schema
from cdcsync.config import load_settings
from cdcsync.core.events import TableId
from cdcsync.engine.stream import Endpoint, StreamLoop
from cdcsync.errors import ConfigError, HaltedError

pytestmark = pytest.mark.stack

FIELDS = [
    {
        "type": "int32",
        "optional": False,
        "field": "id",
        "parameters": {"__debezium.source.column.type": "INT4"},
    },
    {
        "type": "string",
        "optional": True,
        "field": "name",
        "parameters": {"__debezium.source.column.type": "TEXT"},
    },
    {
        "type": "int32",
        "optional": True,
        "field": "qty",
        "parameters": {"__debezium.source.column.type": "INT4"},
    },
]


def envelope(
    op: str, row: dict[str, Any] | None, before: dict[str, Any] | None = None, table: str = "items"
) -> dict[str, Any]:
    image = {"type": "struct", "optional": True, "fields": FIELDS}
    return {
        "schema": {
            "type": "struct",
            "fields": [
                {**image, "field": "before"},
                {**image, "field": "after"},
                {"type": "struct", "field": "source", "fields": []},
                {"type": "string", "field": "op"},
            ],
        },
        "payload": {
            "before": before,
            "after": row,
            "source": {
                "schema": "public",
                "table": table,
                "lsn": 100,
                "txId": 5,
                "ts_ms": 1700000000000,
            },
            "op": op,
        },
    }


def key_of(i: int) -> bytes:
    return json.dumps(
        {"schema": {"type": "struct", "fields": [FIELDS[0]]}, "payload": {"id": i}}
    ).encode()


def good(i: int) -> tuple[bytes, bytes]:
    return key_of(i), json.dumps(envelope("c", {"id": i, "name": f"n{i}", "qty": i})).encode()


def mutate(fn: Callable[[dict[str, Any]], Any]) -> bytes:
    doc = envelope("c", {"id": 2, "name": "n2", "qty": 2})
    out = fn(doc)
    return json.dumps(doc if out is None else out).encode()


def _del(doc: dict[str, Any], *path: str) -> None:
    node = doc
    for p in path[:-1]:
        node = node[p]
    del node[path[-1]]


BAD: dict[str, tuple[bytes | None, bytes]] = {
    "not json": (key_of(2), b"\x00\xffnot json at all"),
    "json but not an object": (key_of(2), b"[1, 2, 3]"),
    "invalid utf-8 inside json": (key_of(2), b'{"payload": "\xff\xfe"}'),
    "missing op": (key_of(2), mutate(lambda d: _del(d, "payload", "op"))),
    "unknown op": (key_of(2), mutate(lambda d: d["payload"].update(op="x"))),
    "missing source block": (key_of(2), mutate(lambda d: _del(d, "payload", "source"))),
    "source without table": (key_of(2), mutate(lambda d: _del(d, "payload", "source", "table"))),
    "create without after": (key_of(2), mutate(lambda d: d["payload"].update(after=None))),
    "delete without before": (key_of(2), mutate(lambda d: d["payload"].update(op="d", after=None))),
    "field not in schema": (key_of(2), mutate(lambda d: d["payload"]["after"].update(extra=1))),
    "wrong json type": (key_of(2), mutate(lambda d: d["payload"]["after"].update(qty="many"))),
    "key and value disagree": (key_of(99), good(2)[1]),
    "key not json": (b"{{{", good(2)[1]),
    "schema is not an object": (key_of(2), mutate(lambda d: d.update(schema=[1]))),
    "table not migrated": (
        key_of(2),
        json.dumps(envelope("c", {"id": 2, "name": "x", "qty": 1}, table="secret")).encode(),
    ),
    "constraint violation": (
        key_of(2),
        json.dumps(envelope("c", {"id": 2, "name": "x", "qty": -5})).encode(),
    ),
    "update of a missing row with unchanged toast": (
        key_of(77),
        json.dumps(
            envelope("u", {"id": 77, "name": "__debezium_unavailable_value", "qty": 1})
        ).encode(),
    ),
}


@pytest.fixture
def target(target_dsn: str) -> str:
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE public.items (id int PRIMARY KEY, name text, qty int CHECK (qty >= 0))"
        )
        ensure_schema(conn)
    return target_dsn


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for key, value in messages:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0


def loop_for(target: str, bootstrap: str, prefix: str, **apply: Any) -> StreamLoop:
    settings = load_settings(
        target_dsn=target,
        source_dsn=target,
        kafka_bootstrap=bootstrap,
        migration_id=prefix,
        instance_id=f"{prefix}-test",
    )
    settings = settings.model_copy(update={"apply": settings.apply.model_copy(update=apply)})
    return StreamLoop(
        settings,
        Endpoint("forward", prefix, target, target, {TableId("public", "items")}),
    )


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_message_halts_at_its_offset(
    case: str, target: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}.public.items"
    produce(kafka_bootstrap, topic, [good(1), BAD[case], good(3)])
    loop = loop_for(target, kafka_bootstrap, topic_prefix, batch_max_events=1)
    with pytest.raises(HaltedError) as err:
        loop.run()
    message = str(err.value)
    assert f"{topic}[0]@1" in message, message
    with psycopg.connect(target) as conn:
        rows = conn.execute("SELECT id FROM public.items ORDER BY id").fetchall()
        stored = load_offsets(conn, "cdcsync", topic_prefix, "forward")
    assert rows == [(1,)]
    assert stored == {(topic, 0): 1}  # never past the bad message


@pytest.mark.parametrize("case", ["not json", "constraint violation", "table not migrated"])
def test_dead_letter_mode_moves_on(
    case: str, target: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}.public.items"
    dlq = f"{topic_prefix}-dlq"
    produce(kafka_bootstrap, topic, [good(1), BAD[case], good(3)])
    loop = loop_for(target, kafka_bootstrap, topic_prefix, on_error="dead-letter")
    runner = threading.Thread(target=loop.run, daemon=True)
    runner.start()
    deadline = time.monotonic() + 60
    with psycopg.connect(target, autocommit=True) as conn:
        while time.monotonic() < deadline:
            stored = load_offsets(conn, "cdcsync", topic_prefix, "forward")
            if stored.get((topic, 0)) == 3:
                break
            time.sleep(0.2)
        rows = conn.execute("SELECT id FROM public.items ORDER BY id").fetchall()
    loop.stop.set()
    runner.join(timeout=30)
    assert stored.get((topic, 0)) == 3
    assert rows == [(1,), (3,)]
    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"{dlq}-check",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([dlq])
    msg = None
    while time.monotonic() < deadline and msg is None:
        got = consumer.poll(1.0)
        if got is not None and not got.error():
            msg = got
    consumer.close()
    assert msg is not None, "nothing in the dead-letter topic"
    headers = dict(msg.headers() or [])
    assert headers["cdcsync.offset"] == b"1"
    assert headers["cdcsync.topic"] == topic.encode()
    assert msg.value() == BAD[case][1]


def test_offset_gap_halts(target: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient

    topic = f"{topic_prefix}.public.items"
    produce(kafka_bootstrap, topic, [good(1), good(2), good(3)])
    # Retention removed the first two before anything was applied.
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    futures = admin.delete_records([TopicPartition(topic, 0, 2)])
    for f in futures.values():
        f.result(timeout=30)
    loop = loop_for(target, kafka_bootstrap, topic_prefix)
    with pytest.raises(HaltedError, match="offset gap"):
        loop.run()
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT count(*) FROM public.items").fetchone() == (0,)


def test_at_least_fifteen_kinds() -> None:
    assert len(BAD) >= 15
    assert len({value for _, value in BAD.values()}) >= 15


def test_dead_letter_topic_under_the_prefix_is_refused(target: str, topic_prefix: str) -> None:
    with pytest.raises(ConfigError, match="its own dead letters"):
        loop_for(target, "127.0.0.1:1", topic_prefix, dead_letter_topic=f"{topic_prefix}.dlq")
