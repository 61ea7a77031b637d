"""``cdcsync stack``: the local stack of real services for development, tests and demos."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cdcsync.cli.main import app
from cdcsync.stack import install
from cdcsync.stack.local import SERVICES, LocalStack, default_dir

stack_app = typer.Typer(help="Run PostgreSQL, Kafka and Kafka Connect locally, without Docker.")
app.add_typer(stack_app, name="stack")
console = Console()

DirOpt = Annotated[
    Path | None,
    typer.Option("--dir", help="stack directory [default: $CDCSYNC_STACK_DIR or ./.stack]"),
]


def _stack(directory: Path | None, ports: dict[str, int] | None = None) -> LocalStack:
    return LocalStack(directory or default_dir(), ports)


@stack_app.command("install")
def install_(
    extras: Annotated[
        bool, typer.Option("--all", help="also pgbouncer, prometheus and pgcopydb")
    ] = False,
) -> None:
    """Install missing Debian packages (as root) and resolve the JVM jars into the cache."""
    commands = install.CORE_COMMANDS + (install.EXTRA_COMMANDS if extras else ())
    report = install.ensure_commands(commands, install=True)
    console.print(
        f"debian packages: {', '.join(report.installed) or 'nothing to install'} "
        f"({report.seconds:.1f}s)"
    )
    folder, jars = install.resolve_jars()
    console.print(
        f"jars: {folder} ({'resolved' if jars.installed else 'cached'}, {jars.seconds:.1f}s)"
    )


@stack_app.command()
def up(
    directory: DirOpt = None,
    services: Annotated[
        list[str] | None,
        typer.Argument(help=f"services to start (default all: {', '.join(SERVICES)})"),
    ] = None,
    source_port: Annotated[int | None, typer.Option(help="fixed source port")] = None,
    target_port: Annotated[int | None, typer.Option(help="fixed target port")] = None,
    kafka_port: Annotated[int | None, typer.Option(help="fixed Kafka port")] = None,
    connect_port: Annotated[int | None, typer.Option(help="fixed Connect REST port")] = None,
    no_install: Annotated[
        bool, typer.Option("--no-install", help="never install packages, fail instead")
    ] = False,
) -> None:
    """Start the stack (idempotent: running services are left alone, dead ones restarted)."""
    ports = {
        k: v
        for k, v in {
            "source": source_port,
            "target": target_port,
            "kafka": kafka_port,
            "connect": connect_port,
        }.items()
        if v
    }
    stack = _stack(directory, ports)
    stack.up(tuple(services or SERVICES), install_missing=not no_install)
    for name, seconds in stack.timings.items():
        if seconds >= 0.05:
            console.print(f"{name}: {seconds:.1f}s")
    _print_status(stack)


@stack_app.command()
def down(directory: DirOpt = None) -> None:
    """Stop every service by PID; fails if a process or port is left behind."""
    _stack(directory).down()
    console.print("stack stopped")


@stack_app.command()
def status(
    directory: DirOpt = None,
    output: Annotated[str, typer.Option("--output", "-o", help="text or json")] = "text",
) -> None:
    """Each service's state, PID, port and log file."""
    stack = _stack(directory)
    if output == "json":
        typer.echo(json.dumps(stack.status(), indent=2))
        return
    _print_status(stack)


@stack_app.command()
def env(directory: DirOpt = None) -> None:
    """Print `export` lines for CDCSYNC_SOURCE_DSN, _TARGET_DSN, _KAFKA_BOOTSTRAP, _CONNECT_URL."""
    typer.echo(_stack(directory).env_lines(), nl=False)


def _print_status(stack: LocalStack) -> None:
    table = Table("service", "state", "pid", "port", "log")
    for name, entry in stack.status()["services"].items():
        table.add_row(
            name,
            entry["state"],
            str(entry.get("pid") or ""),
            str(entry.get("port") or ""),
            entry.get("log", ""),
        )
    console.print(table)
