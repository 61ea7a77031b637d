"""``cdcsync plan``: write the migration plan for review, or check an edited one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cdcsync.cli.main import app


@app.command()
def plan(
    config: Annotated[Path | None, typer.Option("--config", help="YAML configuration file")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="write the plan here (default: stdout)")
    ] = None,
    check: Annotated[
        Path | None,
        typer.Option("--check", help="check this plan against the source instead; exit 3 if bad"),
    ] = None,
) -> None:
    """Strategy: one entry per migrated table, to edit and commit; `run` follows it.

    Set ``CDCSYNC_PLAN`` (or ``plan:`` in the configuration) to the file for snapshot
    and streaming to honour it; a plan changed after the snapshot is refused.
    """
    from cdcsync.adapters.pg import connect
    from cdcsync.config import load_settings
    from cdcsync.core import plan as plan_mod
    from cdcsync.errors import PreconditionError
    from cdcsync.snapshot import catalog
    from cdcsync.snapshot.runner import plan_problems

    settings = load_settings(config)
    settings.require("source_dsn")
    with connect(settings.source_conninfo(), "source") as source:
        tables = catalog.list_tables(source, settings)
        if check is not None:
            loaded = plan_mod.load(check)
            infos = catalog.describe(source, loaded.included(tables))
            problems = plan_problems(source, loaded, infos)
            if problems:
                raise PreconditionError(f"plan {check}:\n  - " + "\n  - ".join(problems))
            kept = len(loaded.included(tables))
            typer.echo(
                f"plan {check} fits the source: {kept} of {len(tables)} tables migrated, "
                f"fingerprint {loaded.fingerprint()}"
            )
            return
        infos = catalog.describe(source, tables)
        replident = _replica_identities(source)
    text = render(infos, replident)
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        typer.echo(f"plan written to {output}: review it, edit it, commit it", err=True)


def _replica_identities(source: Any) -> dict[str, str]:
    rows = source.execute(
        "SELECT n.nspname || '.' || c.relname, c.relreplident FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p')"
    ).fetchall()
    return {str(name): str(ident) for name, ident in rows}


def render(infos: Any, replident: dict[str, str]) -> str:
    """The plan's YAML: every table included as it is, with the knobs shown as comments."""
    lines = [
        "# cdcsync migration plan: review it, edit it, commit it.",
        "# Check an edited plan with `cdcsync plan --check FILE`; point CDCSYNC_PLAN at it.",
        "# Per table: include, rename (its name on the target: name or schema.name),",
        "# filter (SQL over the source's columns; the table then needs REPLICA IDENTITY",
        "# FULL), columns (rename, cast: <type>, drop: true, transform: [trim, lower,",
        "# upper, {map: {from: to}}, {default_if_null: value}], or alone [{hook:",
        "# package.module:function}] for Python) and add (new required columns:",
        "# {type: <type>, default: <SQL>}).",
        "version: 1",
        "verify: checksum",
        "tables:",
    ]
    for info in infos:
        name = f"{info.table.schema}.{info.table.name}"
        lines.append(f"  {_quote(name)}:")
        lines.append("    include: true")
        lines.append(f"    # rename: {_quote(name)}")
        ident = {"f": "full", "d": "default", "n": "nothing", "i": "index"}.get(
            replident.get(name, "d"), "default"
        )
        lines.append(f'    # filter: "..."    # replica identity: {ident}')
        lines.append("    columns:")
        for col in info.columns:
            key = " (primary key)" if col.name in info.primary_key else ""
            lines.append(f"      {_quote(col.name)}: {{}}    # {col.type_name}{key}")
        lines.append("    # add:")
        lines.append("    #   new_column: {type: text, default: \"'value'\"}")
    return "\n".join(lines) + "\n"


def _quote(name: str) -> str:
    """A YAML key that stays a string whatever the identifier holds."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
