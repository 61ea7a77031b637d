"""``cdcsync verify``: compare source and target, inside each database, at a chosen depth.

Exit 0 when the two sides are equal; 3 (precondition not met) when they differ, after
the report is printed, so scripts and the cutover preflight can tell "differs" from
"could not run" (which fails before any report).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table

from cdcsync.cli.main import app

if TYPE_CHECKING:
    from cdcsync.config import Settings
    from cdcsync.core.events import TableId

console = Console()


def default_tables(settings: Settings) -> list[TableId]:
    """The snapshot's recorded tables, or the tables in scope on the source."""
    from cdcsync.adapters.pg import connect
    from cdcsync.core.events import TableId
    from cdcsync.snapshot.catalog import list_tables
    from cdcsync.snapshot.runner import migration_state

    with connect(settings.target_conninfo(), "target") as conn:
        found = migration_state(conn, settings)
    recorded = [TableId(str(s), str(n)) for s, n in (found[1].get("tables") or [])] if found else []
    if recorded:
        return recorded
    with connect(settings.source_conninfo(), "source") as conn:
        return list_tables(conn, settings)


def parse_tables(text: str) -> list[TableId]:
    """``schema.table,…`` (unquoted, case preserved; the first dot separates)."""
    from cdcsync.core.events import TableId
    from cdcsync.errors import ConfigError

    out: list[TableId] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        schema, dot, name = item.partition(".")
        if not dot or not schema or not name:
            raise ConfigError(f"--tables {item!r}: use schema.table")
        out.append(TableId(schema, name))
    if not out:
        raise ConfigError("--tables names no table")
    return out


def render(doc: dict[str, Any]) -> Group:
    """The report as tables for a terminal."""
    tables = Table(title=f"verification ({doc['level']})", title_justify="left")
    for col in ("table", "result", "source rows", "target rows", "ranges", "differences"):
        tables.add_column(col, justify="right" if "rows" in col or col == "ranges" else "left")
    details: list[str] = []
    for t in doc["tables"]:
        verdict = "[green]equal[/]" if t["ok"] else "[bold red]differs[/]"
        what: list[str] = []
        if t["error"]:
            what.append(t["error"])
        if t["differing_ranges"] and doc["level"] == "checksum":
            what.append(f"{len(t['differing_ranges'])} range(s)")
        if doc["level"] == "rows" and t["differing_rows"]:
            what.append(f"{t['differing_rows']} row(s)")
        if doc["level"] == "counts" and t["source_rows"] != t["target_rows"]:
            what.append("row counts")
        tables.add_row(
            escape(t["table"]),
            verdict,
            _n(t["source_rows"]),
            _n(t["target_rows"]),
            str(t["ranges"]),
            escape("; ".join(what)),
        )
        for label, key in (
            ("missing on target", "source_only"),
            ("extra on target", "target_only"),
            ("changed", "changed"),
        ):
            for k in t[key]:
                shown = ", ".join(f"{c}={v}" for c, v in k.items())
                details.append(f"{t['table']}: {label}: {shown}")
        for d in t["differing_ranges"] if doc["level"] == "checksum" else []:
            where = f"bucket {d['bucket']}" if d["bucket"] else f"[{d['lower']}, {d['upper']})"
            details.append(f"{t['table']}: {where}: {d['source_rows']} vs {d['target_rows']} rows")
        details.extend(f"{t['table']}: note: {n}" for n in t["notes"])
    rec = Table(title="reconciliation (row counts and numeric sums)", title_justify="left")
    for col in ("table", "result", "column", "source", "target"):
        rec.add_column(col, justify="right" if col in ("source", "target") else "left")
    for r in doc["reconciliation"]:
        verdict = "[green]equal[/]" if r["ok"] else "[bold red]differs[/]"
        rec.add_row(escape(r["table"]), verdict, "rows", _n(r["source_rows"]), _n(r["target_rows"]))
        for col, value in r["source_sums"].items():
            rec.add_row("", "", escape(col), _v(value), _v(r["target_sums"].get(col)))
    parts: list[Any] = [tables]
    if details:
        parts.append("\n".join(escape(d) for d in details))
    parts.append(rec)
    timings = doc["timings"]
    parts.append(
        f"{'equal' if doc['ok'] else 'DIFFERENT'} · {len(doc['tables'])} table(s) in "
        f"{timings.get('total_seconds', 0):.2f}s"
    )
    return Group(*parts)


def _v(value: str | None) -> str:
    return "-" if value is None else escape(value)


def _n(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


@app.command()
def verify(
    config: Annotated[Path | None, typer.Option("--config", help="YAML configuration file")] = None,
    tables: Annotated[
        str | None,
        typer.Option(
            "--tables",
            help="schema.table,… (default: the snapshot's tables, else every table in scope)",
        ),
    ] = None,
    level: Annotated[
        str, typer.Option("--level", help="counts, checksum (per key range) or rows (keys)")
    ] = "checksum",
    output: Annotated[str, typer.Option("--output", "-o", help="text or json")] = "text",
    workers: Annotated[
        int | None,
        typer.Option("--workers", min=1, help="connections per side (default: CDCSYNC_WORKERS)"),
    ] = None,
    max_keys: Annotated[
        int, typer.Option("--max-keys", min=1, help="keys listed per kind of difference (rows)")
    ] = 20,
) -> None:
    """Compare the migrated tables on source and target; exit 3 when they differ."""
    from cdcsync.config import load_settings
    from cdcsync.engine.verify import LEVELS, verify_tables
    from cdcsync.errors import ConfigError, PreconditionError

    if level not in LEVELS:
        raise ConfigError(f"--level {level!r}: use one of {', '.join(LEVELS)}")
    if output not in ("text", "json"):
        raise ConfigError(f"--output {output!r}: use text or json")
    settings = load_settings(config, workers=workers)
    settings.require("source_dsn", "target_dsn")
    chosen = parse_tables(tables) if tables is not None else default_tables(settings)
    lvl: Literal["counts", "checksum", "rows"] = level  # type: ignore[assignment]
    report = verify_tables(
        settings.source_conninfo(),
        settings.target_conninfo(),
        chosen,
        lvl,
        workers=settings.workers,
        state_schema=settings.state_schema,
        max_keys=max_keys,
    )
    doc = report.to_dict()
    if output == "json":
        print(json.dumps(doc), flush=True)
    else:
        console.print(render(doc))
    if not report.ok:
        differing = [t for t, n in doc["mismatches"].items() if n]
        raise PreconditionError(
            f"source and target differ in {len(differing)} table(s): "
            + ", ".join(differing[:10])
            + (" …" if len(differing) > 10 else "")
        )
