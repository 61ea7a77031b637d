"""The fast decode path (orjson, per-topic schema plans) gives what the exact path gives.

Reference: a cold :class:`Decoder` forced onto the stdlib parser with floats kept as
text, which is how decoding worked before orjson and the cache.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdcsync.core import debezium
from cdcsync.core.debezium import Decoder, decode
from cdcsync.core.events import Event, RowChange
from cdcsync.core.pg_values import INEXACT_MARK, compile_converter, convert
from cdcsync.errors import DecodeError

SAMPLES: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "debezium_samples.json").read_text()
)["messages"]


def _bytes(text: str | None) -> bytes | None:
    return text.encode() if text is not None else None


def exact_decode(topic: str, key: bytes | None, value: bytes | None) -> tuple[str, Any]:
    """Outcome of decoding without orjson and without a warm cache."""
    saved = debezium._fast
    debezium._fast = debezium._exact
    try:
        return ("ok", Decoder().decode(topic, 0, 5, key, value, topic_prefix="dec"))
    except DecodeError as exc:
        return ("error", str(exc))
    finally:
        debezium._fast = saved


def fast_decode(decoder: Decoder, topic: str, key: bytes | None, value: bytes | None) -> Any:
    try:
        return ("ok", decoder.decode(topic, 0, 5, key, value, topic_prefix="dec"))
    except DecodeError as exc:
        return ("error", str(exc))


def test_samples_decode_the_same_cold_and_warm() -> None:
    decoder = Decoder()
    for _ in range(3):  # first round fills the cache, the others hit it
        for s in SAMPLES:
            key, value = _bytes(s["key"]), _bytes(s["value"])
            assert fast_decode(decoder, s["topic"], key, value) == exact_decode(
                s["topic"], key, value
            )
    assert decoder._cache, "the schema cache was never used"


def _with_double(text: str) -> tuple[str, bytes | None, bytes]:
    """The all_types insert with one double column set to a JSON number ``text``."""
    s = next(m for m in SAMPLES if m["topic"].endswith("all_types") and '"op":"c"' in m["value"])
    doc = json.loads(s["value"])
    after = doc["payload"]["after"]
    fields = next(f for f in doc["schema"]["fields"] if f["field"] == "after")["fields"]
    name = next(f["field"] for f in fields if f["type"] == "double")
    after[name] = "@@"
    raw = json.dumps(doc, separators=(",", ":")).replace('"@@"', text)
    return name, _bytes(s["key"]), raw.encode()


@pytest.mark.parametrize("text", ["1.0E10", "0.1", "-0.0", "1e-7", "3.4028235E38", "12"])
def test_double_keeps_its_json_text(text: str) -> None:
    name, key, value = _with_double(text)
    decoder = Decoder()
    for _ in range(2):  # cold, then through the cached schema and orjson
        event = decoder.decode("dec.public.all_types", 0, 1, key, value, topic_prefix="dec")
        assert isinstance(event, RowChange) and event.after is not None
        assert event.after[name] == text


def test_integer_beyond_64_bits_is_not_rounded() -> None:
    """orjson turns it into a float; the exact parser keeps it, and then it is refused."""
    name, key, value = _with_double("123456789012345678901234567890")
    decoder = Decoder()
    for _ in range(2):
        event = decoder.decode("dec.public.all_types", 0, 1, key, value, topic_prefix="dec")
        assert isinstance(event, RowChange) and event.after is not None
        assert event.after[name] == "123456789012345678901234567890"


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=6)
    | st.sampled_from(["__debezium_unavailable_value", "NaN", "1.5", "00ff", "AAE="]),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=6,
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.data())
def test_mutated_payloads_decode_as_the_exact_path_does(data: st.DataObject) -> None:
    s = data.draw(st.sampled_from([m for m in SAMPLES if m["value"]]))
    doc = json.loads(s["value"])
    node: Any = doc["payload"] if isinstance(doc, dict) and "payload" in doc else doc
    while isinstance(node, dict | list) and node:
        keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
        k = data.draw(st.sampled_from(keys))
        if not isinstance(node[k], dict | list) or data.draw(st.booleans()):
            node[k] = data.draw(_JSON)
            break
        node = node[k]
    try:
        value = json.dumps(doc, separators=(",", ":")).encode()
    except ValueError:
        return
    key = _bytes(s["key"])
    decoder = Decoder()
    # Warm the cache with the untouched message: the mutation then takes the fast path.
    with contextlib.suppress(DecodeError):
        decoder.decode(s["topic"], 0, 5, key, _bytes(s["value"]), topic_prefix="dec")
    assert fast_decode(decoder, s["topic"], key, value) == exact_decode(s["topic"], key, value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_bytes_after_a_known_schema_only_raise_decode_error(tail: bytes) -> None:
    s = next(m for m in SAMPLES if m["topic"].endswith("all_types") and m["value"])
    value = s["value"].encode()
    decoder = Decoder()
    decoder.decode(s["topic"], 0, 0, _bytes(s["key"]), value, topic_prefix="dec")
    head = value[: value.index(b',"payload":') + len(b',"payload":')]
    with contextlib.suppress(DecodeError):
        decoder.decode(s["topic"], 0, 1, _bytes(s["key"]), head + tail, topic_prefix="dec")


def _field_schemas() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for s in SAMPLES:
        if s["value"]:
            doc = json.loads(s["value"])
            for member in doc["schema"]["fields"]:
                out.extend(member.get("fields") or [])
    return out


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(_field_schemas()), _JSON | st.integers())
def test_compiled_converter_agrees_with_convert(schema: dict[str, Any], value: Any) -> None:
    def reference() -> Any:
        converted = convert(value, schema, "f")
        return converted.value if converted.exact else INEXACT_MARK

    outcomes = []
    for fn in (reference, lambda: compile_converter(schema, "f")(value)):
        try:
            outcomes.append(("ok", fn()))
        except DecodeError as exc:
            outcomes.append(("error", str(exc)))
        except Exception as exc:  # NeedsExactText for floats: decode re-parses then
            outcomes.append(("signal", type(exc).__name__))
    if outcomes[1] == ("signal", "NeedsExactText"):
        return
    assert outcomes[0] == outcomes[1]


def test_module_decode_shares_one_decoder() -> None:
    s = next(m for m in SAMPLES if m["topic"].endswith("all_types") and m["value"])
    first: Event = decode(
        s["topic"], 0, 1, _bytes(s["key"]), _bytes(s["value"]), topic_prefix="dec"
    )
    again = decode(s["topic"], 0, 1, _bytes(s["key"]), _bytes(s["value"]), topic_prefix="dec")
    assert first == again
    assert (s["topic"], False) in debezium._DEFAULT._cache
