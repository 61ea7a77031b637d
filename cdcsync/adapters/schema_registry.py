"""Writer schemas by id from a schema registry, and the decoder ``kafka.format`` selects.

Schemas are read through the Confluent-compatible API (``GET …/schemas/ids/<id>``),
which Apicurio Registry serves under ``/apis/ccompat/v6`` of its root URL. An id names
one immutable schema, so each is fetched once per process. A registry that does not
answer is not bad input: it halts the stream (to be retried from the stored offsets)
and never sends a message to the dead-letter topic; an id the registry does not know is
bad input (:class:`~cdcsync.errors.DecodeError`).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from cdcsync.config import Settings
from cdcsync.core.avro_decode import AvroDecoder
from cdcsync.core.debezium import Decoder
from cdcsync.core.events import Event
from cdcsync.errors import ConfigError, DecodeError, HaltedError

CCOMPAT_PATH = "/apis/ccompat/v6"

#: ``decode(topic, partition, offset, key, value, *, topic_prefix)`` of either format.
MessageDecoder = Callable[..., Event]


class SchemaRegistryUnavailable(HaltedError):
    """The registry did not answer (down, unreachable, or failing): retry later."""


class RegistryClient:
    """Fetches writer schemas by id over HTTP, caching every schema it has seen."""

    def __init__(
        self, root_url: str, *, timeout: float = 10.0, attempts: int = 3, backoff: float = 0.5
    ) -> None:
        self.root_url = root_url.rstrip("/")
        self.api = self.root_url + CCOMPAT_PATH
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff
        self._cache: dict[int, str] = {}
        self._lock = threading.Lock()

    def schema(self, schema_id: int) -> str:
        """The schema's JSON text; DecodeError if unknown, SchemaRegistryUnavailable if unasked."""
        with self._lock:
            found = self._cache.get(schema_id)
        if found is not None:
            return found
        text = self._fetch(schema_id)
        with self._lock:
            self._cache[schema_id] = text
        return text

    def _fetch(self, schema_id: int) -> str:
        url = f"{self.api}/schemas/ids/{schema_id}"
        problem = ""
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(url, timeout=self.timeout) as resp:  # noqa: S310
                    body = json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    raise DecodeError(
                        f"schema id {schema_id} is not in the schema registry at {self.root_url}"
                    ) from None
                problem = f"HTTP {exc.code}"
                if exc.code < 500 and exc.code != 429:
                    break
                continue
            except (OSError, ValueError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            schema = body.get("schema") if isinstance(body, dict) else None
            if not isinstance(schema, str):
                raise DecodeError(
                    f"schema registry at {self.root_url} answered for schema id {schema_id} "
                    "without a schema"
                )
            return schema
        raise SchemaRegistryUnavailable(
            f"schema registry at {self.root_url} did not answer for schema id {schema_id} "
            f"after {self.attempts} attempts ({problem[:200]})"
        )


def decoder_for(settings: Settings) -> MessageDecoder:
    """The message decoder for ``kafka.format``: JSON envelopes, or Avro via the registry."""
    if settings.kafka.format == "avro":
        url = settings.kafka.schema_registry_url
        if not url:
            raise ConfigError("kafka.format is avro but kafka.schema_registry_url is not set")
        return AvroDecoder(RegistryClient(url).schema).decode
    return Decoder().decode  # bound: one call less per message than debezium.decode
