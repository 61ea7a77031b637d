"""Compare migrated tables between source and target, computed inside each database.

Each side is read at one instant: its first connection opens a REPEATABLE READ READ
ONLY transaction and exports its snapshot, and the side's other connections import it,
so every query on a side — range digests, drill-downs, sums — sees the same data while
both sides work in parallel (one thread per connection). The comparison only reads, so
a write-fenced target verifies like any other, and the cutover can call this under its
write freeze (a :class:`RangeLog` records progress over a connection of its own).

Every connection gets the same session settings, so a value prints the same text on
both sides whatever the servers' defaults (time zone, date and interval styles, float
digits, bytea format, money locale, search path for regclass and friends).

Levels:

- ``counts``: ``count(*)`` on both sides — the cheap check under a freeze;
- ``checksum``: per key range ``count(*)`` and an order-independent digest of the
  range's row hashes, plus the sum of every numeric column (the reconciliation
  totals); tables without a primary key get digests of 256 buckets of row digests;
- ``rows``: as ``checksum``, then differing ranges are cut again and again, down to
  ranges compared row by row, which names the differing keys.

A row's hash is ``hash_record_extended`` over its columns, each hashed by its type's own
hash function where that function sees exactly what the text form shows (integers,
text under a deterministic collation, bytea, uuid, dates and timestamps, booleans;
numerics together with their scale), and over its text form otherwise (floats, whose
hash equates -0 and 0; intervals, jsonb, arrays, enums, whose hash is of an OID, and
every other type). That costs a fraction of printing every row, so a range needs no
sort: its digest is the count, the XOR and the sum of its row hashes. A range holds
unique keys (the key is part of the row), so rows cannot cancel out; XOR and sum
together keep the linear structure of the record hash from hiding a change (two rows
changed the same way move the sum, two swapped values move the XOR).

Under a migration plan each included table is compared as the plan maps it
(:mod:`cdcsync.core.verify_plan`): the source side computes each compared column as
it lands on the target (transforms, then the ``::text::type`` cast), under the target's
column name, its rows restricted by the plan's filter in every range, drill-down and
count; the target is read as it is, in the table the plan renames the source's to (each
side's queries name their own table; results name the source's). Reconciliation sums
are of the mapped values. Key
columns may be renamed, so ranges are cut on key values named per side, and differing
keys are reported under the target's names. Dropped columns are not compared; added
ones are left out of the row hash (their values are the target's own), and the rows
where they differ from their default are counted in a note. Excluded tables are not
compared. Tables without a primary key follow the mapping in their row digests. Once
the target has been the primary, ``reverse`` mode filters both sides and leaves out
columns whose transform is not idempotent (see that module for why).

Progress can be recorded (:class:`RangeLog`) so an interrupted verification resumes
from the ranges already compared, and a run can be restricted to chosen ranges (the
continuous mode re-checks ranges that changed, a repair re-checks what it copied).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, cast, get_args

import psycopg
from psycopg import sql

from cdcsync import metrics
from cdcsync.adapters.pg import connect
from cdcsync.core import plan as plan_mod
from cdcsync.core import verify_plan as vp
from cdcsync.core import verify_ranges as vr
from cdcsync.core.events import TableId
from cdcsync.core.verify_ranges import Bound, Digest, KeyRange
from cdcsync.errors import ConfigError

if TYPE_CHECKING:
    from cdcsync.config import Settings

log = logging.getLogger("cdcsync.verify")

Level = Literal["counts", "checksum", "rows"]
LEVELS: tuple[str, ...] = get_args(Level)

#: Identical on both sides, so row text is canonical.
SESSION_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "lc_monetary": "C",
    "search_path": "pg_catalog",
}

#: Column types whose values the reconciliation sums (domains over them included).
NUMERIC_TYPES = ("int2", "int4", "int8", "numeric", "float4", "float8", "money")
#: Of those, the ones ``sum`` adds exactly without a cast (int8 and numeric: as numeric).
EXACT_SUM_TYPES = frozenset({"int2", "int4", "int8", "numeric"})

#: Base types whose hash function equates exactly the values that print the same
#: (text-like ones only under a deterministic collation).
NATIVE_HASH_TYPES = frozenset(
    {
        "int2",
        "int4",
        "int8",
        "bool",
        "text",
        "varchar",
        "bytea",
        "uuid",
        "date",
        "timestamp",
        "timestamptz",
        "time",
    }
)
_COLLATED = frozenset({"text", "varchar"})

DEFAULT_MAX_KEYS = 20
#: Row hashes kept per table for the continuous mode's persistence test.
MAX_TRACKED_ROWS = 10_000

T = TypeVar("T")


@dataclass
class RangeResult:
    """A top-level range (or, for keyless tables, a digest bucket) that differs."""

    lower: Bound | None
    upper: Bound | None
    source_rows: int
    target_rows: int
    bucket: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "lower": None if self.lower is None else list(self.lower),
            "upper": None if self.upper is None else list(self.upper),
            "bucket": self.bucket,
            "source_rows": self.source_rows,
            "target_rows": self.target_rows,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RangeResult:
        return cls(
            _bound(d.get("lower")),
            _bound(d.get("upper")),
            int(d["source_rows"]),
            int(d["target_rows"]),
            d.get("bucket"),
        )


@dataclass
class Reconciliation:
    """Row count and sum of every numeric column on each side (the financial totals)."""

    source_rows: int | None = None
    target_rows: int | None = None
    source_sums: dict[str, str | None] = field(default_factory=dict)
    target_sums: dict[str, str | None] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.source_rows == self.target_rows and self.source_sums == self.target_sums

    @property
    def differing_columns(self) -> list[str]:
        return [c for c, v in self.source_sums.items() if self.target_sums.get(c) != v]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "source_rows": self.source_rows,
            "target_rows": self.target_rows,
            "source_sums": self.source_sums,
            "target_sums": self.target_sums,
            "differing_columns": self.differing_columns,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Reconciliation:
        return cls(
            d.get("source_rows"),
            d.get("target_rows"),
            dict(d.get("source_sums") or {}),
            dict(d.get("target_sums") or {}),
        )


@dataclass
class Findings:
    """What the drill-down found in one range: keys by kind, and the leaves compared."""

    source_only: list[dict[str, str]] = field(default_factory=list)  # missing on the target
    target_only: list[dict[str, str]] = field(default_factory=list)  # extra on the target
    changed: list[dict[str, str]] = field(default_factory=list)
    differing_rows: int = 0
    # Differing ranges compared row by row: what a repair re-copies.
    leaves: list[KeyRange] = field(default_factory=list)
    # key → (source row hash, target row hash) of differing rows (None: absent there).
    hashes: dict[Bound, tuple[str | None, str | None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source_only": self.source_only,
            "target_only": self.target_only,
            "changed": self.changed,
            "differing_rows": self.differing_rows,
            "leaves": [_range_doc(r) for r in self.leaves],
            "hashes": [[list(k), s, t] for k, (s, t) in self.hashes.items()],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Findings:
        return cls(
            list(d.get("source_only") or []),
            list(d.get("target_only") or []),
            list(d.get("changed") or []),
            int(d.get("differing_rows") or 0),
            [_range_of(r) for r in d.get("leaves") or []],
            {tuple(str(v) for v in k): (s, t) for k, s, t in d.get("hashes") or []},
        )


@dataclass
class TableResult:
    table: TableId
    level: str
    method: str = ""  # count, key ranges, row-digest buckets
    key: tuple[str, ...] = ()
    source_rows: int | None = None
    target_rows: int | None = None
    ranges: int = 0
    differing_ranges: list[RangeResult] = field(default_factory=list)
    # rows level: key column → text for keyed tables; {"row", "copies"} for keyless ones
    source_only: list[dict[str, str]] = field(default_factory=list)  # missing on the target
    target_only: list[dict[str, str]] = field(default_factory=list)  # extra on the target
    changed: list[dict[str, str]] = field(default_factory=list)
    differing_rows: int = 0
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # The top-level ranges compared (keyed tables), and which of them this run checked
    # (all of them unless the run was restricted).
    plan: list[KeyRange] = field(default_factory=list)
    checked: list[int] = field(default_factory=list)
    leaves: list[KeyRange] = field(default_factory=list)
    hashes: dict[Bound, tuple[str | None, str | None]] = field(default_factory=dict)
    resumed_ranges: int = 0  # ranges taken from an interrupted run's record

    @property
    def mismatches(self) -> int:
        """Differing rows (rows), ranges (checksum) or the count difference (counts)."""
        if self.level == "rows":
            n = self.differing_rows
        elif self.level == "checksum":
            n = len(self.differing_ranges)
        else:
            n = abs((self.source_rows or 0) - (self.target_rows or 0))
        differs = self.error is not None or bool(self.differing_ranges)
        return max(n, 1) if differs or self.source_rows != self.target_rows else n

    @property
    def ok(self) -> bool:
        return self.mismatches == 0

    def add(self, found: Findings, max_keys: int) -> None:
        """Merge one range's findings, keeping at most ``max_keys`` keys of each kind."""
        self.differing_rows += found.differing_rows
        for keys, out in (
            (found.source_only, self.source_only),
            (found.target_only, self.target_only),
            (found.changed, self.changed),
        ):
            out.extend(keys[: max(max_keys - len(out), 0)])
        self.leaves.extend(found.leaves)
        for k, pair in found.hashes.items():
            if len(self.hashes) < MAX_TRACKED_ROWS:
                self.hashes[k] = pair

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": str(self.table),
            "ok": self.ok,
            "method": self.method,
            "key": list(self.key),
            "source_rows": self.source_rows,
            "target_rows": self.target_rows,
            "ranges": self.ranges,
            "checked_ranges": len(self.checked) if self.plan else self.ranges,
            "resumed_ranges": self.resumed_ranges,
            "differing_ranges": [d.to_dict() for d in self.differing_ranges],
            "differing_rows": self.differing_rows,
            "source_only": self.source_only,
            "target_only": self.target_only,
            "changed": self.changed,
            "error": self.error,
            "notes": self.notes,
            "seconds": round(self.seconds, 4),
        }

    def state(self) -> dict[str, Any]:
        """Everything needed to rebuild this result (for a resumed run)."""
        return {
            **self.to_dict(),
            "level": self.level,
            "plan": [_range_doc(r) for r in self.plan],
            "checked": self.checked,
            "leaves": [_range_doc(r) for r in self.leaves],
            "hashes": [[list(k), s, t] for k, (s, t) in self.hashes.items()],
        }

    @classmethod
    def from_state(cls, d: Mapping[str, Any]) -> TableResult:
        schema, _, name = str(d["table"]).partition(".")
        return cls(
            TableId(schema, name),
            str(d["level"]),
            str(d.get("method") or ""),
            tuple(d.get("key") or ()),
            d.get("source_rows"),
            d.get("target_rows"),
            int(d.get("ranges") or 0),
            [RangeResult.from_dict(r) for r in d.get("differing_ranges") or []],
            list(d.get("source_only") or []),
            list(d.get("target_only") or []),
            list(d.get("changed") or []),
            int(d.get("differing_rows") or 0),
            d.get("error"),
            list(d.get("notes") or []),
            float(d.get("seconds") or 0.0),
            [_range_of(r) for r in d.get("plan") or []],
            [int(i) for i in d.get("checked") or []],
            [_range_of(r) for r in d.get("leaves") or []],
            {tuple(str(v) for v in k): (s, t) for k, s, t in d.get("hashes") or []},
            int(d.get("ranges") or 0),
        )


