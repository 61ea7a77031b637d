"""Avro decode micro-benchmark: µs per event of the decoders on real captured messages.

Messages come from a file written once by ``capture``: every message of a migration's
topics (as Debezium wrote them with Apicurio's Avro converter) plus the registry's
schemas for the ids they use. ``run`` decodes them again and again in this process,
with no broker or registry, and prints the median CPU µs per event of:

- ``avro``: :class:`AvroDecoder` as the daemon uses it (the compiled shortcut);
- ``avro_payload``: the same decoder through the JSON-shaped payload only (the reference);
- ``avro_at_<rev>`` (``--baseline-rev``): the decoder module as it was at a git revision;
- ``json``: the JSON decoder on the same events, each rewritten as the JSON converter
  writes it (schema embedded, built from the Connect schema the Avro one translates to).

Every variant's events are checked equal to the reference's before timing. The last
line is one JSON object.

    python bench/avro_decode.py capture --prefix t95ace4b50e --out .stack/avro/messages.json
    python bench/avro_decode.py run --data .stack/avro/messages.json --repeat 7

``capture`` needs CDCSYNC_KAFKA_BOOTSTRAP and CDCSYNC_KAFKA__SCHEMA_REGISTRY_URL
(``cdcsync stack env``); a prefix whose topics hold Avro events is left by
``tests/integration/test_avro_fidelity.py`` run with ``CDCSYNC_TEST_KEEP_STACK=1``.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cdcsync.adapters.schema_registry import RegistryClient
from cdcsync.core.avro_decode import AvroDecoder, read_record, split_frame
from cdcsync.core.debezium import HEARTBEAT_TOPIC_PREFIX, Decoder
from cdcsync.errors import DecodeError

REPO = Path(__file__).resolve().parents[1]
Message = tuple[str, int, int, bytes | None, bytes | None]


def capture(prefix: str, out: Path, limit: int) -> None:
    from confluent_kafka import Consumer, TopicPartition
    from confluent_kafka.admin import AdminClient

    bootstrap = os.environ["CDCSYNC_KAFKA_BOOTSTRAP"]
    registry = RegistryClient(os.environ["CDCSYNC_KAFKA__SCHEMA_REGISTRY_URL"])
    topics = sorted(
        t
        for t in AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
        if t.startswith(f"{prefix}.") or t == f"{HEARTBEAT_TOPIC_PREFIX}.{prefix}"
    )
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"bench-{prefix}", "enable.auto.commit": False}
    )
    messages: list[dict[str, Any]] = []
    ids: set[int] = set()
    try:
        for topic in topics:
            meta = consumer.list_topics(topic, timeout=10).topics[topic]
            for partition in meta.partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition))
                consumer.assign([TopicPartition(topic, partition, low)])
                offset = low
                while offset < high and len(messages) < limit:
                    msg = consumer.poll(5.0)
                    if msg is None:
                        break
                    if msg.error():
                        continue
                    at = msg.offset()
                    assert at is not None
                    offset = at + 1
                    record: dict[str, Any] = {"topic": topic, "partition": partition}
                    record["offset"] = at
                    for part, data in (("key", msg.key()), ("value", msg.value())):
                        record[part] = None if data is None else base64.b64encode(data).decode()
                        if data and data[0] == 0 and len(data) >= 5:
                            ids.add(int.from_bytes(data[1:5], "big"))
                    messages.append(record)
    finally:
        consumer.close()
    schemas = {str(i): registry.schema(i) for i in sorted(ids)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"prefix": prefix, "schemas": schemas, "messages": messages}))
    print(f"captured {len(messages)} messages from {len(topics)} topics, {len(ids)} schemas")


def load(path: Path) -> tuple[str, dict[int, str], list[Message]]:
    doc = json.loads(path.read_text())

    def raw(text: str | None) -> bytes | None:
        return None if text is None else base64.b64decode(text)

    messages = [
        (m["topic"], m["partition"], m["offset"], raw(m["key"]), raw(m["value"]))
        for m in doc["messages"]
    ]
    return doc["prefix"], {int(k): v for k, v in doc["schemas"].items()}, messages


def module_at(rev: str) -> Any:
    """``cdcsync.core.avro_decode`` as it was at git revision ``rev``, imported apart."""
    text = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{rev}:cdcsync/core/avro_decode.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "avro_decode_baseline.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("avro_decode_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def json_twins(schemas: dict[int, str], messages: list[Message]) -> list[Message]:
    """Each message as the JSON converter would have written it (Connect schema embedded)."""
    reference = AvroDecoder(schemas.__getitem__, shortcut=False)
    out: list[Message] = []
    for topic, partition, offset, key, value in messages:
        parts: list[bytes | None] = []
        for is_key, data in ((True, key), (False, value)):
            if data is None:
                parts.append(None)
                continue
            try:
                schema_id, _ = split_frame(data, "x")
                compiled = reference.schema(schema_id)
                payload = read_record(compiled, data[5:], "key" if is_key else "value")
            except DecodeError:
                parts.append(data)
                continue
            doc = {"schema": compiled.connect, "payload": payload}
            parts.append(json.dumps(doc, separators=(",", ":")).encode())
        out.append((topic, partition, offset, parts[0], parts[1]))
    return out


def decode_all(decode: Callable[..., Any], prefix: str, messages: list[Message]) -> list[Any]:
    events: list[Any] = []
    for topic, partition, offset, key, value in messages:
        try:
            events.append(decode(topic, partition, offset, key, value, topic_prefix=prefix))
        except DecodeError as exc:
            events.append(("error", str(exc)))
    return events


def time_per_event(
    make: Callable[[], Callable[..., Any]], prefix: str, messages: list[Message], repeat: int
) -> list[float]:
    """CPU µs per event of each pass; the first pass (schemas compiled) is not timed.

    CPU time of this thread, not wall time: other processes on a shared machine then
    stretch the numbers far less.
    """
    decode = make()
    decode_all(decode, prefix, messages)
    samples = []
    for _ in range(repeat):
        start = time.thread_time()
        decode_all(decode, prefix, messages)
        samples.append((time.thread_time() - start) / len(messages) * 1e6)
    return samples


def run(path: Path, repeat: int, baseline_rev: str | None) -> None:
    prefix, schemas, messages = load(path)
    source = schemas.__getitem__
    variants: dict[str, Callable[[], Callable[..., Any]]] = {
        "avro": lambda: AvroDecoder(source).decode,
        "avro_payload": lambda: AvroDecoder(source, shortcut=False).decode,
    }
    if baseline_rev:
        old = module_at(baseline_rev)
        variants[f"avro_at_{baseline_rev}"] = lambda: old.AvroDecoder(source).decode
    expected = decode_all(variants["avro_payload"](), prefix, messages)
    for name, make in variants.items():
        got = decode_all(make(), prefix, messages)
        bad = [i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b]
        if bad:
            raise SystemExit(f"{name}: {len(bad)} events differ, first at message {bad[0]}")
    compiled = AvroDecoder(source)
    decode_all(compiled.decode, prefix, messages)
    print(f"messages the shortcut left to the payload path: {compiled.payload_path}")
    twins = json_twins(schemas, messages)
    json_events = decode_all(Decoder().decode, prefix, twins)
    same = sum(a == b for a, b in zip(json_events, expected, strict=True))
    kinds: dict[str, int] = {}
    for event in expected:
        kinds[type(event).__name__] = kinds.get(type(event).__name__, 0) + 1
    print(f"{len(messages)} messages {kinds}; JSON twins decode equal: {same}/{len(messages)}")
    # Interleave the variants' passes so that load from other processes hits them alike.
    samples: dict[str, list[float]] = {name: [] for name in [*variants, "json"]}
    for _ in range(repeat):
        for name, make in variants.items():
            samples[name] += time_per_event(make, prefix, messages, 1)
        samples["json"] += time_per_event(lambda: Decoder().decode, prefix, twins, 1)
    result = {name: round(statistics.median(s), 2) for name, s in samples.items()}
    for name, s in samples.items():
        print(f"{name:>24}: median {statistics.median(s):7.2f} µs/event  (min {min(s):.2f})")
    print(json.dumps({"messages": len(messages), "repeat": repeat, "us_per_event": result}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cap = sub.add_parser("capture", help="save a prefix's messages and their schemas")
    cap.add_argument("--prefix", required=True)
    cap.add_argument("--out", type=Path, default=REPO / ".stack/avro/messages.json")
    cap.add_argument("--limit", type=int, default=50_000)
    bench = sub.add_parser("run", help="decode the saved messages N times")
    bench.add_argument("--data", type=Path, default=REPO / ".stack/avro/messages.json")
    bench.add_argument("--repeat", type=int, default=7)
    bench.add_argument("--baseline-rev", help="also time the decoder module at this git rev")
    args = parser.parse_args()
    if args.command == "capture":
        capture(args.prefix, args.out, args.limit)
    else:
        run(args.data, args.repeat, args.baseline_rev)


if __name__ == "__main__":
    main()
