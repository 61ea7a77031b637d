"""``verify --continuous``: while changes stream, re-verify the ranges that changed.

The first pass verifies everything at ``rows`` level and keeps each keyed table's
top-level ranges. Every later pass, after ``interval`` seconds, re-checks only:

- the ranges that differed in the previous pass;
- the ranges holding a row written on either side since the previous pass;
- a rotating slice of the other ranges, so that every range is checked again at least
  once every ``sweep`` passes (deletions leave no row to find, and neither would a
  change the tests below cannot see).

Which rows were written since the previous pass comes from each side's own row
versions, without touching the applier or adding triggers on the hot path: every row
version carries the transaction id that wrote it (``xmin``). Each pass reads a side at
one snapshot and notes its ``xmin``/``xmax`` as 64-bit ids (``pg_current_snapshot()``
is an ``xid8`` snapshot, which never wraps). A row version visible now but not at the
previous pass was written by a transaction with an id at or above the previous
snapshot's ``xmin`` and below this one's ``xmax``, so testing each row's 32-bit
``xmin`` against that window, modulo 2**32, finds every such row
(:func:`cdcsync.core.verify_ranges.xid_window` says why the wraparound is exact,
and falls back to re-checking everything when the window is too wide). Commit
timestamps are not needed (``track_commit_timestamp`` is often off), and the test is
a scan of the table without hashing, about the cost of a ``count(*)``; the ranges of
the rows found are computed in the same query.

While streaming, a pass can see a change the source made that the target has not
applied yet. Such a difference is reported as transient. A difference becomes a
candidate when the same key differs in two consecutive passes with the same row on
each side both times (:func:`cdcsync.core.verify_ranges.persistent`). That alone does
not rule out lag — the stream may be slower than the interval — so, when a ``settle``
step is given (the CLI gives the cutover's drain: a marker written on the source now,
waited for until the applier has committed past it), the candidates' ranges are
checked once more after it. A candidate whose source row is still the one seen in both
passes has had that row since before the marker, so the applier has applied it; if the
target's row still differs, no change in flight explains it, and it is reported as
persistent. Without a settle step (no Kafka settings) the two-pass test decides alone,
which holds while the stream lags by less than the interval.

Under a migration plan each side's rows are looked for in its own table: a table the
plan renames is scanned under its target name on the target, its key under each side's
column names; ranges, hashes and results keep the source's table names.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg import sql

from cdcsync.core import plan as plan_mod
from cdcsync.core import verify_ranges as vr
from cdcsync.core.events import TableId
from cdcsync.core.verify_ranges import Bound, KeyRange
from cdcsync.engine import verify as vf
from cdcsync.errors import CdcsyncError, ConfigError

log = logging.getLogger("cdcsync.verify")

DEFAULT_SWEEP = 10


@dataclass
class PassReport:
    """One pass: what it checked, what differed, and what persists across two passes."""

    number: int
    report: vf.VerifyReport
    checked: dict[TableId, int]  # ranges checked per table (keyless tables: 1)
    total: dict[TableId, int]  # ranges per table
    changed: dict[TableId, int]  # ranges re-checked because rows were written there
    persistent: dict[TableId, list[Bound]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def transient(self) -> dict[TableId, int]:
        """Differing rows seen in this pass, persistent or not (lag included)."""
        return {r.table: r.mismatches for r in self.report.tables if r.mismatches}

    @property
    def ok(self) -> bool:
        return not any(self.persistent.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "pass": self.number,
            "ok": self.ok,
            "seconds": round(self.seconds, 4),
            "checked_ranges": {str(t): n for t, n in self.checked.items()},
            "ranges": {str(t): n for t, n in self.total.items()},
            "changed_ranges": {str(t): n for t, n in self.changed.items()},
            "transient": {str(t): n for t, n in self.transient.items()},
            "persistent": {
                str(t): [list(k) for k in keys] for t, keys in self.persistent.items() if keys
            },
            "report": self.report.to_dict(),
        }


@dataclass
class _Memory:
    """What one pass leaves for the next."""

    xids: dict[str, tuple[int, int]]  # side → (xmin, xmax) of its snapshot
    plans: dict[TableId, list[KeyRange]]
    differing: dict[TableId, set[int]]
    hashes: dict[TableId, dict[Bound, tuple[str | None, str | None]]]
    keys: dict[TableId, tuple[str, ...]]


def _source_key(plan: plan_mod.Plan | None, table: TableId, key: Sequence[str]) -> tuple[str, ...]:
    """The key as the source names it (the plan may rename key columns)."""
    if plan is None:
        return tuple(key)
    tp = plan.table(table)
    return tuple(tp.source_of(k) or k for k in key)


def _named(plan: plan_mod.Plan | None, table: TableId) -> dict[str, TableId]:
    """``table`` (the source's name) as each side names it."""
    return {"source": table, "target": table if plan is None else plan.target_table(table)}


def changed_ranges(
    side: vf._Side,
    table: TableId,
    key: Sequence[str],
    plan: Sequence[KeyRange],
    since: int,
    until: int,
) -> set[int]:
    """Indexes of ``plan``'s ranges holding a row written on ``side`` in ``[since, until)``.

    ``table`` and ``key`` are named as ``side`` names them."""
    window = vr.xid_window(since, until)
    if window is None or len(plan) <= 1:
        return set(range(len(plan)))
    boundaries = [r.lower for r in plan[1:]]
    if any(b is None for b in boundaries):
        raise ValueError(f"the plan of {table} is not a contiguous cover of its keys")
    index = vr.range_index(key, [b for b in boundaries if b is not None])
    rows = side.query(
        sql.SQL("SELECT DISTINCT {} FROM {} WHERE {}").format(
            index, sql.Identifier(table.schema, table.name), vr.xid_window_predicate(window)
        )
    ).result()
    return {int(r[0]) for r in rows}


def run_continuous(
    source_dsn: str,
    target_dsn: str,
    tables: Sequence[TableId],
    *,
    interval: float,
    passes: int | None = None,
    sweep: int = DEFAULT_SWEEP,
    workers: int = 2,
    state_schema: str = "cdcsync",
    max_keys: int = vf.DEFAULT_MAX_KEYS,
    range_bytes: int | None = None,
    stop: threading.Event | None = None,
    on_pass: Callable[[PassReport], None] | None = None,
    settle: Callable[[], None] | None = None,
    plan: plan_mod.Plan | None = None,
    reverse: bool = False,
) -> PassReport:
    """Passes every ``interval`` seconds until ``stop`` is set or ``passes`` ran; the last one.

    ``plan`` and ``reverse``: compare as the migration plan maps the source (see
    :func:`cdcsync.engine.verify.verify_tables`).
    """
    if interval <= 0:
        raise ConfigError(f"--interval {interval}: give a positive number of seconds")
    if sweep < 1:
        raise ConfigError(f"--sweep {sweep}: give a whole number of passes, at least 1")
    own = [str(t) for t in tables if t.schema == state_schema]
    if own:
        raise ConfigError(f"{', '.join(own)} belong to cdcsync's state schema {state_schema}")
    stop = stop or threading.Event()
    tables = list(dict.fromkeys(tables))
    memory: _Memory | None = None
    number = 0
    last: PassReport | None = None
    while True:
        started = time.monotonic()
        last, memory = _pass(
            source_dsn,
            target_dsn,
            tables,
            number,
            memory,
            sweep,
            workers,
            max_keys,
            range_bytes,
            settle,
            (plan, reverse),
        )
        last.seconds = time.monotonic() - started
        log.info(
            "continuous verification pass %d: %d range(s) checked in %.2fs, %d transient and "
            "%d persistent difference(s)",
            number,
            sum(last.checked.values()),
            last.seconds,
            sum(last.transient.values()),
            sum(len(k) for k in last.persistent.values()),
        )
        if on_pass is not None:
            on_pass(last)
        number += 1
        if passes is not None and number >= passes:
            return last
        if stop.wait(max(0.0, interval - (time.monotonic() - started))):
            return last


def _pass(
    source_dsn: str,
    target_dsn: str,
    tables: list[TableId],
    number: int,
    memory: _Memory | None,
    sweep: int,
    workers: int,
    max_keys: int,
    range_bytes: int | None,
    settle: Callable[[], None] | None,
    mapped: tuple[plan_mod.Plan | None, bool] = (None, False),
) -> tuple[PassReport, _Memory]:
    source, target = vf.open_sides(source_dsn, target_dsn, workers)
    try:
        xids = {"source": source.snapshot_xids(), "target": target.snapshot_xids()}
        scope = vf.Scope()
        changed: dict[TableId, int] = {}
        if memory is not None:
            only: dict[TableId, set[int]] = {}
            for table, plan in memory.plans.items():
                key = memory.keys[table]  # as the target names it
                named = {"source": _source_key(mapped[0], table, key), "target": key}
                relation = _named(mapped[0], table)
                written: set[int] = set()
                for name, side in (("source", source), ("target", target)):
                    since = memory.xids[name][0]
                    written |= changed_ranges(
                        side, relation[name], named[name], plan, since, xids[name][1]
                    )
                rotating = {i for i in range(len(plan)) if i % sweep == number % sweep}
                only[table] = written | rotating | memory.differing.get(table, set())
                changed[table] = len(written)
            scope = vf.Scope(plans=memory.plans, only=only)
        checker = vf._Checker(
            source,
            target,
            "rows",
            workers,
            max_keys,
            scope=scope,
            range_bytes=range_bytes,
            plan=mapped[0],
            reverse=mapped[1],
        )
        results = checker.run_scoped(tables)
    finally:
        source.close()
        target.close()
    report = vf.build_report("rows", results, {}, partial=memory is not None)
    plans = {r.table: r.plan for r, _ in results if r.plan}
    keys = {r.table: r.key for r, _ in results if r.plan}
    hashes = {r.table: dict(r.hashes) for r, _ in results}
    differing: dict[TableId, set[int]] = {}
    for r, _ in results:
        if r.plan:
            index = {rng: i for i, rng in enumerate(r.plan)}
            differing[r.table] = {
                index[KeyRange(d.lower, d.upper)]
                for d in r.differing_ranges
                if KeyRange(d.lower, d.upper) in index
            }
    candidates: dict[TableId, list[Bound]] = {}
    if memory is not None:
        for table, now in hashes.items():
            found = vr.persistent(memory.hashes.get(table, {}), now)
            if found:
                candidates[table] = found
    persistent = candidates
    if candidates and settle is not None:
        persistent = _settled(
            source_dsn,
            target_dsn,
            candidates,
            hashes,
            plans,
            differing,
            settle,
            workers,
            max_keys,
            mapped,
        )
    checked = {r.table: (len(r.checked) if r.plan else 1) for r, _ in results}
    total = {r.table: (len(r.plan) if r.plan else 1) for r, _ in results}
    return (
        PassReport(number, report, checked, total, changed, persistent),
        _Memory(xids, plans, differing, hashes, keys),
    )


def _settled(
    source_dsn: str,
    target_dsn: str,
    candidates: dict[TableId, list[Bound]],
    hashes: dict[TableId, dict[Bound, tuple[str | None, str | None]]],
    plans: dict[TableId, list[KeyRange]],
    differing: dict[TableId, set[int]],
    settle: Callable[[], None],
    workers: int,
    max_keys: int,
    mapped: tuple[plan_mod.Plan | None, bool] = (None, False),
) -> dict[TableId, list[Bound]]:
    """The candidates that still differ, with the same rows, once the stream caught up."""
    try:
        settle()
    except CdcsyncError as exc:
        log.warning("continuous verification: cannot prove the stream caught up (%s)", exc)
        return {}  # unproven: they stay candidates, checked again next pass
    tables = list(candidates)
    scope = vf.Scope(
        plans={t: plans[t] for t in tables if t in plans},
        only={t: differing.get(t, set()) for t in tables if t in plans},
    )
    source, target = vf.open_sides(source_dsn, target_dsn, workers)
    try:
        checker = vf._Checker(
            source,
            target,
            "rows",
            workers,
            max_keys,
            scope=scope,
            plan=mapped[0],
            reverse=mapped[1],
        )
        again = {r.table: r.hashes for r, _ in checker.run_scoped(tables)}
    finally:
        source.close()
        target.close()
    out: dict[TableId, list[Bound]] = {}
    for table, keys in candidates.items():
        kept = [k for k in keys if again.get(table, {}).get(k) == hashes[table].get(k)]
        if kept:
            out[table] = kept
    return out
