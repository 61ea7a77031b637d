"""Render a Debezium connector configuration from a template in ``connectors/``.

Templates hold ``${name}`` placeholders; rendering fails on any placeholder left
unfilled, so a typo never reaches Kafka Connect as a literal. Passwords are never
rendered in: the template receives a reference (``${file:<path>:<key>}``) that the
Connect worker's file config provider resolves on its side.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable, Mapping

from cdcsync.core.events import TableId
from cdcsync.errors import ConfigError

_PLACEHOLDER = re.compile(r"\$\{(?!file:)[a-z_]+\}")


def render(
    template: str, values: Mapping[str, str], extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The template's JSON with placeholders filled, then ``extra`` merged over it."""
    try:
        raw = json.loads(template)
    except ValueError as exc:
        raise ConfigError(f"connector template is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError("connector template must be a JSON object")
    out: dict[str, str] = {}
    for key, value in raw.items():
        filled = string.Template(str(value)).safe_substitute(values)
        if _PLACEHOLDER.search(filled):
            raise ConfigError(f"connector template: {key} has an unfilled placeholder {filled!r}")
        out[key] = filled
    out.update(extra or {})
    return out


def table_include_list(tables: Iterable[TableId]) -> str:
    """Debezium's ``table.include.list``: anchored regexes of ``schema.table``."""
    return ",".join(re.escape(f"{t.schema}.{t.name}") for t in sorted(tables))


AVRO_CONVERTER = "io.apicurio.registry.utils.converter.AvroConverter"


def converter_settings(event_format: str, registry_url: str | None) -> dict[str, str]:
    """Key and value converter properties for ``kafka.format``; none for ``json``.

    Avro: Apicurio's converter registers each schema through the registry's own API and
    writes Confluent's framing (magic byte 0, 4-byte content id, Avro body) with nothing
    in headers, which cdcsync reads by id through the Confluent-compatible API. Avro
    names allow only letters, digits and ``_``: Debezium escapes every other character
    (and ``_`` itself) as ``_uXXXX`` in field and schema names, a reversible mapping the
    decoder undoes, so columns such as ``"Mixed Case"`` keep their names.
    """
    if event_format == "json":
        return {}
    if event_format != "avro":
        raise ConfigError(f"kafka.format {event_format!r}: use json or avro")
    if not registry_url:
        raise ConfigError("kafka.format is avro but kafka.schema_registry_url is not set")
    api = registry_url.rstrip("/") + "/apis/registry/v2"
    out = {
        "schema.name.adjustment.mode": "avro_unicode",
        "field.name.adjustment.mode": "avro_unicode",
    }
    for side in ("key", "value"):
        prefix = f"{side}.converter"
        out[prefix] = AVRO_CONVERTER
        out[f"{prefix}.apicurio.registry.url"] = api
        out[f"{prefix}.apicurio.registry.auto-register"] = "true"
        out[f"{prefix}.apicurio.registry.find-latest"] = "true"
        out[f"{prefix}.apicurio.registry.headers.enabled"] = "false"
        out[f"{prefix}.apicurio.registry.as-confluent"] = "true"
        out[f"{prefix}.apicurio.registry.use-id"] = "contentId"
    return out