@dataclass
class RangeOutcome:
    """One top-level range compared: both sides' digests and sums, and what differs."""

    index: int
    source: Digest
    target: Digest
    source_sums: list[str | None]
    target_sums: list[str | None]
    findings: Findings

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": [self.source.rows, self.source.digest],
            "target": [self.target.rows, self.target.digest],
            "source_sums": self.source_sums,
            "target_sums": self.target_sums,
            "findings": self.findings.to_dict(),
        }

    @classmethod
    def from_dict(cls, index: int, d: Mapping[str, Any]) -> RangeOutcome:
        return cls(
            index,
            Digest(int(d["source"][0]), d["source"][1]),
            Digest(int(d["target"][0]), d["target"][1]),
            list(d["source_sums"]),
            list(d["target_sums"]),
            Findings.from_dict(d["findings"]),
        )


class RangeLog(Protocol):
    """Where a verification records its progress, so that a rerun can resume.

    Each call commits on its own: after it returns, a crash keeps what it recorded.
    """

    def finished_table(self, table: TableId) -> tuple[TableResult, Reconciliation | None] | None:
        """A table this run completed already (then it is not compared again)."""
        ...

    def plan(self, table: TableId) -> list[KeyRange] | None:
        """The top-level ranges recorded for ``table``, or None."""
        ...

    def save_plan(self, table: TableId, ranges: Sequence[KeyRange]) -> None: ...

    def done_ranges(self, table: TableId) -> dict[int, RangeOutcome]:
        """Ranges of ``table`` already compared, by index into its plan."""
        ...

    def range_done(self, table: TableId, outcome: RangeOutcome) -> None: ...

    def table_done(
        self, table: TableId, result: TableResult, rec: Reconciliation | None
    ) -> None: ...


