"""Verification runs kept in the target's state schema: resumable progress and the result.

``verify_run`` holds one row per run (its id, level, tables, and the report once it
finishes); ``verify_range`` holds the plan of each keyed table (its top-level ranges,
written once before any is compared) and, as each range is compared, its digests,
sums and findings, committed right away. A rerun with the same id therefore compares
only what is missing, over exactly the ranges planned the first time; a finished table
is taken whole. Each range is still compared with both sides read at one instant, but
the ranges of a resumed run are read at different instants — as those of any
verification of a database that is still being written are.

The last finished run's summary — mismatches per table (what ``cdcsync report``
reads), and the reconciliation totals — goes to ``data.verification`` of the
migration's row, when the migration has one.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from cdcsync import faultpoints
from cdcsync.adapters.pg import connect
from cdcsync.core.events import TableId
from cdcsync.core.verify_ranges import KeyRange
from cdcsync.engine.verify import RangeOutcome, Reconciliation, TableResult, VerifyReport
from cdcsync.errors import ConfigError, PreconditionError

_DDL = (
    """CREATE TABLE IF NOT EXISTS {s}.verify_run (
        run_id text PRIMARY KEY,
        migration_id text NOT NULL,
        level text NOT NULL,
        tables jsonb NOT NULL,
        options jsonb NOT NULL DEFAULT '{{}}'::jsonb,
        started_at timestamptz NOT NULL DEFAULT now(),
        finished_at timestamptz,
        report jsonb
    )""",
    # range_no -1 is the table's finished result; planned ranges have detail NULL.
    """CREATE TABLE IF NOT EXISTS {s}.verify_range (
        run_id text NOT NULL REFERENCES {s}.verify_run ON DELETE CASCADE,
        table_schema text NOT NULL,
        table_name text NOT NULL,
        range_no int NOT NULL,
        lower_bound text[],
        upper_bound text[],
        detail jsonb,
        done_at timestamptz,
        PRIMARY KEY (run_id, table_schema, table_name, range_no)
    )""",
)


#: Runs kept per migration; older ones (and their ranges) are deleted by a new run.
KEEP_RUNS = 20


def ensure_tables(conn: psycopg.Connection[Any], schema: str) -> None:
    """Create the run tables (and the state schema) if missing; idempotent."""
    from cdcsync.adapters.state_store import ensure_schema

    ensure_schema(conn, schema)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('cdcsync.ensure_schema'))")
        for statement in _DDL:
            conn.execute(sql.SQL(statement).format(s=sql.Identifier(schema)))


def new_run_id() -> str:
    return "v" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


class RunStore:
    """:class:`cdcsync.engine.verify.RangeLog` on one target connection of its own.

    The verification's threads share it; a lock keeps its statements one at a time.
    """

    def __init__(
        self, dsn: str, schema: str, migration_id: str, run_id: str, *, fresh: bool
    ) -> None:
        self.schema = schema
        self.migration_id = migration_id
        self.run_id = run_id
        self._s = sql.Identifier(schema)
        self._lock = threading.Lock()
        self.conn = connect(dsn, "target", autocommit=True, application_name="cdcsync-verify")
        try:
            ensure_tables(self.conn, schema)
        except BaseException:
            self.conn.close()
            raise
        self.fresh = fresh

    @classmethod
    def start(
        cls,
        dsn: str,
        schema: str,
        migration_id: str,
        level: str,
        tables: Sequence[TableId],
        options: dict[str, Any] | None = None,
    ) -> RunStore:
        store = cls(dsn, schema, migration_id, new_run_id(), fresh=True)
        # Old runs go: the newest KEEP_RUNS of the migration are kept (finished or not).
        store.conn.execute(
            sql.SQL(
                "DELETE FROM {s}.verify_run WHERE migration_id = %s AND run_id NOT IN "
                "(SELECT run_id FROM {s}.verify_run WHERE migration_id = %s "
                "ORDER BY started_at DESC LIMIT %s)"
            ).format(s=store._s),
            (migration_id, migration_id, KEEP_RUNS - 1),
        )
        store.conn.execute(
            sql.SQL(
                "INSERT INTO {}.verify_run (run_id, migration_id, level, tables, options) "
                "VALUES (%s, %s, %s, %s, %s)"
            ).format(store._s),
            (
                store.run_id,
                migration_id,
                level,
                Jsonb([str(t) for t in tables]),
                Jsonb(options or {}),
            ),
        )
        return store

    @classmethod
    def resume(
        cls,
        dsn: str,
        schema: str,
        migration_id: str,
        run_id: str | None,
        level: str,
        tables: Sequence[TableId] | None,
        options: dict[str, Any] | None = None,
    ) -> tuple[RunStore, list[TableId]]:
        """The unfinished run ``run_id`` (default: the latest), and its tables.

        Refused when it was at another level, over other tables than asked for now, or
        under another migration plan or direction (``options``: what the comparison
        depends on, as :meth:`start` recorded it).
        """
        store = cls(dsn, schema, migration_id, run_id or "", fresh=False)
        try:
            row = store.conn.execute(
                sql.SQL(
                    "SELECT run_id, level, tables, finished_at IS NOT NULL, options "
                    "FROM {}.verify_run "
                    "WHERE migration_id = %s AND (%s::text IS NULL OR run_id = %s) "
                    "ORDER BY started_at DESC LIMIT 1"
                ).format(store._s),
                (migration_id, run_id, run_id),
            ).fetchone()
            if row is None:
                what = f"verification run {run_id}" if run_id else "no verification run"
                raise PreconditionError(
                    f"{what} recorded for migration {migration_id} in {schema}.verify_run: "
                    "nothing to resume (run cdcsync verify without --resume)"
                )
            found_id, found_level, found_tables, finished, found_options = row
            if finished:
                raise PreconditionError(
                    f"verification run {found_id} already finished: nothing to resume"
                )
            if found_level != level:
                raise ConfigError(
                    f"--resume: run {found_id} verifies at level {found_level}, not {level}"
                )
            recorded = [_table(str(t)) for t in found_tables]
            if tables is not None and sorted(map(str, tables)) != sorted(map(str, recorded)):
                raise ConfigError(
                    f"--resume: run {found_id} verifies {', '.join(map(str, recorded))}; "
                    "leave out --tables or give the same ones"
                )
            before, now = dict(found_options or {}), dict(options or {})
            for key in sorted(set(before) | set(now)):
                value = now.get(key)
                if before.get(key) != value:
                    raise ConfigError(
                        f"--resume: run {found_id} compared with {key} {before.get(key)!r}, "
                        f"now {value!r}: its ranges do not hold under the new one; "
                        "run cdcsync verify without --resume"
                    )
            store.run_id = str(found_id)
            return store, recorded
        except BaseException:
            store.close()
            raise

    # RangeLog ------------------------------------------------------------------------

    def finished_table(self, table: TableId) -> tuple[TableResult, Reconciliation | None] | None:
        if self.fresh:
            return None
        row = self._one(
            "SELECT detail FROM {}.verify_range WHERE run_id = %s AND table_schema = %s "
            "AND table_name = %s AND range_no = -1",
            (self.run_id, table.schema, table.name),
        )
        if row is None or row[0] is None:
            return None
        doc = dict(row[0])
        result = TableResult.from_state(doc["result"])
        rec = doc.get("reconciliation")
        return result, None if rec is None else Reconciliation.from_dict(rec)

    def plan(self, table: TableId) -> list[KeyRange] | None:
        if self.fresh:
            return None
        with self._lock:
            rows = self.conn.execute(
                sql.SQL(
                    "SELECT lower_bound, upper_bound FROM {}.verify_range WHERE run_id = %s "
                    "AND table_schema = %s AND table_name = %s AND range_no >= 0 "
                    "ORDER BY range_no"
                ).format(self._s),
                (self.run_id, table.schema, table.name),
            ).fetchall()
        if not rows:
            return None
        return [KeyRange(_tuple(lo), _tuple(hi)) for lo, hi in rows]

    def save_plan(self, table: TableId, ranges: Sequence[KeyRange]) -> None:
        with self._lock, self.conn.transaction():
            self.conn.execute(
                sql.SQL(
                    "DELETE FROM {}.verify_range WHERE run_id = %s AND table_schema = %s "
                    "AND table_name = %s"
                ).format(self._s),
                (self.run_id, table.schema, table.name),
            )
            with self.conn.cursor() as cur:
                cur.executemany(
                    sql.SQL(
                        "INSERT INTO {}.verify_range (run_id, table_schema, table_name, "
                        "range_no, lower_bound, upper_bound) VALUES (%s, %s, %s, %s, %s, %s)"
                    ).format(self._s),
                    [
                        (
                            self.run_id,
                            table.schema,
                            table.name,
                            i,
                            None if r.lower is None else list(r.lower),
                            None if r.upper is None else list(r.upper),
                        )
                        for i, r in enumerate(ranges)
                    ],
                )

    def done_ranges(self, table: TableId) -> dict[int, RangeOutcome]:
        if self.fresh:
            return {}
        with self._lock:
            rows = self.conn.execute(
                sql.SQL(
                    "SELECT range_no, detail FROM {}.verify_range WHERE run_id = %s "
                    "AND table_schema = %s AND table_name = %s AND range_no >= 0 "
                    "AND detail IS NOT NULL"
                ).format(self._s),
                (self.run_id, table.schema, table.name),
            ).fetchall()
        return {int(n): RangeOutcome.from_dict(int(n), d) for n, d in rows}

    def range_done(self, table: TableId, outcome: RangeOutcome) -> None:
        with self._lock:
            self.conn.execute(
                sql.SQL(
                    "UPDATE {}.verify_range SET detail = %s, done_at = now() WHERE run_id = %s "
                    "AND table_schema = %s AND table_name = %s AND range_no = %s"
                ).format(self._s),
                (Jsonb(outcome.to_dict()), self.run_id, table.schema, table.name, outcome.index),
            )
        faultpoints.hit("verify-range-recorded")

    def table_done(self, table: TableId, result: TableResult, rec: Reconciliation | None) -> None:
        detail = {
            "result": result.state(),
            "reconciliation": None if rec is None else rec.to_dict(),
        }
        with self._lock:
            self.conn.execute(
                sql.SQL(
                    "INSERT INTO {}.verify_range (run_id, table_schema, table_name, range_no, "
                    "detail, done_at) VALUES (%s, %s, %s, -1, %s, now()) "
                    "ON CONFLICT (run_id, table_schema, table_name, range_no) "
                    "DO UPDATE SET detail = EXCLUDED.detail, done_at = now()"
                ).format(self._s),
                (self.run_id, table.schema, table.name, Jsonb(detail)),
            )

    # the run ------------------------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        """(ranges planned, ranges compared) of this run so far."""
        row = self._one(
            "SELECT count(*) FILTER (WHERE range_no >= 0), "
            "count(*) FILTER (WHERE range_no >= 0 AND detail IS NOT NULL) "
            "FROM {}.verify_range WHERE run_id = %s",
            (self.run_id,),
        )
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def finish(self, report: VerifyReport) -> None:
        """Keep the report with the run, and its summary in the migration's state."""
        doc = report.to_dict()
        with self._lock, self.conn.transaction():
            self.conn.execute(
                sql.SQL(
                    "UPDATE {}.verify_run SET finished_at = now(), report = %s WHERE run_id = %s"
                ).format(self._s),
                (Jsonb(doc), self.run_id),
            )
            record(self.conn, self.schema, self.migration_id, report)

    def close(self) -> None:
        self.conn.close()

    def _one(self, statement: str, params: Sequence[Any]) -> Any:
        with self._lock:
            return self.conn.execute(sql.SQL(statement).format(self._s), params).fetchone()


