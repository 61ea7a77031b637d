"""``cdcsync assess``: read both databases, list every risk with its fix; change nothing."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cdcsync.cli.main import app


class Output(StrEnum):
    text = "text"
    md = "md"
    json = "json"


@app.command()
def assess(
    config: Annotated[Path | None, typer.Option("--config", help="YAML configuration file")] = None,
    output: Annotated[
        Output, typer.Option("--output", "-o", help="text (tables), md (Markdown) or json")
    ] = Output.text,
    strict: Annotated[
        bool, typer.Option("--strict", help="exit 3 on warnings too, not only on errors")
    ] = False,
    audit_max_mb: Annotated[
        int,
        typer.Option(
            "--audit-max-mb",
            min=0,
            help="scan tables up to this size for data audits (duplicates, orphans, dates)",
        ),
    ] = 1024,
) -> None:
    """Discovery: tables, keys, types, sequences, FKs, triggers, extensions, WAL, slots, roles.

    Exits 0 when nothing blocks the migration, 3 when an error is found (with --strict,
    also for warnings).
    """
    import psycopg

    from cdcsync.adapters.discovery import discover
    from cdcsync.config import load_settings
    from cdcsync.core import findings as fnd
    from cdcsync.errors import CdcsyncError, PreconditionError

    settings = load_settings(config)
    try:
        facts = discover(settings, audit_max_bytes=audit_max_mb * 1024**2)
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CdcsyncError(f"assess could not read the catalogs: {reason}") from exc
    found = fnd.evaluate(facts)
    if output is Output.json:
        typer.echo(fnd.render_json(found, facts, strict=strict))
    elif output is Output.md:
        typer.echo(fnd.render_markdown(found, facts))
    else:
        Console(soft_wrap=False).print(fnd.text_renderable(found, facts))
    if fnd.exit_code(found, strict=strict):
        # An error, not typer.Exit: main() maps CdcsyncError to its exit code (3).
        counts = fnd.summary(found)
        raise PreconditionError(
            f"assess found {counts['error']} error(s) and {counts['warning']} warning(s)"
            + (" (--strict)" if strict and not counts["error"] else "")
        )
