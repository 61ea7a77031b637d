"""``cdcsync run`` and ``cdcsync snapshot``."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cdcsync.cli.main import app
from cdcsync.config import load_settings

console = Console(stderr=True)
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML configuration file")]


@app.command()
def run(config: ConfigOpt = None) -> None:
    """The daemon: snapshot if none is recorded, then stream changes into the target."""
    from cdcsync.engine.migration import run as run_migration
    from cdcsync.engine.stream import configure_logging, install_signal_handlers

    settings = load_settings(config)
    configure_logging(settings.log_format)
    stop = threading.Event()
    install_signal_handlers(stop)
    raise typer.Exit(run_migration(settings, stop=stop))


@app.command()
def snapshot(
    config: ConfigOpt = None,
    allow_nonempty_target: Annotated[
        bool, typer.Option("--allow-nonempty-target", help="copy into non-empty target tables")
    ] = False,
) -> None:
    """Copy schema and data under the slot's exported snapshot, then indexes and a fence."""
    from cdcsync.engine.stream import configure_logging
    from cdcsync.snapshot.runner import run_snapshot

    settings = load_settings(config)
    configure_logging(settings.log_format)
    result = run_snapshot(settings, allow_nonempty=allow_nonempty_target)
    console.print(
        f"snapshot of {len(result.tables)} table(s): {result.rows} rows, "
        f"{result.bytes / 1e6:.1f} MB at consistent point {result.consistent_point}"
    )
    for step, seconds in result.timings.items():
        console.print(f"  {step}: {seconds:.2f}s")
