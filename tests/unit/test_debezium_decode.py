"""Decoding real Debezium messages, and never raising anything but DecodeError."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdcsync.core.debezium import decode
from cdcsync.core.events import (
    UNAVAILABLE,
    Heartbeat,
    LogicalMessage,
    Op,
    RowChange,
    TableId,
    Tombstone,
    Truncate,
)
from cdcsync.errors import DecodeError

SAMPLES: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "debezium_samples.json").read_text()
)["messages"]


def sample(topic_suffix: str, op: str | None) -> dict[str, Any]:
    for s in SAMPLES:
        value = json.loads(s["value"]) if s["value"] else None
        got = value["payload"].get("op") if value else None
        if s["topic"].endswith(topic_suffix) and got == op:
            return s
    raise LookupError(topic_suffix)


def run(s: dict[str, Any], **changes: Any) -> Any:
    key = s["key"].encode() if s["key"] else None
    value = s["value"].encode() if s["value"] is not None else None
    return decode(
        changes.get("topic", s["topic"]),
        0,
        7,
        changes.get("key", key),
        changes.get("value", value),
        topic_prefix="dec",
    )


def test_typed_insert_is_exact_except_arrays() -> None:
    event = run(sample("all_types", "c"))
    assert isinstance(event, RowChange) and event.op is Op.INSERT and event.after is not None
    assert event.table == TableId("public", "all_types")
    assert event.key == {"id": event.after["id"]}
    assert event.position.offset == 7 and event.source.lsn and event.source.tx_id
    assert {"ai", "at"} <= event.inexact


def test_toast_placeholder_and_keyless_shapes() -> None:
    upd = run(sample("docs", "u"))
    assert isinstance(upd, RowChange) and upd.after is not None
    assert upd.after["body"] is UNAVAILABLE and upd.before is None
    keyless = run(sample("events_nokey", "u"))
    assert isinstance(keyless, RowChange) and keyless.key == {} and keyless.before is not None
    assert isinstance(run(sample("events_nokey", None)), Tombstone)


def test_truncate_message_heartbeat() -> None:
    assert isinstance(run(sample("all_types", "t")), Truncate)
    msg = run(sample(".message", "m"))
    assert isinstance(msg, LogicalMessage) and msg.prefix == "cdcsync.drain"
    assert isinstance(run(sample("heartbeat.dec", None)), Heartbeat)


def _mutations(doc: Any) -> st.SearchStrategy[Any]:
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.text(max_size=5),
        st.floats(allow_nan=False),
        st.just([]),
        st.just({}),
    )
    return st.recursive(
        leaves,
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
        max_leaves=8,
    )


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=200), st.one_of(st.none(), st.binary(max_size=50)))
def test_arbitrary_bytes_only_raise_decode_error(value: bytes, key: bytes | None) -> None:
    with contextlib.suppress(DecodeError):
        decode("dec.public.t", 0, 0, key, value, topic_prefix="dec")


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.data())
def test_mutated_real_messages_only_raise_decode_error(data: st.DataObject) -> None:
    s = data.draw(st.sampled_from([m for m in SAMPLES if m["value"]]))
    doc = json.loads(s["value"])
    # Replace one node somewhere in the payload with arbitrary JSON.
    path: list[Any] = []
    node: Any = doc
    while isinstance(node, dict | list) and node and data.draw(st.booleans()):
        k = data.draw(
            st.sampled_from(list(node.keys()) if isinstance(node, dict) else list(range(len(node))))
        )
        path.append(k)
        node = node[k]
    replacement = data.draw(_mutations(node))
    if path:
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        parent[path[-1]] = replacement
    else:
        doc = replacement
    with contextlib.suppress(DecodeError):
        decode(
            s["topic"],
            0,
            0,
            s["key"].encode() if s["key"] else None,
            json.dumps(doc).encode(),
            topic_prefix="dec",
        )


@pytest.mark.parametrize(
    ("value", "field"),
    [
        (b"not json", None),
        (b'{"schema": 5, "payload": {}}', "value.schema"),
        (b'{"payload": {"op": "x"}, "schema": null}', "payload.op"),
        (b"[1,2]", "payload"),
        (b'{"op": "c", "after": {"id": 1}}', "payload.source"),
    ],
)
def test_malformed_messages_name_the_problem(value: bytes, field: str | None) -> None:
    with pytest.raises(DecodeError) as err:
        decode("dec.public.t", 0, 0, None, value, topic_prefix="dec")
    if field:
        assert field in str(err.value)


def test_topic_outside_the_prefix_is_refused() -> None:
    with pytest.raises(DecodeError, match="not under the migration's prefix"):
        run(sample("all_types", "c"), topic="other.public.all_types")


def test_key_that_disagrees_with_the_row_is_refused() -> None:
    s = sample("all_types", "c")
    key = json.loads(s["key"])
    key["payload"]["id"] = 999999
    with pytest.raises(DecodeError, match="key"):
        run(s, key=json.dumps(key).encode())
