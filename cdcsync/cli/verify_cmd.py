"""``cdcsync verify``: compare source and target, inside each database, at a chosen depth.

Exit 0 when the two sides are equal; 3 (precondition not met) when they differ, after
the report is printed, so scripts and the cutover preflight can tell "differs" from
"could not run" (which fails before any report).

Each run's progress is kept in the target's state schema, so ``--resume`` continues an
interrupted run from the ranges it had compared; the finished run's summary (with the
reconciliation totals) goes to the migration's state, where ``cdcsync report`` reads
it. ``--repair`` re-copies what differs, only while the target is fenced, and checks it
again (exit 0 when the re-check is clean). ``--continuous`` keeps re-verifying what
changed while the stream runs, until SIGTERM or SIGINT (exit 3 if the last pass found a
persistent difference).
"""

from __future__ import annotations

import json
from collections.abc import Callable
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
    from cdcsync.engine.verify import VerifyReport
    from cdcsync.engine.verify_continuous import PassReport

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
        str | None,
        typer.Option(
            "--level",
            help="counts, checksum (per key range) or rows (keys); default: the plan's "
            "verify level, else checksum",
        ),
    ] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="text or json")] = "text",
    workers: Annotated[
        int | None,
        typer.Option("--workers", min=1, help="connections per side (default: CDCSYNC_WORKERS)"),
    ] = None,
    max_keys: Annotated[
        int, typer.Option("--max-keys", min=1, help="keys listed per kind of difference (rows)")
    ] = 20,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue the latest interrupted run (or --run-id)")
    ] = False,
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="the interrupted run --resume continues")
    ] = None,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="re-copy differing ranges from the source (only while the target is fenced)",
        ),
    ] = False,
    continuous: Annotated[
        bool, typer.Option("--continuous", help="re-verify changed ranges every --interval")
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, help="seconds between continuous passes")
    ] = 30.0,
    passes: Annotated[
        int | None, typer.Option("--passes", min=1, help="stop after this many passes")
    ] = None,
    sweep: Annotated[
        int,
        typer.Option("--sweep", min=1, help="every range is re-checked at least every N passes"),
    ] = 10,
    range_bytes: Annotated[
        int | None,
        typer.Option("--range-bytes", min=1, help="bytes per top-level key range (default 8 MiB)"),
    ] = None,
) -> None:
    """Compare the migrated tables on source and target; exit 3 when they differ."""
    from cdcsync.config import load_settings
    from cdcsync.core import plan as plan_mod
    from cdcsync.engine.verify import LEVELS
    from cdcsync.errors import ConfigError

    if level is None:
        planned = load_settings(config).plan
        level = (plan_mod.load(planned).verify_level if planned else None) or "checksum"
    if level == "none":
        raise ConfigError("the plan's verify level is none: give --level to verify anyway")
    if level not in LEVELS:
        raise ConfigError(f"--level {level!r}: use one of {', '.join(LEVELS)}")
    if output not in ("text", "json"):
        raise ConfigError(f"--output {output!r}: use text or json")
    if run_id is not None and not resume:
        raise ConfigError("--run-id names the run to resume: give --resume too")
    if continuous and (repair or resume):
        raise ConfigError("--continuous cannot be combined with --repair or --resume")
    if repair and level == "counts":
        raise ConfigError("--repair needs --level checksum or rows: counts cannot tell where")
    settings = load_settings(config, workers=workers)
    settings.require("source_dsn", "target_dsn")
    chosen = parse_tables(tables) if tables is not None else None
    lvl: Literal["counts", "checksum", "rows"] = level  # type: ignore[assignment]
    if continuous:
        _continuous(settings, chosen, output, interval, passes, sweep, max_keys, range_bytes)
        return
    _once(settings, chosen, lvl, output, max_keys, resume, run_id, repair, range_bytes)


def _once(
    settings: Settings,
    chosen: list[TableId] | None,
    level: Literal["counts", "checksum", "rows"],
    output: str,
    max_keys: int,
    resume: bool,
    run_id: str | None,
    repair: bool,
    range_bytes: int | None,
) -> None:
    from cdcsync.engine.verify import run_options, under_plan, verify_tables
    from cdcsync.engine.verify_repair import repair as repair_ranges
    from cdcsync.engine.verify_repair import require_fenced
    from cdcsync.engine.verify_store import RunStore
    from cdcsync.errors import PreconditionError

    target_dsn = settings.target_conninfo()
    schema, mig = settings.state_schema, settings.migration_id
    plan, reverse = under_plan(settings)
    options = run_options(plan, reverse)
    if resume:
        store, recorded = RunStore.resume(target_dsn, schema, mig, run_id, level, chosen, options)
        chosen = recorded
    else:
        chosen = chosen if chosen is not None else default_tables(settings)
        if repair:
            require_fenced(target_dsn, chosen, mig, schema=schema)  # before spending a verification
        store = RunStore.start(target_dsn, schema, mig, level, chosen, options)
    try:
        report = verify_tables(
            settings.source_conninfo(),
            target_dsn,
            chosen,
            level,
            workers=settings.workers,
            state_schema=schema,
            max_keys=max_keys,
            progress=store,
            range_bytes=range_bytes,
            run_id=store.run_id,
            plan=plan,
            reverse=reverse,
        )
        store.finish(report)
    finally:
        store.close()
    doc = report.to_dict()
    fixed = None
    if repair and not report.ok:
        fixed = repair_ranges(settings, report, workers=settings.workers)
        doc["repair"] = fixed.to_dict()
    if output == "json":
        print(json.dumps(doc), flush=True)
    else:
        console.print(render(doc))
        if fixed is not None:
            console.print(render_repair(doc["repair"]))
    if fixed is not None:
        if not fixed.ok:
            raise PreconditionError(
                f"repaired {len(fixed.repaired)} range(s), but the re-check still finds "
                "differences (changes in flight while streaming? run cdcsync verify again)"
            )
        return
    if not report.ok:
        differing = [t for t, n in doc["mismatches"].items() if n]
        raise PreconditionError(
            f"source and target differ in {len(differing)} table(s): "
            + ", ".join(differing[:10])
            + (" …" if len(differing) > 10 else "")
        )