@dataclass
class VerifyReport:
    level: str
    tables: list[TableResult]
    reconciliation: dict[TableId, Reconciliation]
    timings: dict[str, float]
    run_id: str | None = None
    #: Set when only some ranges were checked: reconciliation totals are then absent.
    partial: bool = False

    @property
    def mismatches(self) -> dict[TableId, int]:
        return {r.table: r.mismatches for r in self.tables}

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.tables) and all(r.ok for r in self.reconciliation.values())

    def to_dict(self) -> dict[str, Any]:
        """The report as one JSON-ready document."""
        return {
            "level": self.level,
            "ok": self.ok,
            "run_id": self.run_id,
            "partial": self.partial,
            "mismatches": {str(t): n for t, n in self.mismatches.items()},
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "tables": [r.to_dict() for r in self.tables],
            "reconciliation": [
                {"table": str(t), **rec.to_dict()} for t, rec in self.reconciliation.items()
            ],
        }


@dataclass(frozen=True)
class Scope:
    """Restricts a run: per table, the top-level ranges to use and which of them to check.

    A table absent from ``only`` is checked whole. Ranges come from ``plans`` (e.g. an
    earlier pass's), else they are sampled afresh.
    """

    plans: Mapping[TableId, Sequence[KeyRange]] = field(default_factory=dict)
    only: Mapping[TableId, set[int]] = field(default_factory=dict)


def verify_tables(
    source_dsn: str,
    target_dsn: str,
    tables: Sequence[TableId],
    level: Literal["counts", "checksum", "rows"],
    *,
    workers: int = 2,
    state_schema: str = "cdcsync",
    max_keys: int = DEFAULT_MAX_KEYS,
    progress: RangeLog | None = None,
    scope: Scope | None = None,
    range_bytes: int | None = None,
    run_id: str | None = None,
    plan: plan_mod.Plan | None = None,
    reverse: bool = False,
) -> VerifyReport:
    """Compare ``tables`` on both sides at ``level``; records the result as metrics.

    ``max_keys`` caps the keys listed per kind of difference (the count is exact).
    Tables of ``state_schema`` are refused: cdcsync's own state differs by design.
    A table missing on the source is a usage error; anything else that differs —
    a table or column missing on the target included — is a mismatch in the report.
    ``progress`` records each compared range (and resumes from what it holds);
    ``scope`` restricts the run to chosen ranges; ``range_bytes`` overrides the size
    of a top-level range. Under ``plan`` the source is compared as the plan maps it
    (tables it excludes are not compared); ``reverse`` says the target has been the
    primary, so rows written there may have come back to the source (see
    :mod:`cdcsync.core.verify_plan`).
    """
    if level not in LEVELS:
        raise ConfigError(f"verification level {level!r}: use one of {', '.join(LEVELS)}")
    own = [str(t) for t in tables if t.schema == state_schema]
    if own:
        raise ConfigError(f"{', '.join(own)} belong to cdcsync's state schema {state_schema}")
    workers = max(1, workers)
    started = time.monotonic()
    timings: dict[str, float] = {}
    source, target = open_sides(source_dsn, target_dsn, workers)
    timings["open_seconds"] = time.monotonic() - started
    try:
        checker = _Checker(
            source,
            target,
            level,
            workers,
            max_keys,
            progress=progress,
            scope=scope,
            range_bytes=range_bytes,
            plan=plan,
            reverse=reverse,
        )
        results = checker.run_scoped(list(dict.fromkeys(tables)))
    finally:
        source.close()
        target.close()
    timings["total_seconds"] = time.monotonic() - started
    report = build_report(
        level, results, timings, run_id=run_id, partial=bool(scope and scope.only)
    )
    metrics.record_verification(dict(report.mismatches.items()))
    log.info(
        "verification %s at level %s: %d table(s) in %.2fs",
        "clean" if report.ok else "found differences",
        level,
        len(report.tables),
        timings["total_seconds"],
    )
    return report


def under_plan(settings: Settings) -> tuple[plan_mod.Plan | None, bool]:
    """The migration's plan (None: none configured), and whether to compare in reverse
    mode because the target has been the primary (see :mod:`cdcsync.core.verify_plan`)."""
    from cdcsync.engine.verify_store import target_has_been_primary

    if not settings.plan:
        return None, False
    plan = plan_mod.load(settings.plan)
    with connect(settings.target_conninfo(), "target", autocommit=True) as conn:
        reverse = target_has_been_primary(conn, settings.state_schema, settings.migration_id)
    return plan, reverse


def plan_problems(
    source: psycopg.Connection[Any],
    target: psycopg.Connection[Any],
    plan: plan_mod.Plan,
    tables: Sequence[TableId],
    *,
    reverse: bool = False,
) -> list[str]:
    """What verification cannot evaluate under ``plan``, each as a sentence (none: fine).

    Plans (``LIMIT 0``) on the source the mapped values and the filter of each mapped
    table, and in reverse mode the filter over the target's row, under verification's
    session settings: a cast to a type the source lacks, or a filter that needs a column
    the target does not offer, shows here and not under a cutover's freeze.
    """
    problems: list[str] = []
    for table in tables:
        tp = plan.table(table)
        if not tp.include or not (tp.maps_columns or tp.filter is not None):
            continue
        src = _shape(source, table)
        if not src.exists:
            problems.append(f"{table}: not found on the source")
            continue
        mapping = vp.build(table, tp, src.columns, src.key, reverse=reverse)
        values = [p.source_value for p in mapping.pairs] or [sql.SQL("1")]
        checks = [
            (
                "source",
                source,
                sql.SQL("SELECT {} FROM {}{} LIMIT 0").format(
                    sql.SQL(", ").join(values), _ident(table), mapping.source_where(None)
                ),
            )
        ]
        if mapping.target_filter is not None:
            checks.append(
                (
                    "target",
                    target,
                    sql.SQL("SELECT 1 FROM {}{} LIMIT 0").format(
                        _ident(mapping.target_table), mapping.target_where(None)
                    ),
                )
            )
        for side, conn, statement in checks:
            try:
                with conn.transaction():
                    for setting, value in SESSION_SETTINGS.items():
                        conn.execute(
                            sql.SQL("SET LOCAL {} = {}").format(
                                sql.Identifier(setting), sql.Literal(value)
                            )
                        )
                    conn.execute(statement)
            except psycopg.Error as exc:
                first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
                problems.append(
                    f"{table}: the plan's mapping cannot be compared on the {side}: {first}"
                )
    return problems


