"""Entry point of the ``cdcsync`` command.

Each command group lives in its own module and registers itself on :data:`app`; this
module only wires them and maps :class:`~cdcsync.errors.CdcsyncError` to exit codes.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from cdcsync.errors import CdcsyncError

app = typer.Typer(
    name="cdcsync",
    help="Move a live PostgreSQL database to another with a measured write freeze.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True, soft_wrap=True)


def _register() -> None:
    # Imported for their side effect of adding commands to ``app``.
    from cdcsync.cli import (  # noqa: F401
        assess_cmd,
        backup_cmd,
        control_cmd,
        demo_cmd,
        plan_cmd,
        report_cmd,
        run_cmd,
        snapshot_cmd,
        stack_cmd,
        status_cmd,
        switch_cmd,
        verify_cmd,
    )


def main() -> None:
    """Run the CLI; known errors print one clear message and exit with their code."""
    _register()
    try:
        # Without standalone mode click returns a command's typer.Exit code instead of
        # exiting with it.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except CdcsyncError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(1)
    except typer.BadParameter as exc:
        exc.show()
        sys.exit(2)
    except Exception as exc:
        # Usage errors are click exceptions; typer re-exports their base class.
        show = getattr(exc, "show", None)
        code = getattr(exc, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code)
        raise


if __name__ == "__main__":
    main()