def render_repair(doc: dict[str, Any]) -> Group:
    """What a repair copied, and its re-check."""
    table = Table(title="repair (re-copied from the source)", title_justify="left")
    for col in ("table", "range", "deleted", "copied", "seconds"):
        table.add_column(col, justify="left" if col in ("table", "range") else "right")
    for r in doc["repaired"]:
        where = "whole table" if r["whole_table"] else f"[{r['lower']}, {r['upper']})"
        table.add_row(
            escape(r["table"]),
            escape(where),
            _n(r["deleted"]),
            _n(r["copied"]),
            f"{r['seconds']:.2f}",
        )
    verdict = "equal" if doc["ok"] else "STILL DIFFERENT"
    return Group(table, f"re-check of the repaired ranges: {verdict}")


def _continuous(
    settings: Settings,
    chosen: list[TableId] | None,
    output: str,
    interval: float,
    passes: int | None,
    sweep: int,
    max_keys: int,
    range_bytes: int | None,
) -> None:
    import signal
    import threading

    from cdcsync.adapters.pg import connect
    from cdcsync.engine.verify import under_plan
    from cdcsync.engine.verify_continuous import run_continuous
    from cdcsync.engine.verify_store import ensure_tables, record
    from cdcsync.errors import PreconditionError

    tables = chosen if chosen is not None else default_tables(settings)
    plan, reverse = under_plan(settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with connect(settings.target_conninfo(), "target", autocommit=True) as state:
        ensure_tables(state, settings.state_schema)

        def on_pass(p: PassReport) -> None:
            doc = p.to_dict()
            if p.number > 0:  # a difference counts once a second pass confirms it
                mismatches = {t: len(p.persistent.get(t, [])) for t in tables}
                record(
                    state,
                    settings.state_schema,
                    settings.migration_id,
                    _confirmed(p, mismatches),
                    continuous={"pass": p.number, "transient": doc["transient"]},
                )
            if output == "json":
                print(json.dumps(doc), flush=True)
            else:
                console.print(_pass_line(doc))

        last = run_continuous(
            settings.source_conninfo(),
            settings.target_conninfo(),
            tables,
            interval=interval,
            passes=passes,
            sweep=sweep,
            workers=settings.workers,
            state_schema=settings.state_schema,
            max_keys=max_keys,
            range_bytes=range_bytes,
            stop=stop,
            on_pass=on_pass,
            settle=_drain_step(settings),
            plan=plan,
            reverse=reverse,
        )
    if not last.ok:
        raise PreconditionError(
            "persistent differences in "
            + ", ".join(f"{t} ({len(k)} key(s))" for t, k in last.persistent.items() if k)
        )


def _drain_step(settings: Settings) -> Callable[[], None] | None:
    """The cutover's drain (prove the applier has applied what the source committed so
    far), when Kafka and Connect are configured; None otherwise."""
    if not settings.kafka_bootstrap or not settings.connect_url:
        return None

    def settle() -> None:
        from cdcsync.adapters.connect_rest import ConnectClient
        from cdcsync.adapters.pg import connect
        from cdcsync.engine.drain import drain

        with (
            connect(settings.source_conninfo(), "source", autocommit=True) as source,
            connect(settings.target_conninfo(), "target") as target,
        ):
            drain(
                source=source,
                target=target,
                connect=ConnectClient(settings.connect_url),
                connector=settings.connector_name,
                bootstrap=settings.kafka_bootstrap,
                topic_prefix=settings.topic_prefix,
                migration_id=settings.migration_id,
                state_schema=settings.state_schema,
                timeout=120.0,
            )

    return settle


def _confirmed(p: PassReport, mismatches: dict[TableId, int]) -> VerifyReport:
    """A report whose mismatches are the pass's persistent differences only."""
    from cdcsync.engine.verify import TableResult
    from cdcsync.engine.verify import VerifyReport as Report

    rows = {r.table: r for r in p.report.tables}
    tables = []
    for t, n in mismatches.items():
        r = TableResult(t, "rows", source_rows=None, target_rows=None)
        r.differing_rows = n
        seen = rows.get(t)
        if seen is not None:
            r.source_rows = r.target_rows = seen.source_rows
        tables.append(r)
    return Report("rows", tables, {}, {}, partial=True)


def _pass_line(doc: dict[str, Any]) -> str:
    checked = sum(doc["checked_ranges"].values())
    total = sum(doc["ranges"].values())
    transient = sum(doc["transient"].values())
    persistent = doc["persistent"]
    line = (
        f"pass {doc['pass']}: {checked}/{total} range(s) checked in {doc['seconds']:.2f}s, "
        f"{transient} transient difference(s)"
    )
    if persistent:
        keys = "; ".join(
            f"{t}: " + ", ".join(",".join(k) for k in ks[:10]) for t, ks in persistent.items()
        )
        line += f" — PERSISTENT: {keys}"
    return escape(line)