def summary(report: VerifyReport, **extra: Any) -> dict[str, Any]:
    """What ``data.verification`` holds: level, mismatches per table, totals, when."""
    return {
        "level": report.level,
        "tables": len(report.tables),
        "rows": sum(r.source_rows or 0 for r in report.tables),
        "mismatches": {str(t): int(n) for t, n in report.mismatches.items()},
        "ok": report.ok,
        "run_id": report.run_id,
        "by": "verify",
        "at": time.time(),
        "reconciliation": {
            str(t): {
                "ok": rec.ok,
                "source_rows": rec.source_rows,
                "target_rows": rec.target_rows,
                "source_sums": rec.source_sums,
                "target_sums": rec.target_sums,
            }
            for t, rec in report.reconciliation.items()
        },
        **extra,
    }


def record(
    conn: psycopg.Connection[Any],
    schema: str,
    migration_id: str,
    report: VerifyReport,
    **extra: Any,
) -> bool:
    """Merge the summary into ``data.verification``; False when there is no migration row."""
    cur = conn.execute(
        sql.SQL(
            "UPDATE {}.migration SET data = data || jsonb_build_object('verification', %s::jsonb), "
            "updated_at = now() WHERE migration_id = %s"
        ).format(sql.Identifier(schema)),
        (Jsonb(summary(report, **extra)), migration_id),
    )
    return cur.rowcount > 0


