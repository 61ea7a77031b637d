"""``cdcsync run`` (``cdcsync snapshot`` lives in snapshot_cmd)."""

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