def run_options(plan: plan_mod.Plan | None, reverse: bool) -> dict[str, Any]:
    """What a recorded run's ranges depend on beyond level and tables (for ``--resume``)."""
    out: dict[str, Any] = {}
    if plan is not None:
        out["plan"] = plan.fingerprint()
    if reverse:
        out["reverse"] = True
    return out


def build_report(
    level: str,
    results: Sequence[tuple[TableResult, Reconciliation | None]],
    timings: dict[str, float],
    *,
    run_id: str | None = None,
    partial: bool = False,
) -> VerifyReport:
    return VerifyReport(
        level=level,
        tables=[r for r, _ in results],
        reconciliation={r.table: rec for r, rec in results if rec is not None},
        timings=timings,
        run_id=run_id,
        partial=partial,
    )


def open_sides(source_dsn: str, target_dsn: str, workers: int) -> tuple[_Side, _Side]:
    """Both sides, each read at one instant, opened in parallel."""
    with ThreadPoolExecutor(1, thread_name_prefix="verify-open") as opener:
        target_future = opener.submit(_Side, "target", target_dsn, workers)
        try:
            source = _Side("source", source_dsn, workers)
        except BaseException:
            _close_when_open(target_future)
            raise
        try:
            target = target_future.result()
        except BaseException:
            source.close()
            raise
    return source, target


def _close_when_open(future: Future[_Side]) -> None:
    with contextlib.suppress(Exception):  # the first error is the one reported
        future.result().close()


class _Side:
    """One database read at one instant by ``workers`` connections, each on its own thread."""

    def __init__(self, name: str, dsn: str, workers: int) -> None:
        self.name = name
        self._conns: list[psycopg.Connection[Any]] = []
        self._idle: queue.Queue[psycopg.Connection[Any]] = queue.Queue()
        try:
            snapshot: str | None = None
            for _ in range(workers):
                conn = connect(dsn, name, autocommit=True, application_name="cdcsync-verify")
                self._conns.append(conn)
                # One round trip: settings and BEGIN as one simple-protocol query.
                conn.execute(
                    sql.SQL("").join(
                        [
                            *(
                                sql.SQL("SET {} = {}; ").format(
                                    sql.Identifier(setting), sql.Literal(value)
                                )
                                for setting, value in SESSION_SETTINGS.items()
                            ),
                            sql.SQL("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
                        ]
                    )
                )
                if snapshot is None:
                    if workers > 1:
                        row = conn.execute("SELECT pg_export_snapshot()").fetchone()
                        snapshot = str(row[0]) if row else None
                else:
                    conn.execute(
                        sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot))
                    )
                self._idle.put(conn)
        except BaseException:
            self.close()
            raise
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"verify-{name}")

    def submit(self, fn: Callable[[psycopg.Connection[Any]], T]) -> Future[T]:
        def run() -> T:
            conn = self._idle.get()
            try:
                return fn(conn)
            finally:
                self._idle.put(conn)

        return self._pool.submit(run)

    def query(
        self, statement: sql.Composed | sql.SQL, params: Sequence[Any] | None = None
    ) -> Future[list[Any]]:
        return self.submit(lambda conn: conn.execute(statement, params).fetchall())

    def snapshot_xids(self) -> tuple[int, int]:
        """(xmin, xmax) of the snapshot this side reads, as 64-bit transaction ids."""
        rows = self.query(
            sql.SQL(
                "SELECT pg_snapshot_xmin(s)::text::bigint, pg_snapshot_xmax(s)::text::bigint "
                "FROM pg_current_snapshot() s"
            )
        ).result()
        return int(rows[0][0]), int(rows[0][1])

    def close(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for conn in self._conns:
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
            conn.close()
        self._conns.clear()


@dataclass
class _Shape:
    """What verification needs to know about a table on one side."""

    exists: bool
    kind: str = ""
    columns: dict[str, str] = field(default_factory=dict)  # name → type, in column order
    numeric: tuple[str, ...] = ()
    key: tuple[str, ...] = ()
    blocks: int = 0  # heap blocks, for sampling
    bytes: int = 0  # heap and TOAST, for sizing ranges
    base: dict[str, str] = field(default_factory=dict)  # name → base type (domains resolved)
    deterministic: dict[str, bool] = field(default_factory=dict)  # name → collation


def _shape(conn: psycopg.Connection[Any], table: TableId) -> _Shape:
    row = conn.execute(
        "SELECT c.oid, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s",
        (table.schema, table.name),
    ).fetchone()
    if row is None:
        return _Shape(False)
    oid, kind = int(row[0]), str(row[1])
    cols = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), "
        "b.typname::text = ANY(%s), b.typname::text, coalesce(co.collisdeterministic, true) "
        "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
        "JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END "
        "LEFT JOIN pg_collation co ON co.oid = a.attcollation "
        "WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        (list(NUMERIC_TYPES), oid),
    ).fetchall()
    key = conn.execute(
        "SELECT a.attname FROM pg_index i "
        "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
        "WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.ord",
        (oid,),
    ).fetchall()
    size = conn.execute(
        "SELECT coalesce(sum(pg_relation_size(r)), 0) / current_setting('block_size')::int, "
        "coalesce(sum(pg_table_size(r)), 0) "
        "FROM (SELECT relid FROM pg_partition_tree(%s::oid::regclass) WHERE isleaf "
        "UNION SELECT %s::oid) x(r)",
        (oid, oid),
    ).fetchone()
    return _Shape(
        True,
        kind,
        {str(n): str(t) for n, t, *_ in cols},
        tuple(str(n) for n, _, numeric, *_ in cols if numeric),
        tuple(str(r[0]) for r in key),
        int(size[0]) if size else 0,
        int(size[1]) if size else 0,
        {str(c[0]): str(c[3]) for c in cols},
        {str(c[0]): bool(c[4]) for c in cols},
    )


