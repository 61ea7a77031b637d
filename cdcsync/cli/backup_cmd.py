"""``cdcsync backup``: a verified backup of the source, recorded in the migration state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cdcsync.cli.main import app

console = Console()


@app.command()
def backup(
    config: Annotated[Path | None, typer.Option("--config", help="YAML configuration file")] = None,
    directory: Annotated[
        Path, typer.Option("--dir", help="where the dump directory is created")
    ] = Path("cdcsync-backups"),
    jobs: Annotated[
        int | None,
        typer.Option("--jobs", min=1, help="parallel pg_dump/pg_restore jobs (default: workers)"),
    ] = None,
    compress: Annotated[
        int | None,
        typer.Option(
            "--compress", min=0, max=9, help="pg_dump --compress level (default: its own)"
        ),
    ] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="text or json")] = "text",
) -> None:
    """pg_dump the source (directory format), restore it into a scratch database, compare.

    The dump and the comparison read the source under one exported snapshot, so the
    check holds while changes stream. Exits 3 when the check fails (the failure is
    recorded too).
    """
    from cdcsync.cli.control_cmd import requester
    from cdcsync.config import load_settings
    from cdcsync.engine.backup import run_backup
    from cdcsync.errors import ConfigError, PreconditionError

    if output not in ("text", "json"):
        raise ConfigError(f"--output {output!r}: use text or json")
    settings = load_settings(config)
    result = run_backup(
        settings,
        directory,
        jobs=jobs or settings.workers,
        actor=requester(),
        argv={"dir": str(directory), "jobs": jobs, "compress": compress},
        compress=compress,
    )
    doc = result.as_dict()
    if output == "json":
        print(json.dumps(doc, indent=2, sort_keys=True), flush=True)
    else:
        check = doc["verification"]
        console.print(
            f"backup {doc['location']}: {len(doc['files'])} file(s), {doc['size_bytes']:,} bytes, "
            f"snapshot {doc['snapshot']}; "
            + (
                f"restored and equal at checksum level ({check.get('tables', 0)} table(s), "
                f"{check.get('rows', 0):,} rows) in {doc['seconds'].get('total', 0):.1f}s"
                if result.verified
                else "NOT verified"
            ),
            highlight=False,
            soft_wrap=True,
        )
    if not result.verified:
        raise PreconditionError(f"backup check failed: {doc['error']}")
