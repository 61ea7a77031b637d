"""Compare migrated tables between source and target, computed inside each database.

Each side is read at one instant: its first connection opens a REPEATABLE READ READ
ONLY transaction and exports its snapshot, and the side's other connections import it,
so every query on a side — range digests, drill-downs, sums — sees the same data while
both sides work in parallel (one thread per connection). Only reads are issued, so a
write-fenced target verifies like any other, and the cutover can call this under its
write freeze.

Every connection gets the same session settings, so a value prints the same text on
both sides whatever the servers' defaults (time zone, date and interval styles, float
digits, bytea format, money locale, search path for regclass and friends).

Levels:

- ``counts``: ``count(*)`` on both sides — the cheap check under a freeze;
- ``checksum``: per key range ``count(*)`` and ``md5(string_agg(row text ORDER BY key))``
  plus the sum of every numeric column (the reconciliation totals); tables
  without a primary key get digests of 256 buckets of row digests, order-independent;
- ``rows``: as ``checksum``, then differing ranges are cut again and again, down to
  ranges compared row by row, which names the differing keys.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

import psycopg
from psycopg import sql

from cdcsync import metrics
from cdcsync.adapters.pg import connect
from cdcsync.core import verify_ranges as vr
from cdcsync.core.events import TableId
from cdcsync.core.verify_ranges import Bound, Digest, KeyRange
from cdcsync.errors import ConfigError

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

DEFAULT_MAX_KEYS = 20

T = TypeVar("T")


@dataclass
class RangeResult:
    """A top-level range (or, for keyless tables, a digest bucket) that differs."""

    lower: Bound | None
    upper: Bound | None
    source_rows: int
    target_rows: int
    bucket: str | None = None


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


@dataclass
class VerifyReport:
    level: str
    tables: list[TableResult]
    reconciliation: dict[TableId, Reconciliation]
    timings: dict[str, float]

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
            "mismatches": {str(t): n for t, n in self.mismatches.items()},
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "tables": [
                {
                    "table": str(r.table),
                    "ok": r.ok,
                    "method": r.method,
                    "key": list(r.key),
                    "source_rows": r.source_rows,
                    "target_rows": r.target_rows,
                    "ranges": r.ranges,
                    "differing_ranges": [
                        {
                            "lower": None if d.lower is None else list(d.lower),
                            "upper": None if d.upper is None else list(d.upper),
                            "bucket": d.bucket,
                            "source_rows": d.source_rows,
                            "target_rows": d.target_rows,
                        }
                        for d in r.differing_ranges
                    ],
                    "differing_rows": r.differing_rows,
                    "source_only": r.source_only,
                    "target_only": r.target_only,
                    "changed": r.changed,
                    "error": r.error,
                    "notes": r.notes,
                    "seconds": round(r.seconds, 4),
                }
                for r in self.tables
            ],
            "reconciliation": [
                {
                    "table": str(t),
                    "ok": rec.ok,
                    "source_rows": rec.source_rows,
                    "target_rows": rec.target_rows,
                    "source_sums": rec.source_sums,
                    "target_sums": rec.target_sums,
                    "differing_columns": rec.differing_columns,
                }
                for t, rec in self.reconciliation.items()
            ],
        }


def verify_tables(
    source_dsn: str,
    target_dsn: str,
    tables: Sequence[TableId],
    level: Literal["counts", "checksum", "rows"],
    *,
    workers: int = 2,
    state_schema: str = "cdcsync",
    max_keys: int = DEFAULT_MAX_KEYS,
) -> VerifyReport:
    """Compare ``tables`` on both sides at ``level``; records the result as metrics.

    ``max_keys`` caps the keys listed per kind of difference (the count is exact).
    Tables of ``state_schema`` are refused: cdcsync's own state differs by design.
    A table missing on the source is a usage error; anything else that differs —
    a table or column missing on the target included — is a mismatch in the report.
    """
    if level not in LEVELS:
        raise ConfigError(f"verification level {level!r}: use one of {', '.join(LEVELS)}")
    own = [str(t) for t in tables if t.schema == state_schema]
    if own:
        raise ConfigError(f"{', '.join(own)} belong to cdcsync's state schema {state_schema}")
    workers = max(1, workers)
    started = time.monotonic()
    timings: dict[str, float] = {}
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
    timings["open_seconds"] = time.monotonic() - started
    try:
        checker = _Checker(source, target, level, workers, max_keys)
        results = checker.run(list(dict.fromkeys(tables)))
    finally:
        source.close()
        target.close()
    timings["total_seconds"] = time.monotonic() - started
    report = VerifyReport(
        level=level,
        tables=[r for r, _ in results],
        reconciliation={r.table: rec for r, rec in results},
        timings=timings,
    )
    counted: dict[TableId | str, int] = dict(report.mismatches.items())
    metrics.record_verification(counted)
    log.info(
        "verification %s at level %s: %d table(s) in %.2fs",
        "clean" if report.ok else "found differences",
        level,
        len(report.tables),
        timings["total_seconds"],
    )
    return report


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
        self, statement: sql.Composed, params: Sequence[Any] | None = None
    ) -> Future[list[Any]]:
        return self.submit(lambda conn: conn.execute(statement, params).fetchall())

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
        "(CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END) = ANY(%s::regtype[]) "
        "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
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
        {str(n): str(t) for n, t, _ in cols},
        tuple(str(n) for n, _, numeric in cols if numeric),
        tuple(str(r[0]) for r in key),
        int(size[0]) if size else 0,
        int(size[1]) if size else 0,
    )


class _Checker:
    """Verifies tables over two :class:`_Side` s; one coordinating thread per table."""

    def __init__(
        self, source: _Side, target: _Side, level: Level, workers: int, max_keys: int
    ) -> None:
        self.source = source
        self.target = target
        self.level = level
        self.workers = workers
        self.max_keys = max_keys

    def run(self, tables: list[TableId]) -> list[tuple[TableResult, Reconciliation]]:
        if not tables:
            return []
        threads = min(len(tables), max(4, 2 * self.workers))
        with ThreadPoolExecutor(threads, thread_name_prefix="verify-table") as pool:
            return list(pool.map(self.table, tables))

    def both(
        self, statement: sql.Composed, params: Sequence[Any] | None = None
    ) -> tuple[list[Any], list[Any]]:
        """The same query on both sides at once."""
        s, t = self.source.query(statement, params), self.target.query(statement, params)
        return s.result(), t.result()

    def table(self, table: TableId) -> tuple[TableResult, Reconciliation]:
        started = time.monotonic()
        result = TableResult(table, self.level)
        rec = Reconciliation()
        s_future = self.source.submit(lambda c: _shape(c, table))
        t_future = self.target.submit(lambda c: _shape(c, table))
        src, tgt = s_future.result(), t_future.result()
        if not src.exists or src.kind not in ("r", "p"):
            raise ConfigError(f"table {table} not found on the source")
        if not tgt.exists or tgt.kind not in ("r", "p"):
            result.error = "table missing on the target"
        else:
            missing = [c for c in src.columns if c not in tgt.columns]
            if missing:
                result.error = f"column(s) missing on the target: {', '.join(missing)}"
            for col, typ in src.columns.items():
                if col in tgt.columns and tgt.columns[col] != typ:
                    result.notes.append(f"{col}: {typ} on the source, {tgt.columns[col]} on target")
            extra = [c for c in tgt.columns if c not in src.columns]
            if extra:
                result.notes.append(f"not compared, only on the target: {', '.join(extra)}")
        if result.error is not None:
            result.seconds = time.monotonic() - started
            return result, rec
        result.key = src.key
        if self.level == "counts":
            self._counts(table, result, rec)
        elif src.key:
            self._keyed(table, src, result, rec)
        else:
            self._keyless(table, src, result, rec)
        result.seconds = time.monotonic() - started
        return result, rec

    # counts -------------------------------------------------------------------------

    def _counts(self, table: TableId, result: TableResult, rec: Reconciliation) -> None:
        result.method = "count"
        s, t = self.both(sql.SQL("SELECT count(*) FROM {}").format(_ident(table)))
        result.source_rows, result.target_rows = int(s[0][0]), int(t[0][0])
        result.ranges = 1
        rec.source_rows, rec.target_rows = result.source_rows, result.target_rows

    # tables with a primary key ------------------------------------------------------

    def _keyed(
        self, table: TableId, shape: _Shape, result: TableResult, rec: Reconciliation
    ) -> None:
        result.method = "key ranges"
        key = shape.key
        pieces = vr.range_count(shape.bytes, self.workers)
        boundaries: list[Bound] = []
        if pieces > 1:
            sample = self.source.query(
                sql.SQL(
                    "SELECT {} FROM (SELECT {} FROM {} TABLESAMPLE SYSTEM ({}) REPEATABLE (7)) s "
                    "ORDER BY {}"
                ).format(
                    _texts("s", key),
                    _cols(key),
                    _ident(table),
                    sql.Literal(vr.sample_percent(shape.blocks, pieces)),
                    sql.SQL(", ").join(sql.Identifier("s", k) for k in key),
                )
            ).result()
            boundaries = vr.quantile_boundaries([tuple(str(v) for v in r) for r in sample], pieces)
        ranges = vr.split(KeyRange(None, None), boundaries)
        result.ranges = len(ranges)
        columns = list(shape.columns)
        s_parts, t_parts = self._range_digests(table, columns, key, shape.numeric, ranges)
        s_digests = [p[0] for p in s_parts]
        t_digests = [p[0] for p in t_parts]
        result.source_rows = sum(d.rows for d in s_digests)
        result.target_rows = sum(d.rows for d in t_digests)
        rec.source_rows, rec.target_rows = result.source_rows, result.target_rows
        for i, col in enumerate(shape.numeric):
            rec.source_sums[col] = vr.add_sums(p[1][i] for p in s_parts)
            rec.target_sums[col] = vr.add_sums(p[1][i] for p in t_parts)
        for i in vr.differing(s_digests, t_digests):
            rng = ranges[i]
            result.differing_ranges.append(
                RangeResult(rng.lower, rng.upper, s_digests[i].rows, t_digests[i].rows)
            )
            if self.level == "rows":
                self._drill(table, columns, key, rng, s_digests[i], t_digests[i], result)

    def _range_digests(
        self,
        table: TableId,
        columns: Sequence[str],
        key: Sequence[str],
        numeric: Sequence[str],
        ranges: Sequence[KeyRange],
    ) -> tuple[list[tuple[Digest, list[str | None]]], list[tuple[Digest, list[str | None]]]]:
        """Per range and side: count, digest, and the numeric columns' sums."""
        sums = [sql.SQL("sum({}::numeric)::text").format(sql.Identifier(c)) for c in numeric]
        select = sql.SQL(", ").join(
            [
                sql.SQL("count(*)"),
                # Row texts are unambiguous (composite output quotes newlines), so one
                # md5 over their concatenation is exact and twice as fast as one per row.
                sql.SQL("md5(string_agg({}::text, E'\\n' ORDER BY {}))").format(
                    _row(columns), _cols(key)
                ),
                *sums,
            ]
        )
        futures = []
        for rng in ranges:
            where = vr.range_predicate(key, rng)
            statement = sql.SQL("SELECT {} FROM {}{}").format(
                select,
                _ident(table),
                sql.SQL("") if where is None else sql.SQL(" WHERE {}").format(where),
            )
            futures.append((self.source.query(statement), self.target.query(statement)))

        def parse(rows: list[Any]) -> tuple[Digest, list[str | None]]:
            r = rows[0]
            return Digest(int(r[0]), r[1]), [None if v is None else str(v) for v in r[2:]]

        return (
            [parse(s.result()) for s, _ in futures],
            [parse(t.result()) for _, t in futures],
        )

    def _drill(
        self,
        table: TableId,
        columns: Sequence[str],
        key: Sequence[str],
        rng: KeyRange,
        s: Digest,
        t: Digest,
        result: TableResult,
    ) -> None:
        """Narrow a differing range down to its differing keys."""
        where = vr.range_predicate(key, rng)
        where_sql = sql.SQL("") if where is None else sql.SQL(" WHERE {}").format(where)
        if s.rows == 0 or t.rows == 0:
            # One side is empty here: every row of the other differs; list the first few.
            side, out = (
                (self.source, result.source_only)
                if t.rows == 0
                else (
                    self.target,
                    result.target_only,
                )
            )
            result.differing_rows += s.rows + t.rows
            room = self.max_keys - len(out)
            if room > 0:
                rows = side.query(
                    sql.SQL("SELECT {} FROM {}{} ORDER BY {} LIMIT {}").format(
                        _texts(None, key), _ident(table), where_sql, _cols(key), sql.Literal(room)
                    )
                ).result()
                out.extend(_key_dict(key, tuple(str(v) for v in r)) for r in rows)
            return
        if max(s.rows, t.rows) <= vr.LEAF_ROWS:
            statement = sql.SQL("SELECT {}, md5({}::text) FROM {}{}").format(
                _texts(None, key), _row(columns), _ident(table), where_sql
            )
            s_rows, t_rows = self.both(statement)
            diff = vr.diff_rows(
                {tuple(str(v) for v in r[:-1]): str(r[-1]) for r in s_rows},
                {tuple(str(v) for v in r[:-1]): str(r[-1]) for r in t_rows},
            )
            result.differing_rows += diff.total
            for keys, out in (
                (diff.source_only, result.source_only),
                (diff.target_only, result.target_only),
                (diff.changed, result.changed),
            ):
                room = self.max_keys - len(out)
                out.extend(_key_dict(key, k) for k in keys[: max(room, 0)])
            return
        bigger = self.source if s.rows >= t.rows else self.target
        step = vr.subrange_step(max(s.rows, t.rows))
        sample = bigger.query(
            sql.SQL(
                "SELECT {} FROM (SELECT {}, row_number() OVER (ORDER BY {}) AS rn FROM {}{}) s "
                "WHERE s.rn > 1 AND (s.rn - 1) % {} = 0 ORDER BY s.rn"
            ).format(
                _texts("s", key),
                _cols(key),
                _cols(key),
                _ident(table),
                where_sql,
                sql.Literal(step),
            )
        ).result()
        boundaries = [tuple(str(v) for v in r) for r in sample]
        if not boundaries:  # cannot happen with more rows than a leaf; never loop
            raise RuntimeError(f"no sub-boundaries in a differing range of {table}")
        subranges = vr.split(rng, boundaries)
        s_parts, t_parts = self._range_digests(table, columns, key, (), subranges)
        for i in vr.differing([p[0] for p in s_parts], [p[0] for p in t_parts]):
            self._drill(table, columns, key, subranges[i], s_parts[i][0], t_parts[i][0], result)

    # tables without a primary key ---------------------------------------------------

    def _keyless(
        self, table: TableId, shape: _Shape, result: TableResult, rec: Reconciliation
    ) -> None:
        """Rows as a multiset: 256 buckets by the first byte of each row's digest."""
        result.method = "row-digest buckets"
        columns = list(shape.columns)
        inner = sql.SQL("SELECT md5({}::text) AS h{} FROM {}").format(
            _row(columns),
            sql.SQL("").join(sql.SQL(", {}").format(sql.Identifier(c)) for c in shape.numeric),
            _ident(table),
        )
        sums = [sql.SQL("sum({}::numeric)::text").format(sql.Identifier(c)) for c in shape.numeric]
        statement = sql.SQL(
            "SELECT substr(h, 1, 2), count(*), md5(string_agg(h, '' ORDER BY h COLLATE \"C\")){} "
            "FROM ({}) s GROUP BY 1"
        ).format(sql.SQL("").join(sql.SQL(", {}").format(s) for s in sums), inner)
        s_rows, t_rows = self.both(statement)
        s_buckets = {str(r[0]): r for r in s_rows}
        t_buckets = {str(r[0]): r for r in t_rows}
        result.ranges = 256
        result.source_rows = sum(int(r[1]) for r in s_rows)
        result.target_rows = sum(int(r[1]) for r in t_rows)
        rec.source_rows, rec.target_rows = result.source_rows, result.target_rows
        for i, col in enumerate(shape.numeric):
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
        detail = sql.SQL(
            'SELECT h, count(*), min(r COLLATE "C") FROM (SELECT md5(x) AS h, x AS r FROM '
            "(SELECT {}::text AS x FROM {}) y) s WHERE substr(h, 1, 2) = ANY(%s) GROUP BY h"
        ).format(_row(columns), _ident(table))
        s_detail, t_detail = self.both(detail, (differing,))
        text = {str(r[0]): str(r[2]) for r in (*s_detail, *t_detail)}
        s_extra, t_extra = vr.diff_multisets(
            {str(r[0]): int(r[1]) for r in s_detail}, {str(r[0]): int(r[1]) for r in t_detail}
        )
        result.differing_rows = sum(s_extra.values()) + sum(t_extra.values())
        for extra, out in ((s_extra, result.source_only), (t_extra, result.target_only)):
            for h in sorted(extra, key=lambda h: text[h])[: self.max_keys]:
                out.append({"row": text[h], "copies": str(extra[h])})


def _ident(table: TableId) -> sql.Identifier:
    return sql.Identifier(table.schema, table.name)


def _cols(columns: Sequence[str]) -> sql.Composable:
    return sql.SQL(", ").join(map(sql.Identifier, columns))


def _row(columns: Sequence[str]) -> sql.Composable:
    """``ROW(c1, c2, …)``: the row text in the source's column order, whatever the target's."""
    return sql.SQL("ROW({})").format(_cols(columns))


def _texts(alias: str | None, columns: Sequence[str]) -> sql.Composable:
    return sql.SQL(", ").join(
        sql.SQL("{}::text").format(sql.Identifier(alias, c) if alias else sql.Identifier(c))
        for c in columns
    )


def _key_dict(key: Sequence[str], values: Bound) -> dict[str, str]:
    return dict(zip(key, values, strict=True))