def row_hashes(
    mapping: vp.Mapping, src: _Shape, tgt: _Shape
) -> tuple[sql.Composable, sql.Composable]:
    """The per-row hash on each side (see the module docstring), over ``mapping``'s pairs.

    A column is hashed natively only when it is not computed by the plan, both sides
    declare the same type, and its hash equates exactly the values that print the same;
    otherwise its text is hashed, so e.g. an int4 column against an int8 one, or a value
    cast by the plan against the target's column, compares by value as text.
    """
    s_parts: list[sql.Composable] = []
    t_parts: list[sql.Composable] = []
    for p in mapping.pairs:
        typ, base = src.columns.get(p.source, ""), src.base.get(p.source, "")
        same = not p.mapped and tgt.columns.get(p.target) == typ and tgt.base.get(p.target) == base
        deterministic = src.deterministic.get(p.source, True) and tgt.deterministic.get(
            p.target, True
        )
        for value, out in ((p.source_value, s_parts), (p.target_value, t_parts)):
            if same and base in NATIVE_HASH_TYPES and (base not in _COLLATED or deterministic):
                out.append(value)
            elif same and base == "numeric":
                out.append(sql.SQL("{}, scale({})").format(value, value))
            else:
                out.append(sql.SQL('({})::text COLLATE "C"').format(value))

    def record(parts: list[sql.Composable]) -> sql.Composable:
        return sql.SQL("hash_record_extended(ROW({}), 0)").format(sql.SQL(", ").join(parts))

    return record(s_parts), record(t_parts)


def _sum_expr(column: str, base: str) -> sql.Composable:
    ident = sql.Identifier(column)
    if base in EXACT_SUM_TYPES:
        return sql.SQL("sum({})::text").format(ident)
    return sql.SQL("sum({}::numeric)::text").format(ident)


@dataclass(frozen=True)
class _View:
    """How one side of a table is read: its key columns, row hash, summed values, filter."""

    key: tuple[str, ...]
    hash: sql.Composable
    sums: tuple[sql.Composable, ...]  # the numeric values, in :attr:`_Table.numeric` order
    relation: sql.Composable  # the table as this side names it (the plan may rename it)
    filter: sql.Composable | None = None
    row: tuple[sql.Composable, ...] = ()  # the compared values, for keyless tables

    def where(self, rng: KeyRange | None = None) -> sql.Composable:
        """`` WHERE`` the range (None: whole table) and the side's filter, or nothing."""
        pred = None if rng is None else vr.range_predicate(self.key, rng)
        return vp.where_clause(pred, self.filter)


@dataclass
class _Table:
    """One table's comparison inputs, decided once from both sides' shapes and the plan.

    This is where a column mapping enters: each side gets its own key names, row hash,
    summed values and filter (:mod:`cdcsync.core.verify_plan`), and every query is built
    from the side's :class:`_View`; key values and sums are compared as text.
    """

    table: TableId
    key: tuple[str, ...]  # the key as reported: the target's names
    numeric: tuple[str, ...]  # the summed columns as reported: the target's names
    base: dict[str, str]  # summed column → the base type its sum is computed in
    source: _View
    target: _View


def _spec(table: TableId, mapping: vp.Mapping, src: _Shape, tgt: _Shape) -> _Table:
    s_hash, t_hash = row_hashes(mapping, src, tgt)
    summed = [
        p for p in mapping.pairs if (p.target in tgt.numeric if p.cast else p.source in src.numeric)
    ]
    base = {
        p.target: (tgt.base.get(p.target, "") if p.cast else src.base.get(p.source, ""))
        for p in summed
    }
    return _Table(
        table,
        mapping.target_key,
        tuple(p.target for p in summed),
        base,
        _View(
            mapping.source_key,
            s_hash,
            tuple(p.source_value for p in summed),
            _ident(table),
            mapping.source_filter,
            tuple(p.source_value for p in mapping.pairs),
        ),
        _View(
            mapping.target_key,
            t_hash,
            tuple(p.target_value for p in summed),
            _ident(mapping.target_table),
            mapping.target_filter,
            tuple(p.target_value for p in mapping.pairs),
        ),
    )


