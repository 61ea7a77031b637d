"""``cdcsync cutover``, ``rollback``, ``abort`` and ``finalize``: the on-call commands.

The protocol lives in :mod:`cdcsync.engine.switch`; this module parses options, asks
for confirmation where a person is there to give it (never without a terminal), and
prints each step as it finishes. Exit codes: 0 done, 2 usage, 3 precondition not met,
4 aborted safely, 5 state unknown (page someone), 75 another switch holds the lock.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console

from cdcsync.cli.control_cmd import requester
from cdcsync.cli.main import app
from cdcsync.config import Settings, load_settings
from cdcsync.errors import ConfigError

console = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML configuration file")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")]
OutputOpt = Annotated[str, typer.Option("--output", help="text or json")]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="check the gates, print the steps, change nothing")
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="finish a switch a crash interrupted")]
VerifyOpt = Annotated[
    str | None, typer.Option("--verify", help="none, counts or checksum (under the freeze)")
]
FreezeOpt = Annotated[
    float | None,
    typer.Option("--freeze-timeout", help="seconds the write freeze may last (default 10)"),
]
LagOpt = Annotated[
    float | None,
    typer.Option("--max-lag", help="refuse when the applier is this many seconds behind"),
]
HookOpt = Annotated[
    str | None,
    typer.Option("--on-switch", help="command run after the switch, with the new primary in env"),
]
AckOpt = Annotated[
    bool,
    typer.Option("--ack-dead-letters", help="accept the dead letters recorded so far as handled"),
]


def _confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise ConfigError(f"{question}: no terminal to confirm on; pass --yes")
    if not typer.confirm(question, default=False):
        raise typer.Exit(1)


def _switch(
    kind: Literal["cutover", "rollback"],
    *,
    config: Path | None,
    yes: bool,
    dry_run: bool,
    resume: bool,
    verify: str | None,
    freeze_timeout: float | None,
    max_lag: float | None,
    on_switch: str | None,
    ack_dead_letters: bool,
    output: str,
) -> None:
    from cdcsync.core.switchover import Kind
    from cdcsync.engine import switch

    if output not in ("text", "json"):
        raise ConfigError(f"--output must be text or json, not {output!r}")
    if verify is not None and verify not in ("none", "counts", "checksum"):
        raise ConfigError(f"--verify must be none, counts or checksum, not {verify!r}")
    settings = load_settings(config)
    settings.require("source_dsn", "target_dsn", "kafka_bootstrap", "connect_url")
    defaults = settings.cutover
    options = switch.Options(
        verify=verify or defaults.verify,  # type: ignore[arg-type]
        freeze_timeout=freeze_timeout or defaults.freeze_timeout_seconds,
        max_lag=defaults.max_lag_seconds if max_lag is None else max_lag,
        on_switch=on_switch or defaults.on_switch,
        dry_run=dry_run,
        resume=resume,
        actor=requester(),
        argv=_argv(
            dry_run=dry_run,
            resume=resume,
            verify=verify,
            freeze_timeout=freeze_timeout,
            max_lag=max_lag,
            on_switch=bool(on_switch),
        ),
    )
    if not dry_run:
        target = "target" if kind == "cutover" else "source"
        _confirm(f"{kind} migration {settings.migration_id} (the {target} becomes primary)?", yes)
        if ack_dead_letters:
            switch.acknowledge_dead_letters(settings, "forward" if kind == "cutover" else "reverse")
    say = (lambda line: console.print(line, highlight=False)) if output == "text" else _quiet
    report = switch.Switcher(settings, Kind(kind), options, say=say).run()
    _show(report.as_dict(), output)


def _quiet(line: str) -> None:
    del line


def _argv(**values: Any) -> dict[str, Any]:
    """The command's options for the audit trail (the hook only as present or not)."""
    return {k: v for k, v in values.items() if v not in (None, False)}


