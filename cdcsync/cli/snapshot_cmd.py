"""``cdcsync snapshot``: the consistent initial copy (also the first phase of ``cdcsync run``)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from cdcsync.cli.main import app

console = Console(stderr=True)


class ProgressMode(StrEnum):
    auto = "auto"
    bars = "bars"
    log = "log"
    quiet = "quiet"


@app.command()
def snapshot(
    config: Annotated[Path | None, typer.Option("--config", help="YAML configuration file")] = None,
    allow_nonempty_target: Annotated[
        bool,
        typer.Option(
            "--allow-nonempty-target",
            help="empty (TRUNCATE) migrated target tables that hold rows, instead of refusing",
        ),
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option("--workers", min=1, help="parallel copy workers (default: CDCSYNC_WORKERS)"),
    ] = None,
    max_rate: Annotated[
        float | None,
        typer.Option("--max-rate", min=0.1, help="limit the copy to this many MB/s (all workers)"),
    ] = None,
    keep_snapshot: Annotated[
        float,
        typer.Option(
            "--keep-snapshot-seconds",
            min=0,
            help="after a crash, keep the exported snapshot this long so a re-run can resume",
        ),
    ] = 900.0,
    progress: Annotated[
        ProgressMode,
        typer.Option("--progress", help="auto: bars on a terminal, log lines otherwise"),
    ] = ProgressMode.auto,
) -> None:
    """Copy schema and data under the slot's exported snapshot, then indexes and a write fence.

    Run it again after any interruption: it finishes what is left.
    """
    import psycopg

    from cdcsync.config import load_settings
    from cdcsync.engine.stream import configure_logging
    from cdcsync.errors import CdcsyncError
    from cdcsync.snapshot.progress import Mode, Progress
    from cdcsync.snapshot.runner import run_snapshot

    settings = load_settings(config, workers=workers)
    configure_logging(settings.log_format)
    mode: Mode = progress.value
    if mode == "auto" and settings.log_format == "json":
        mode = "log"
    try:
        result = run_snapshot(
            settings,
            allow_nonempty=allow_nonempty_target,
            progress=Progress(mode),
            keep_snapshot_seconds=keep_snapshot,
            max_rate_mb_s=max_rate,
        )
    except psycopg.OperationalError as exc:
        raise CdcsyncError(
            f"a database connection failed during the snapshot: {str(exc).strip()}\n"
            "once the database is back, run cdcsync snapshot again: it continues from where "
            "it stopped"
        ) from exc
    except KeyboardInterrupt:
        console.print(
            f"interrupted: run cdcsync snapshot again within {keep_snapshot:.0f} s to finish "
            "under the same snapshot (later, it starts over)"
        )
        raise typer.Exit(130) from None
    if result.how == "done":
        console.print(f"migration {settings.migration_id} already has its snapshot; nothing to do")
    console.print(
        f"snapshot ({result.how}) of {len(result.tables)} table(s): {result.rows} rows, "
        f"{result.bytes / 1e6:.1f} MB at consistent point {result.consistent_point}; "
        f"slot {result.slot_name}, publication {result.publication_name}, "
        f"{result.sequences} sequence(s)"
    )
    for name in result.kept_objects:
        console.print(f"  kept existing {escape(name)}")
    for name in result.skipped_objects:
        console.print(
            f"  [yellow]not created[/] {escape(name)}: it references a table not migrated"
        )
    for step, seconds in result.timings.items():
        console.print(f"  {step}: {seconds:.2f}s")