class _Checker:
    """Verifies tables over two :class:`_Side` s; one coordinating thread per table.

    Under a ``plan`` each included table is compared as the plan maps it (see
    :mod:`cdcsync.core.verify_plan`), excluded ones are not compared; ``reverse`` says
    the target has been the primary.
    """

    def __init__(
        self,
        source: _Side,
        target: _Side,
        level: Level,
        workers: int,
        max_keys: int,
        *,
        progress: RangeLog | None = None,
        scope: Scope | None = None,
        range_bytes: int | None = None,
        plan: plan_mod.Plan | None = None,
        reverse: bool = False,
    ) -> None:
        self.source = source
        self.target = target
        self.level = level
        self.workers = workers
        self.max_keys = max_keys
        self.progress = progress
        self.scope = scope or Scope()
        self.range_bytes = range_bytes
        self.plan = plan
        self.reverse = reverse
        self._lock = threading.Lock()

    def run(self, tables: list[TableId]) -> list[tuple[TableResult, Reconciliation]]:
        if not tables:
            return []
        threads = min(len(tables), max(4, 2 * self.workers))
        with ThreadPoolExecutor(threads, thread_name_prefix="verify-table") as pool:
            out = list(pool.map(self.table, tables))
        # A restricted table has no totals; callers of a whole run always get them.
        return [(r, rec if rec is not None else Reconciliation()) for r, rec in out]

    def run_scoped(self, tables: list[TableId]) -> list[tuple[TableResult, Reconciliation | None]]:
        """Like :meth:`run`, with None as the totals of tables checked only in part."""
        if not tables:
            return []
        threads = min(len(tables), max(4, 2 * self.workers))
        with ThreadPoolExecutor(threads, thread_name_prefix="verify-table") as pool:
            return list(pool.map(self.table, tables))

    def both(
        self, statement: sql.Composed | sql.SQL, params: Sequence[Any] | None = None
    ) -> tuple[list[Any], list[Any]]:
        """The same query on both sides at once."""
        s, t = self.source.query(statement, params), self.target.query(statement, params)
        return s.result(), t.result()

    def each(
        self, build: Callable[[_View], sql.Composable], spec: _Table, params: Any = None
    ) -> tuple[list[Any], list[Any]]:
        """A query built per side from its view, on both sides at once."""
        s = self.source.query(cast(sql.Composed, build(spec.source)), params)
        t = self.target.query(cast(sql.Composed, build(spec.target)), params)
        return s.result(), t.result()

    def table(self, table: TableId) -> tuple[TableResult, Reconciliation | None]:
        if self.progress is not None:
            finished = self.progress.finished_table(table)
            if finished is not None:
                return finished
        started = time.monotonic()
        result = TableResult(table, self.level)
        tp = None if self.plan is None else self.plan.table(table)
        if tp is not None and not tp.include:
            result.method = "excluded"
            result.notes.append("excluded by the plan: not migrated, not compared")
            return result, None
        rec: Reconciliation | None = Reconciliation()
        on_target = table if tp is None else tp.target_table  # a renamed table's name there
        s_future = self.source.submit(lambda c: _shape(c, table))
        t_future = self.target.submit(lambda c: _shape(c, on_target))
        src, tgt = s_future.result(), t_future.result()
        if not src.exists or src.kind not in ("r", "p"):
            raise ConfigError(f"table {table} not found on the source")
        mapping = None
        if not tgt.exists or tgt.kind not in ("r", "p"):
            result.error = (
                "table missing on the target"
                if on_target == table
                else f"table missing on the target (renamed by the plan to {on_target})"
            )
        else:
            try:
                mapping = vp.build(table, tp, src.columns, src.key, reverse=self.reverse)
            except ValueError as exc:
                result.error = str(exc)
        if mapping is not None:
            self._check_columns(mapping, src, tgt, result)
        if result.error is None and mapping is not None:
            spec = _spec(table, mapping, src, tgt)
            result.key = spec.key
            if self.level == "counts":
                rec = Reconciliation()
                self._counts(spec, result, rec)
            elif src.key:
                if table in self.scope.only:
                    rec = None
                self._keyed(spec, src, result, rec)
            else:
                self._keyless(spec, result, rec)
            if self.level != "counts" and table not in self.scope.only:
                self._added(mapping, result)
        result.seconds = time.monotonic() - started
        if self.progress is not None:
            self.progress.table_done(table, result, rec)
        return result, rec

    def _check_columns(
        self, mapping: vp.Mapping, src: _Shape, tgt: _Shape, result: TableResult
    ) -> None:
        """Columns the target lacks (an error), differing types and uncompared ones (notes)."""
        missing = [p.target for p in mapping.pairs if p.target not in tgt.columns]
        if missing:
            result.error = f"column(s) missing on the target: {', '.join(missing)}"
        for p in mapping.pairs:
            typ, theirs = src.columns[p.source], tgt.columns.get(p.target)
            if theirs is None:
                continue
            if p.cast:
                result.notes.append(f"{p.target}: {typ} on the source, cast to {theirs}")
            elif theirs != typ:
                result.notes.append(f"{p.target}: {typ} on the source, {theirs} on target")
        result.notes.extend(mapping.skipped)
        if mapping.renamed is not None:
            result.notes.append(f"renamed by the plan: {mapping.renamed} on the target")
        if mapping.source_filter is not None:
            where = "both sides" if mapping.target_filter is not None else "the source"
            result.notes.append(f"rows filtered by the plan on {where}")
        known = {p.target for p in mapping.pairs} | {a for a, _ in mapping.added}
        known |= set(mapping.uncompared)
        extra = [c for c in tgt.columns if c not in known]
        if extra:
            result.notes.append(f"not compared, only on the target: {', '.join(extra)}")

    def _added(self, mapping: vp.Mapping, result: TableResult) -> None:
        """How many target rows hold something else than their added column's default."""
        if not mapping.added:
            return
        counts = sql.SQL(", ").join(
            sql.SQL("count(*) FILTER (WHERE {} IS DISTINCT FROM ({}))").format(
                sql.Identifier(name), sql.SQL(default)
            )
            for name, default in mapping.added
        )
        try:
            row = self.target.query(
                sql.SQL("SELECT {} FROM {}").format(counts, _ident(mapping.target_table))
            ).result()[0]
        except psycopg.Error as exc:
            result.notes.append(f"added column(s): their defaults could not be compared ({exc})")
            return
        for (name, default), n in zip(mapping.added, row, strict=True):
            result.notes.append(
                f"{name}: added by the plan, not in the row hash; "
                f"{int(n)} row(s) differ from its default {default}"
            )

    # counts -------------------------------------------------------------------------

    def _counts(self, spec: _Table, result: TableResult, rec: Reconciliation) -> None:
        result.method = "count"
        s, t = self.each(
            lambda v: sql.SQL("SELECT count(*) FROM {}{}").format(v.relation, v.where()),
            spec,
        )
        result.source_rows, result.target_rows = int(s[0][0]), int(t[0][0])
        result.ranges = 1
        rec.source_rows, rec.target_rows = result.source_rows, result.target_rows

    # tables with a primary key ------------------------------------------------------

    def _plan(self, spec: _Table, shape: _Shape) -> list[KeyRange]:
        """Top-level ranges: given by the scope, recorded by an interrupted run, or sampled."""
        given = self.scope.plans.get(spec.table)
        if given is not None:
            return list(given)
        if self.progress is not None:
            recorded = self.progress.plan(spec.table)
            if recorded is not None:
                return recorded
        pieces = vr.range_count(shape.bytes, self.workers, self.range_bytes)
        boundaries: list[Bound] = []
        if pieces > 1:
            key = spec.source.key
            sample = self.source.query(
                sql.SQL(
                    "SELECT {} FROM (SELECT {} FROM {} TABLESAMPLE SYSTEM ({}) REPEATABLE (7)) s "
                    "ORDER BY {}"
                ).format(
                    _texts("s", key),
                    _cols(key),
                    spec.source.relation,
                    sql.Literal(vr.sample_percent(shape.blocks, pieces)),
                    sql.SQL(", ").join(sql.Identifier("s", k) for k in key),
                )
            ).result()
            boundaries = vr.quantile_boundaries([tuple(str(v) for v in r) for r in sample], pieces)
        ranges = vr.split(KeyRange(None, None), boundaries)
        if self.progress is not None:
            self.progress.save_plan(spec.table, ranges)
        return ranges

    def _keyed(
        self, spec: _Table, shape: _Shape, result: TableResult, rec: Reconciliation | None
    ) -> None:
        result.method = "key ranges"
        ranges = self._plan(spec, shape)
        result.plan = ranges
        result.ranges = len(ranges)
        only = self.scope.only.get(spec.table)
        wanted = [i for i in range(len(ranges)) if only is None or i in only]
        done = self.progress.done_ranges(spec.table) if self.progress is not None else {}
        wanted_set = set(wanted)
        done = {i: o for i, o in done.items() if i in wanted_set}
        result.resumed_ranges = len(done)
        todo = [i for i in wanted if i not in done]
        sums = rec is not None
        numeric = spec.numeric if sums else ()
        outcomes: dict[int, RangeOutcome] = dict(done)
        parts = self._range_digests(spec, sums, [ranges[i] for i in todo])
        # Results come back range by range as both sides finish; each is recorded (and
        # drilled into) as soon as it is known, so an interruption loses little.
        for i, (s, s_sums, t, t_sums) in zip(todo, parts, strict=True):
            found = Findings()
            if s != t and self.level == "rows":
                self._drill(spec, ranges[i], s, t, found)
            outcome = RangeOutcome(i, s, t, s_sums, t_sums, found)
            if self.progress is not None:
                self.progress.range_done(spec.table, outcome)
            outcomes[i] = outcome
        result.checked = sorted(outcomes)
        ordered = [outcomes[i] for i in result.checked]
        result.source_rows = sum(o.source.rows for o in ordered)
        result.target_rows = sum(o.target.rows for o in ordered)
        if rec is not None:
            rec.source_rows, rec.target_rows = result.source_rows, result.target_rows
            for n, col in enumerate(numeric):
                rec.source_sums[col] = vr.add_sums(o.source_sums[n] for o in ordered)
                rec.target_sums[col] = vr.add_sums(o.target_sums[n] for o in ordered)
        for o in ordered:
            if o.source != o.target:
                rng = ranges[o.index]
                result.differing_ranges.append(
                    RangeResult(rng.lower, rng.upper, o.source.rows, o.target.rows)
                )
                result.add(o.findings, self.max_keys)
                if self.level != "rows":
                    result.leaves.append(rng)

    def _range_digests(self, spec: _Table, sums: bool, ranges: Sequence[KeyRange]) -> Any:
        """Per range, as each completes: (source digest, sums, target digest, sums)."""
        numeric = spec.numeric if sums else ()
        outer: list[sql.Composable] = [
            sql.SQL("count(*)"),
            sql.SQL("bit_xor(h)::text || ':' || sum(h)::text"),
        ]
        outer += [_sum_expr(f"n{i}", spec.base.get(c, "")) for i, c in enumerate(numeric)]

        def statement(view: _View, rng: KeyRange) -> sql.Composed:
            inner: list[sql.Composable] = [sql.SQL("{} AS h").format(view.hash)]
            inner += [
                sql.SQL("{} AS {}").format(value, sql.Identifier(f"n{i}"))
                for i, value in enumerate(view.sums[: len(numeric)])
            ]
            # OFFSET 0 keeps the planner from inlining the hash into each aggregate.
            return sql.SQL("SELECT {} FROM (SELECT {} FROM {}{} OFFSET 0) s").format(
                sql.SQL(", ").join(outer),
                sql.SQL(", ").join(inner),
                view.relation,
                view.where(rng),
            )

        futures = [
            (
                self.source.query(statement(spec.source, rng)),
                self.target.query(statement(spec.target, rng)),
            )
            for rng in ranges
        ]

        def parse(rows: list[Any]) -> tuple[Digest, list[str | None]]:
            r = rows[0]
            n = int(r[0])
            return Digest(n, r[1] if n else None), [None if v is None else str(v) for v in r[2:]]

        for s, t in futures:
            sd, ss = parse(s.result())
            td, ts = parse(t.result())
            yield sd, ss, td, ts

    def _drill(self, spec: _Table, rng: KeyRange, s: Digest, t: Digest, found: Findings) -> None:
        """Narrow a differing range down to its differing keys (named as on the target)."""
        table, key = spec.table, spec.key

        def rows_of(view: _View, limit: int | None = None) -> sql.Composed:
            return sql.SQL("SELECT {}, {}::text FROM {}{}{}").format(
                _texts(None, view.key),
                view.hash,
                view.relation,
                view.where(rng),
                sql.SQL("")
                if limit is None
                else sql.SQL(" ORDER BY {} LIMIT {}").format(_cols(view.key), sql.Literal(limit)),
            )

        if s.rows == 0 or t.rows == 0:
            # One side is empty here: every row of the other differs; list the first few.
            side, view, out = (
                (self.source, spec.source, found.source_only)
                if t.rows == 0
                else (self.target, spec.target, found.target_only)
            )
            found.differing_rows += s.rows + t.rows
            found.leaves.append(rng)
            room = max(self.max_keys, MAX_TRACKED_ROWS - len(found.hashes))
            for r in side.query(rows_of(view, room)).result():
                k = tuple(str(v) for v in r[:-1])
                if len(out) < self.max_keys:
                    out.append(_key_dict(key, k))
                found.hashes[k] = (str(r[-1]), None) if t.rows == 0 else (None, str(r[-1]))
            return
        if max(s.rows, t.rows) <= vr.LEAF_ROWS:
            s_rows, t_rows = self.each(rows_of, spec)
            s_map = {tuple(str(v) for v in r[:-1]): str(r[-1]) for r in s_rows}
            t_map = {tuple(str(v) for v in r[:-1]): str(r[-1]) for r in t_rows}
            diff = vr.diff_rows(s_map, t_map)
            found.differing_rows += diff.total
            found.leaves.append(rng)
            for keys, out in (
                (diff.source_only, found.source_only),
                (diff.target_only, found.target_only),
                (diff.changed, found.changed),
            ):
                room = self.max_keys - len(out)
                out.extend(_key_dict(key, k) for k in keys[: max(room, 0)])
                for k in keys:
                    if len(found.hashes) < MAX_TRACKED_ROWS:
                        found.hashes[k] = (s_map.get(k), t_map.get(k))
            return
        bigger, view = (
            (self.source, spec.source) if s.rows >= t.rows else (self.target, spec.target)
        )
        step = vr.subrange_step(max(s.rows, t.rows))
        sample = bigger.query(
            sql.SQL(
                "SELECT {} FROM (SELECT {}, row_number() OVER (ORDER BY {}) AS rn FROM {}{}) s "
                "WHERE s.rn > 1 AND (s.rn - 1) % {} = 0 ORDER BY s.rn"
            ).format(
                _texts("s", view.key),
                _cols(view.key),
                _cols(view.key),
                view.relation,
                view.where(rng),
                sql.Literal(step),
            )
        ).result()
        boundaries = [tuple(str(v) for v in r) for r in sample]
        if not boundaries:  # cannot happen with more rows than a leaf; never loop
            raise RuntimeError(f"no sub-boundaries in a differing range of {table}")
        subranges = vr.split(rng, boundaries)
        for sub, (sd, _, td, _) in zip(
            subranges, list(self._range_digests(spec, False, subranges)), strict=True
        ):
            if sd != td:
                self._drill(spec, sub, sd, td, found)

    # tables without a primary key ---------------------------------------------------

    def _keyless(self, spec: _Table, result: TableResult, rec: Reconciliation | None) -> None:
        """Rows as a multiset: 256 buckets by the first byte of each row's digest.

        A row's digest is that of its text as a row of the compared values, in the
        source's column order, so renamed and dropped columns follow the plan.
        """
        result.method = "row-digest buckets"
        rec = rec if rec is not None else Reconciliation()
        numeric = spec.numeric

        def buckets(view: _View) -> sql.Composed:
            inner = sql.SQL("SELECT md5(ROW({})::text) AS h{} FROM {}{}").format(
                sql.SQL(", ").join(view.row),
                sql.SQL("").join(
                    sql.SQL(", {} AS {}").format(v, sql.Identifier(f"n{i}"))
                    for i, v in enumerate(view.sums)
                ),
                view.relation,
                view.where(),
            )
            sums = [
                sql.SQL("sum({}::numeric)::text").format(sql.Identifier(f"n{i}"))
                for i in range(len(numeric))
            ]
            return sql.SQL(
                "SELECT substr(h, 1, 2), count(*), "
                "md5(string_agg(h, '' ORDER BY h COLLATE \"C\")){} FROM ({}) s GROUP BY 1"
            ).format(sql.SQL("").join(sql.SQL(", {}").format(s) for s in sums), inner)

        s_rows, t_rows = self.each(buckets, spec)
        s_buckets = {str(r[0]): r for r in s_rows}
        t_buckets = {str(r[0]): r for r in t_rows}
        result.ranges = 256
        result.source_rows = sum(int(r[1]) for r in s_rows)
        result.target_rows = sum(int(r[1]) for r in t_rows)
        rec.source_rows, rec.target_rows = result.source_rows, result.target_rows
        for i, col in enumerate(numeric):
            rec.source_sums[col] = vr.add_sums(
                None if r[3 + i] is None else str(r[3 + i]) for r in s_rows
            )
            rec.target_sums[col] = vr.add_sums(
                None if r[3 + i] is None else str(r[3 + i]) for r in t_rows
            )
        differing = sorted(
            b
            for b in set(s_buckets) | set(t_buckets)
            if (s_buckets.get(b) or (b, 0, None))[1:3] != (t_buckets.get(b) or (b, 0, None))[1:3]
        )
        for b in differing:
            result.differing_ranges.append(
                RangeResult(
                    None,
                    None,
                    int(s_buckets[b][1]) if b in s_buckets else 0,
                    int(t_buckets[b][1]) if b in t_buckets else 0,
                    bucket=b,
                )
            )
        if self.level != "rows" or not differing:
            return

        # Second pass over the differing buckets only: digest → copies, and one row's text.
        def detail(view: _View) -> sql.Composed:
            return sql.SQL(
                'SELECT h, count(*), min(r COLLATE "C") FROM (SELECT md5(x) AS h, x AS r FROM '
                "(SELECT ROW({})::text AS x FROM {}{}) y) s WHERE substr(h, 1, 2) = ANY(%s) "
                "GROUP BY h"
            ).format(sql.SQL(", ").join(view.row), view.relation, view.where())

        s_detail, t_detail = self.each(detail, spec, (differing,))
        text = {str(r[0]): str(r[2]) for r in (*s_detail, *t_detail)}
        s_extra, t_extra = vr.diff_multisets(
            {str(r[0]): int(r[1]) for r in s_detail}, {str(r[0]): int(r[1]) for r in t_detail}
        )
        result.differing_rows = sum(s_extra.values()) + sum(t_extra.values())
        for extra, out in ((s_extra, result.source_only), (t_extra, result.target_only)):
            for h in sorted(extra, key=lambda h: text[h])[: self.max_keys]:
                out.append({"row": text[h], "copies": str(extra[h])})
        for h in (*s_extra, *t_extra):
            if len(result.hashes) < MAX_TRACKED_ROWS:
                result.hashes[(h,)] = (
                    f"{h}x{s_extra.get(h, 0)}" if h in s_extra else None,
                    f"{h}x{t_extra.get(h, 0)}" if h in t_extra else None,
                )


def _ident(table: TableId) -> sql.Identifier:
    return sql.Identifier(table.schema, table.name)


def _cols(columns: Sequence[str]) -> sql.Composable:
    return sql.SQL(", ").join(map(sql.Identifier, columns))


def _texts(alias: str | None, columns: Sequence[str]) -> sql.Composable:
    return sql.SQL(", ").join(
        sql.SQL("{}::text").format(sql.Identifier(alias, c) if alias else sql.Identifier(c))
        for c in columns
    )


def _key_dict(key: Sequence[str], values: Bound) -> dict[str, str]:
    return dict(zip(key, values, strict=True))


def _bound(value: Any) -> Bound | None:
    return None if value is None else tuple(str(v) for v in value)


def _range_doc(rng: KeyRange) -> list[list[str] | None]:
    return [
        None if rng.lower is None else list(rng.lower),
        None if rng.upper is None else list(rng.upper),
    ]


def _range_of(doc: Sequence[Any]) -> KeyRange:
    return KeyRange(_bound(doc[0]), _bound(doc[1]))