def _show(doc: dict[str, Any], output: str) -> None:
    if output == "json":
        print(json.dumps(doc, indent=2, sort_keys=True))
        return
    out = Console(soft_wrap=True)
    if doc.get("result", "").startswith("dry-run"):
        out.print(f"[bold]{doc['kind']} {doc['migration_id']}: {doc['result']}[/]")
        for gate in doc.get("gates", []):
            mark = "✅" if gate["ok"] else ("❌" if gate.get("blocking", True) else "⚠️")
            out.print(f"  {mark} {gate['name']}: {gate['detail']}", highlight=False)
        out.print("steps:")
        for line in str(doc.get("message", "")).splitlines():
            out.print(f"  {line}", highlight=False)
        return
    out.print(f"[bold]{doc['kind']} {doc['migration_id']}: {doc['result']}[/]")
    for step, seconds in doc.get("steps", {}).items():
        out.print(f"  {step:<10} {seconds * 1000:9.1f} ms", highlight=False)
    if doc.get("freeze_seconds") is not None:
        out.print(f"  write freeze: {doc['freeze_seconds'] * 1000:.1f} ms", highlight=False)
    for name, lsn in doc.get("positions", {}).items():
        out.print(f"  {name}: {lsn}", highlight=False)
    if doc.get("verification"):
        out.print(f"  verification: {doc['verification']}", highlight=False)


def _switch_command(kind: Literal["cutover", "rollback"], doc: str) -> None:
    """Register ``cdcsync cutover`` or ``rollback``: one protocol, the same options."""

    def command(
        config: ConfigOpt = None,
        yes: YesOpt = False,
        dry_run: DryRunOpt = False,
        resume: ResumeOpt = False,
        verify: VerifyOpt = None,
        freeze_timeout: FreezeOpt = None,
        max_lag: LagOpt = None,
        on_switch: HookOpt = None,
        ack_dead_letters: AckOpt = False,
        output: OutputOpt = "text",
    ) -> None:
        _switch(
            kind,
            config=config,
            yes=yes,
            dry_run=dry_run,
            resume=resume,
            verify=verify,
            freeze_timeout=freeze_timeout,
            max_lag=max_lag,
            on_switch=on_switch,
            ack_dead_letters=ack_dead_letters,
            output=output,
        )

    command.__doc__ = doc
    app.command(name=kind)(command)


_switch_command(
    "cutover", "Freeze the source, drain, verify, switch to the target, arm the way back."
)
_switch_command(
    "rollback", "The cutover in the other direction: the old source becomes primary again."
)


@app.command()
def abort(config: ConfigOpt = None, yes: YesOpt = False, output: OutputOpt = "text") -> None:
    """Undo a cutover or rollback that has not committed: the old primary takes writes."""
    from cdcsync.engine import switch

    settings = _settings(config)
    _confirm(f"abort the switch in progress of {settings.migration_id}?", yes)
    what = switch.abort_switch(settings, requester(), {})
    _done({"result": "aborted", "detail": what}, output)


@app.command()
def finalize(
    config: ConfigOpt = None,
    confirm: Annotated[
        str | None, typer.Option("--confirm", help="the migration id, to say you mean it")
    ] = None,
    output: OutputOpt = "text",
) -> None:
    """Make the move final: drop connectors, slots, publications and fences."""
    from cdcsync.engine import switch

    settings = _settings(config)
    if confirm != settings.migration_id:
        raise ConfigError(
            f"finalize removes the way back: pass --confirm {settings.migration_id} to proceed"
        )
    removed = switch.finalize_migration(settings, requester(), {"confirm": confirm})
    _done({"result": "finalized", "removed": removed}, output)


def _settings(config: Path | None) -> Settings:
    settings = load_settings(config)
    settings.require("source_dsn", "target_dsn", "connect_url")
    return settings


def _done(doc: dict[str, Any], output: str) -> None:
    if output == "json":
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        Console(soft_wrap=True).print(
            "\n".join(f"{k}: {v}" for k, v in doc.items()), highlight=False
        )
