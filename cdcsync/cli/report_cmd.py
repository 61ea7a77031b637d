"""``cdcsync report``: the final migration report, phase by phase, from recorded state."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cdcsync.cli.main import app


@app.command()
def report(
    config: Annotated[Path | None, typer.Option("--config", help="YAML configuration file")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="md (Markdown) or html")] = "md",
    out: Annotated[
        Path | None, typer.Option("--out", help="write the report here (default: stdout)")
    ] = None,
) -> None:
    """Discovery, Strategy, Preparation, Execution, Verification & Cleanup: ✅ / ⚠️ / 🚧 each.

    Reads only (the target's state and audit trail, a read-only discovery); exits 0
    whatever the verdict, which the report states.
    """
    from cdcsync.config import load_settings
    from cdcsync.core import report_model as rm
    from cdcsync.engine.report import gather
    from cdcsync.errors import ConfigError

    if fmt not in ("md", "html"):
        raise ConfigError(f"--format {fmt!r}: use md or html")
    settings = load_settings(config)
    built = rm.build(gather(settings))
    text = rm.render_html(built) if fmt == "html" else rm.render_markdown(built)
    if out is None:
        typer.echo(text, nl=False)
        return
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--out {out}: {exc.strerror}") from exc
    typer.echo(f"report written to {out} ({'complete' if built.complete else 'not complete'})")