def _table(text: str) -> TableId:
    schema, _, name = text.partition(".")
    return TableId(schema, name)


def _tuple(value: Any) -> tuple[str, ...] | None:
    return None if value is None else tuple(str(v) for v in value)


def target_has_been_primary(conn: psycopg.Connection[Any], schema: str, migration_id: str) -> bool:
    """Whether the application may have written on the target: the migration is cut over,
    a rollback is recorded (under way or done), or a cutover finished before.

    Verification under a plan then compares in reverse mode (rows written on the target
    came back to the source through the reverse stream).
    """
    try:
        row = _migration_switch(conn, schema, migration_id)
    except psycopg.errors.UndefinedTable:
        return False
    if row is None:
        return False
    phase, kind, cut_before = row
    return str(phase) in ("cut_over", "finalized") or kind == "rollback" or bool(cut_before)


def _migration_switch(conn: psycopg.Connection[Any], schema: str, migration_id: str) -> Any:
    return conn.execute(
        sql.SQL(
            "SELECT m.phase, m.data -> 'switch' ->> 'kind', EXISTS (SELECT 1 FROM {}.audit a "
            "WHERE a.migration_id = m.migration_id AND a.command = 'cutover' "
            "AND a.result = 'done') FROM {}.migration m WHERE m.migration_id = %s"
        ).format(sql.Identifier(schema), sql.Identifier(schema)),
        (migration_id,),
    ).fetchone()
