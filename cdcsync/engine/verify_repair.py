"""``verify --repair``: re-copy the ranges a verification found different, then re-check them.

Only while the target is write-fenced, i.e. while cdcsync alone writes there (before
cutover): after the switch the target's rows are the application's, and a copy from
the old source would overwrite them. The switch lock is held for the whole repair, so
no cutover, rollback or abort starts meanwhile, and the fence is checked again under
each range's table lock (the fence cannot be lifted while that lock is held).

One target transaction per range, passing the fence as the applier does
(``session_replication_role = replica``): lock the table, read the source, delete the
target's rows of the range, COPY the source's rows of the range, commit.

Why this is safe while the daemon streams — the race with the applier is this: the
source row is read at instant S, and the stream applies a change made after S to the
target before the repair writes, which the repair then overwrites with the older row.
The order of the steps rules that out:

1. The repair takes ``SHARE ROW EXCLUSIVE`` on the target table. That waits for every
   applier transaction that wrote to the table to commit, and holds back the next
   ones (their row writes need ``ROW EXCLUSIVE``) until the repair commits. Readers,
   verification included, are not blocked.
2. Only then is the source's snapshot taken (a REPEATABLE READ transaction whose
   first statement runs after the lock is granted). The applier applies only changes
   already committed on the source, so every change whose effect is on the target
   now is visible in that snapshot.
3. Changes committed on the source after the snapshot reach the table only after the
   repair commits, so they land on the repaired rows, newer over older.
4. Changes committed before the snapshot but not yet applied are applied after the
   repair too: they bring the rows they touch back to an older state for a moment,
   and the later changes of those keys, also in the stream, bring them forward again
   — the same harmless replay that follows the snapshot's own copy.

Each range reads its own snapshot because of step 2 (one snapshot for every range,
taken before the first lock, would miss changes applied in between). So the daemon
need not be paused. The table is held for one range's copy at a time; its applier
transactions wait that long (bounded per attempt by ``lock_timeout``).

Tables without a primary key are repaired whole, the same way. Afterwards the
repaired ranges are verified again; while the stream is busy a re-check can still see
changes in flight, which a later verification settles.

Under a migration plan the copy writes what the snapshot writes: the source's rows of
the range that pass the plan's filter, each column transformed on the source and sent
as text into the target's column of the same plan entry, where the target type's input
function casts it (``value::text::type``); dropped columns are not copied, added ones
take their default. The range is cut on the key as each side names it. A table the
plan renames is read under its source name and written under its name on the target;
the fence is looked up by the source's names (:mod:`cdcsync.adapters.fence` follows the
rename registry).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from cdcsync.adapters import fence
from cdcsync.adapters.pg import connect
from cdcsync.core import plan as plan_mod
from cdcsync.core import verify_plan as vp
from cdcsync.core import verify_ranges as vr
from cdcsync.core.events import TableId
from cdcsync.core.verify_ranges import KeyRange
from cdcsync.engine import verify as vf
from cdcsync.errors import AbortedSafely, PreconditionError
from cdcsync.snapshot import catalog
from cdcsync.snapshot.chunking import copy_in_query
from cdcsync.snapshot.copy import pump

if TYPE_CHECKING:
    from cdcsync.config import Settings

log = logging.getLogger("cdcsync.verify")

LOCK_TIMEOUT_MS = 5000
LOCK_ATTEMPTS = 5


@dataclass
class RangeRepair:
    table: TableId
    range: KeyRange | None  # None: the whole table
    deleted: int = 0
    copied: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        rng = self.range
        return {
            "table": str(self.table),
            "lower": None if rng is None or rng.lower is None else list(rng.lower),
            "upper": None if rng is None or rng.upper is None else list(rng.upper),
            "whole_table": rng is None,
            "deleted": self.deleted,
            "copied": self.copied,
            "seconds": round(self.seconds, 4),
        }


@dataclass
class RepairReport:
    repaired: list[RangeRepair] = field(default_factory=list)
    recheck: vf.VerifyReport | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.recheck is None or self.recheck.ok

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "ranges": len(self.repaired),
            "rows_deleted": sum(r.deleted for r in self.repaired),
            "rows_copied": sum(r.copied for r in self.repaired),
            "seconds": round(self.seconds, 4),
            "repaired": [r.to_dict() for r in self.repaired],
            "recheck": None if self.recheck is None else self.recheck.to_dict(),
        }


def require_fenced(
    target_dsn: str, tables: Sequence[TableId], migration_id: str, *, schema: str = "cdcsync"
) -> None:
    """Refuse unless every table (the source's names) carries the whole write fence on the
    target; ``schema`` is the state schema, whose rename registry names renamed tables."""
    with connect(target_dsn, "target", autocommit=True) as conn:
        open_ = fence.check(conn, tables, schema=schema)
    if open_:
        raise PreconditionError(
            f"repair refused: {len(open_)} table(s) on the target are not write-fenced "
            f"({', '.join(map(str, open_[:5]))}{' …' if len(open_) > 5 else ''}); "
            f"--repair re-copies rows only while migration {migration_id} owns the target "
            "(fenced, before cutover), never over an application's writes"
        )


def to_repair(report: vf.VerifyReport) -> dict[TableId, list[KeyRange] | None]:
    """Per differing table: the ranges to copy again (None: the whole table)."""
    out: dict[TableId, list[KeyRange] | None] = {}
    for r in report.tables:
        if r.ok:
            continue
        if r.error is not None:
            raise PreconditionError(f"cannot repair {r.table}: {r.error}")
        if r.method == "key ranges":
            ranges = list(dict.fromkeys(r.leaves))
            if ranges:
                out[r.table] = ranges
            elif r.source_rows != r.target_rows or r.differing_ranges:
                out[r.table] = None
        else:
            out[r.table] = None
    return out


def repair(
    settings: Settings,
    report: vf.VerifyReport,
    *,
    workers: int = 2,
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
) -> RepairReport:
    """Re-copy what ``report`` found different, then verify those ranges again."""
    from cdcsync.engine.switch import switch_lock

    started = time.monotonic()
    out = RepairReport()
    plan = to_repair(report)
    if not plan:
        out.seconds = time.monotonic() - started
        return out
    source_dsn, target_dsn = settings.source_conninfo(), settings.target_conninfo()
    require_fenced(target_dsn, list(plan), settings.migration_id, schema=settings.state_schema)
    migration_plan, reverse = vf.under_plan(settings)
    with switch_lock(settings):
        for table, ranges in plan.items():
            how = _how(source_dsn, target_dsn, table, migration_plan)
            for rng in ranges if ranges is not None else [None]:
                done = _repair_range(
                    source_dsn,
                    target_dsn,
                    table,
                    how,
                    rng,
                    (settings.migration_id, settings.state_schema),
                    lock_timeout_ms,
                )
                log.info(
                    "repaired %s %s: %d row(s) deleted, %d copied in %.2fs",
                    table,
                    "whole table" if rng is None else f"[{rng.lower}, {rng.upper})",
                    done.deleted,
                    done.copied,
                    done.seconds,
                )
                out.repaired.append(done)
    scope = vf.Scope(
        plans={t: r for t, r in plan.items() if r is not None},
        only={t: set(range(len(r))) for t, r in plan.items() if r is not None},
    )
    out.recheck = vf.verify_tables(
        source_dsn,
        target_dsn,
        list(plan),
        "rows",
        workers=workers,
        state_schema=settings.state_schema,
        scope=scope,
        plan=migration_plan,
        reverse=reverse,
    )
    out.seconds = time.monotonic() - started
    return out


@dataclass(frozen=True)
class _How:
    target: TableId  # the table as the target names it (the plan may rename it)
    columns: tuple[str, ...]  # copied columns on the target: not generated, not added
    key: tuple[str, ...]  # the key on the target
    binary: bool
    values: tuple[sql.Composable, ...] = ()  # what the source sends for each column
    source_key: tuple[str, ...] = ()
    filter: sql.Composable | None = None

    def source_where(self, rng: KeyRange | None) -> sql.Composable:
        pred = None if rng is None else vr.range_predicate(self.source_key or self.key, rng)
        return vp.where_clause(pred, self.filter)


def _how(
    source_dsn: str, target_dsn: str, table: TableId, migration_plan: plan_mod.Plan | None = None
) -> _How:
    """Columns and format of the copy, decided as the snapshot decides them."""
    tp = None if migration_plan is None else migration_plan.table(table)
    if tp is not None and not tp.include:
        raise PreconditionError(f"cannot repair {table}: the plan excludes it")
    on_target = table if tp is None else tp.target_table
    with connect(source_dsn, "source", autocommit=True) as src:
        (info,) = catalog.describe(src, [table])
    with connect(target_dsn, "target", autocommit=True) as tgt:
        theirs = catalog.target_columns(tgt, on_target)
    if theirs is None:
        renamed = "" if on_target == table else f" (renamed by the plan to {on_target})"
        raise PreconditionError(f"cannot repair {table}: missing on the target{renamed}")
    if tp is not None and (tp.columns or tp.add or tp.filter is not None):
        copied = [c.name for c in info.columns if tp.target_of(c.name) is not None]
        key = tuple(str(tp.target_of(k)) for k in info.primary_key)
        return _How(
            on_target,
            tuple(str(tp.target_of(c)) for c in copied),
            key,
            False,  # text: the target's input functions carry out the plan's casts
            tuple(tp.value_sql(c, sql.Identifier(c), cast=False) for c in copied),
            info.primary_key,
            None if tp.filter is None else sql.SQL("({})").format(sql.SQL(tp.filter)),
        )
    # The same columns (a renamed table keeps them): binary where the types match.
    same = all(theirs.get(c.name) == c.type_name for c in info.columns)
    return _How(
        on_target, tuple(c.name for c in info.columns), info.primary_key, info.binary and same
    )


def _settings_sql() -> sql.Composed:
    return sql.SQL("").join(
        sql.SQL("SET {} = {}; ").format(sql.Identifier(k), sql.Literal(v))
        for k, v in vf.SESSION_SETTINGS.items()
        if k != "search_path"
    )


def _repair_range(
    source_dsn: str,
    target_dsn: str,
    table: TableId,
    how: _How,
    rng: KeyRange | None,
    owner: tuple[str, str],  # (migration id, state schema)
    lock_timeout_ms: int,
) -> RangeRepair:
    """Re-copy one range of ``table`` (the source's name) into ``how.target``."""
    started = time.monotonic()
    migration_id, state_schema = owner
    rel = sql.Identifier(table.schema, table.name)
    dst = sql.Identifier(how.target.schema, how.target.name)
    where = None if rng is None else vr.range_predicate(how.key, rng)
    where_sql = sql.SQL("") if where is None else sql.SQL(" WHERE {}").format(where)
    values = how.values or tuple(map(sql.Identifier, how.columns))
    fmt = sql.SQL("binary" if how.binary else "text")
    copy_out = sql.SQL("COPY (SELECT {} FROM {}{}) TO STDOUT (FORMAT {})").format(
        sql.SQL(", ").join(values), rel, how.source_where(rng), fmt
    )
    done = RangeRepair(table, rng)
    for attempt in range(1, LOCK_ATTEMPTS + 1):
        tgt = connect(target_dsn, "target", autocommit=True, application_name="cdcsync-repair")
        src = connect(source_dsn, "source", autocommit=True, application_name="cdcsync-repair")
        try:
            tgt.execute(_settings_sql())
            src.execute(_settings_sql())
            with tgt.transaction():
                tgt.execute(
                    sql.SQL(
                        "SET LOCAL session_replication_role = replica; "
                        "SET LOCAL lock_timeout = {}; LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE"
                    ).format(sql.Literal(f"{lock_timeout_ms}ms"), dst)
                )
                if fence.check(tgt, [table], schema=state_schema):
                    raise PreconditionError(
                        f"repair stopped: {how.target} lost its write fence on the target "
                        f"(migration {migration_id} no longer owns it); nothing was changed there"
                    )
                # The source's snapshot is taken now, after the lock (see the docstring).
                src.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                src.execute("SELECT 1 FROM pg_current_snapshot()")
                cur = tgt.execute(sql.SQL("DELETE FROM {}{}").format(dst, where_sql))
                done.deleted = max(cur.rowcount, 0)
                rows, _, _ = pump(
                    src.pgconn,
                    tgt.pgconn,
                    copy_out.as_bytes(src),
                    copy_in_query(how.target, how.columns, how.binary).as_bytes(tgt),
                    lambda _rows, _bytes: None,
                )
                done.copied = rows
            done.seconds = time.monotonic() - started
            return done
        except psycopg.errors.LockNotAvailable as exc:
            if attempt == LOCK_ATTEMPTS:
                raise AbortedSafely(
                    f"could not lock {how.target} on the target for its repair within "
                    f"{LOCK_ATTEMPTS} tries of {lock_timeout_ms} ms ({exc}); nothing was "
                    "changed in that range"
                ) from exc
            time.sleep(0.1 * attempt)
        finally:
            src.close()
            tgt.close()
    raise AssertionError("unreachable")
