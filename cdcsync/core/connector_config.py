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
