"""Parallel COPY from the source's exported snapshot into the target, chunk by chunk.

Each worker holds one source connection that imported the exported snapshot (so all
of them read the same instant) and one target connection. A chunk is piped from
``COPY … TO STDOUT`` straight into ``COPY … FROM STDIN`` — binary when every column's
type allows it — and its ``snapshot_chunk`` row is written in the same target
transaction as its rows: a chunk is either entirely copied and recorded, or neither.

The pipe talks to libpq directly (psycopg's ``pq`` layer) and hands the target rows
in 64 KiB writes, which keeps Python's share of the CPU small next to the two servers'.
"""

from __future__ import annotations

import logging
import queue
import select
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq, sql

from cdcsync import faultpoints
from cdcsync.core.events import TableId
from cdcsync.errors import CdcsyncError
from cdcsync.snapshot.boundary import import_snapshot
from cdcsync.snapshot.chunking import Chunk, copy_in_query, copy_out_query
from cdcsync.snapshot.progress import Progress

log = logging.getLogger("cdcsync.snapshot")

TICK_BYTES = 1 << 18  # progress and rate limiting every 256 KiB
WRITE_BYTES = 1 << 16  # rows gathered per write to the target
RETRIES = 3
RESUME_HINT = (
    "\nfix the cause and run cdcsync snapshot again: chunks already copied are kept, and "
    "the copy goes on under the same snapshot while it is kept (--keep-snapshot-seconds)"
)


class CopyError(CdcsyncError):
    """A chunk could not be copied; the message names the table, the chunk and why."""


class TableRewritten(CdcsyncError):
    """A heap copied by block ranges got a new file mid-copy (VACUUM FULL, CLUSTER, …)."""


@dataclass(frozen=True)
class TableCopy:
    """How one migrated table is copied."""

    table: TableId
    columns: tuple[str, ...]
    key: tuple[str, ...]
    binary: bool
    row_filter: str | None = None  # the plan's filter


@dataclass
class CopyTotals:
    rows: int = 0
    bytes: int = 0
    chunks: int = 0


class RateLimiter:
    """A pace shared by all workers: bytes and/or rows per second (None: unlimited).

    The limits can be changed while the copy runs (``cdcsync throttle`` through the
    daemon); the next tick of every worker follows the new pace.
    """

    def __init__(
        self,
        bytes_per_second: float | None = None,
        rows_per_second: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.clock = clock
        self.sleep = sleep
        self._lock = threading.Lock()
        self._next = clock()
        self.bytes_per_second = bytes_per_second
        self.rows_per_second = rows_per_second

    def set_limits(
        self, *, bytes_per_second: float | None = None, rows_per_second: float | None = None
    ) -> None:
        with self._lock:
            self.bytes_per_second = bytes_per_second or None
            self.rows_per_second = rows_per_second or None
            self._next = min(self._next, self.clock())  # a new pace starts now

    def take(self, nbytes: int, rows: int = 0) -> None:
        with self._lock:
            cost = 0.0
            if self.bytes_per_second:
                cost = nbytes / self.bytes_per_second
            if self.rows_per_second:
                cost = max(cost, rows / self.rows_per_second)
            if cost == 0.0:
                return
            now = self.clock()
            start = max(self._next, now)
            self._next = start + cost
            wait = start - now
        if wait > 0:
            self.sleep(wait)


# ----------------------------------------------------------------------- the pipe
def _wait(pgconn: pq.abc.PGconn, *, write: bool = False) -> None:
    poller = select.poll()
    poller.register(pgconn.socket, select.POLLOUT if write else select.POLLIN)
    poller.poll()


def _flush(pgconn: pq.abc.PGconn) -> None:
    while pgconn.flush() != 0:
        _wait(pgconn, write=True)


def _result(pgconn: pq.abc.PGconn) -> pq.abc.PGresult | None:
    """The next result, waiting for it."""
    while True:
        pgconn.consume_input()
        if not pgconn.is_busy():
            return pgconn.get_result()
        _wait(pgconn)


def _drain(pgconn: pq.abc.PGconn) -> None:
    while _result(pgconn) is not None:
        pass


def _start(pgconn: pq.abc.PGconn, query: bytes, expect: pq.ExecStatus) -> None:
    pgconn.send_query(query)
    _flush(pgconn)
    res = _result(pgconn)
    if res is None or res.status != expect:
        if res is not None and res.status == pq.ExecStatus.FATAL_ERROR:
            err = psycopg.errors.error_from_result(res)
            _drain(pgconn)
            raise err
        raise psycopg.OperationalError(pgconn.error_message.decode(errors="replace"))


def _put(dst: pq.abc.PGconn, data: bytes | bytearray) -> None:
    sent = dst.put_copy_data(data)
    while sent == 0:  # libpq's buffer is full: wait until the socket drains
        _wait(dst, write=True)
        dst.flush()
        sent = dst.put_copy_data(data)
    if sent < 0:
        raise _copy_in_error(dst)


def pump(
    src: pq.abc.PGconn,
    dst: pq.abc.PGconn,
    copy_out: bytes,
    copy_in: bytes,
    tick: Callable[[int, int], None],
) -> tuple[int, int, int]:
    """Run ``copy_out`` on ``src`` into ``copy_in`` on ``dst``; (rows, bytes, messages).

    The source sends one message per row; the target takes the stream in any pieces,
    so rows are gathered into ~64 KiB writes (one libpq call instead of hundreds) and
    flushed whenever the source has nothing ready. ``rows`` is what the target reports
    it loaded. On failure the target's COPY is aborted (its transaction must then be
    rolled back) and the source connection is left mid-COPY: the caller discards it.
    """
    _start(src, copy_out, pq.ExecStatus.COPY_OUT)
    _start(dst, copy_in, pq.ExecStatus.COPY_IN)  # on failure the caller discards both
    get = src.get_copy_data
    buf = bytearray()
    messages = pending_rows = pending_bytes = total = 0
    try:
        while True:
            nbytes, data = get(1)
            if nbytes > 0:
                buf += data
                messages += 1
                pending_rows += 1
                pending_bytes += nbytes
                if len(buf) >= WRITE_BYTES:
                    _put(dst, buf)
                    buf = bytearray()
                    if pending_bytes >= TICK_BYTES:
                        total += pending_bytes
                        tick(pending_rows, pending_bytes)
                        pending_rows = pending_bytes = 0
            elif nbytes == 0:
                if buf:
                    _put(dst, buf)
                    buf = bytearray()
                _wait(src)
                src.consume_input()
            elif nbytes == -1:
                break
            else:
                raise psycopg.OperationalError(src.error_message.decode(errors="replace"))
        res = _result(src)
        if res is None or res.status != pq.ExecStatus.COMMAND_OK:
            err: Exception = (
                psycopg.errors.error_from_result(res)
                if res is not None
                else psycopg.OperationalError(src.error_message.decode(errors="replace"))
            )
            _drain(src)
            raise err
        _drain(src)
        if buf:
            _put(dst, buf)
    except BaseException:
        if dst.status == pq.ConnStatus.OK:
            dst.put_copy_end(b"cdcsync: the source side of the copy failed")
            try:
                _flush(dst)
                _drain(dst)
            except psycopg.Error:
                pass
        raise
    if pending_bytes:
        total += pending_bytes
        tick(pending_rows, pending_bytes)
    if dst.put_copy_end(None) < 0:
        raise _copy_in_error(dst)
    _flush(dst)
    res = _result(dst)
    if res is None or res.status != pq.ExecStatus.COMMAND_OK:
        raise _copy_in_error(dst, res)
    rows = res.command_tuples or 0
    _drain(dst)
    return rows, total, messages


def _copy_in_error(dst: pq.abc.PGconn, res: pq.abc.PGresult | None = None) -> Exception:
    if res is None:
        res = _result(dst)
    if res is not None and res.status == pq.ExecStatus.FATAL_ERROR:
        err = psycopg.errors.error_from_result(res)
        _drain(dst)
        return err
    return psycopg.OperationalError(dst.error_message.decode(errors="replace"))


# ---------------------------------------------------------------------- one chunk
def describe_chunk(chunk: Chunk) -> str:
    if chunk.kind == "whole":
        where = "whole table"
    else:
        where = f"{chunk.kind} range [{chunk.lower or '-∞'}, {chunk.upper or '+∞'})"
    source = "" if chunk.source == chunk.table else f" from partition {chunk.source}"
    return f"{chunk.table} chunk {chunk.number}{source} ({where})"


def copy_chunk(
    src: psycopg.Connection[Any],
    tgt: psycopg.Connection[Any],
    chunk: Chunk,
    how: TableCopy,
    *,
    state_schema: str,
    migration_id: str,
    tick: Callable[[int, int], None],
) -> tuple[int, int, int]:
    """Copy one chunk and record it in the same target transaction; (rows, bytes, messages)."""
    if chunk.kind == "ctid" and chunk.filenode is not None:
        rel = sql.Identifier(chunk.source.schema, chunk.source.name)
        src.execute(sql.SQL("LOCK TABLE ONLY {} IN ACCESS SHARE MODE").format(rel))
        row = src.execute(
            sql.SQL("SELECT pg_relation_filenode({}::regclass)").format(
                sql.Literal(rel.as_string(src))
            )
        ).fetchone()
        if row is None or int(row[0] or 0) != chunk.filenode:
            raise TableRewritten(
                f"source table {chunk.source} was rewritten during the copy (VACUUM FULL, "
                "CLUSTER, TRUNCATE or a rewriting ALTER TABLE), so its block ranges no longer "
                "hold the same rows: run cdcsync snapshot again (it starts over)"
            )
    out_sql = copy_out_query(chunk, how.columns, how.key, how.binary, how.row_filter).as_bytes(src)
    in_sql = copy_in_query(how.table, how.columns, how.binary).as_bytes(tgt)
    record = sql.Identifier(state_schema, "snapshot_chunk")
    try:
        with tgt.transaction():
            rows, nbytes, messages = pump(src.pgconn, tgt.pgconn, out_sql, in_sql, tick)
            tgt.execute(
                sql.SQL(
                    "INSERT INTO {} (migration_id, table_schema, table_name, chunk_no, "
                    "rows_copied, bytes_copied) VALUES (%s, %s, %s, %s, %s, %s)"
                ).format(record),
                (migration_id, chunk.table.schema, chunk.table.name, chunk.number, rows, nbytes),
            )
            faultpoints.hit("snapshot-chunk-copied")
    except psycopg.errors.UniqueViolation as exc:
        if exc.diag.constraint_name != "snapshot_chunk_pkey":
            raise
        # An earlier attempt committed although its COMMIT seemed to fail: this attempt's
        # rows were rolled back with the duplicate record; the earlier ones stand.
        row = tgt.execute(
            sql.SQL(
                "SELECT rows_copied, bytes_copied FROM {} WHERE migration_id = %s "
                "AND table_schema = %s AND table_name = %s AND chunk_no = %s"
            ).format(record),
            (migration_id, chunk.table.schema, chunk.table.name, chunk.number),
        ).fetchone()
        tgt.rollback()
        assert row is not None
        return int(row[0]), int(row[1]), 0
    return rows, nbytes, messages


# ------------------------------------------------------------------------ workers
def open_source(dsn: str, snapshot_name: str) -> psycopg.Connection[Any]:
    """A source connection inside a transaction that imported the exported snapshot."""
    # A failure to connect is an OperationalError: the worker retries it.
    conn = psycopg.connect(
        psycopg.conninfo.make_conninfo(dsn, application_name="cdcsync snapshot"),
        autocommit=True,
    )
    conn.execute(
        "SET statement_timeout = 0; SET lock_timeout = 0; "
        "SET idle_in_transaction_session_timeout = 0; "
        # Key-range chunks must use the key's index, never re-read the whole heap.
        "SET enable_seqscan = off"
    )
    try:
        import_snapshot(conn, snapshot_name)
    except psycopg.Error as exc:
        conn.close()
        raise SnapshotLost(
            f"the exported snapshot {snapshot_name} can no longer be imported ({exc}): run "
            "cdcsync snapshot again (it starts over with a new slot)"
        ) from None
    return conn


class SnapshotLost(CdcsyncError):
    """The exported snapshot is gone (its holder exited): the copy cannot go on under it."""


def open_target(dsn: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(psycopg.conninfo.make_conninfo(dsn, application_name="cdcsync snapshot"))
    # Replica role: foreign keys and user triggers do not fire while loading (they were
    # checked on the source). Asynchronous commit is safe: a chunk's rows and its record
    # commit together, so a crash loses both or neither.
    conn.execute(
        "SET session_replication_role = replica; SET synchronous_commit = off; "
        "SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0"
    )
    conn.commit()
    return conn


def copy_chunks(
    chunks: Sequence[Chunk],
    how: Mapping[TableId, TableCopy],
    *,
    source_dsn: str,
    target_dsn: str,
    snapshot_name: str,
    workers: int,
    state_schema: str,
    migration_id: str,
    progress: Progress,
    limiter: RateLimiter | None = None,
) -> CopyTotals:
    """Copy ``chunks`` (in the given order) with up to ``workers`` parallel workers."""
    todo: queue.Queue[Chunk] = queue.Queue()
    for chunk in chunks:
        todo.put(chunk)
    totals = CopyTotals()
    lock = threading.Lock()
    errors: list[BaseException] = []
    stop = threading.Event()
    limit = limiter or RateLimiter(None)

    def work() -> None:
        src: psycopg.Connection[Any] | None = None
        tgt: psycopg.Connection[Any] | None = None

        def discard() -> None:
            nonlocal src, tgt
            for conn in (src, tgt):
                if conn is not None:
                    conn.close()
            src = tgt = None

        try:
            while not stop.is_set():
                try:
                    chunk = todo.get_nowait()
                except queue.Empty:
                    break
                for attempt in range(1, RETRIES + 1):
                    advanced = [0, 0]

                    def tick(
                        rows: int,
                        nbytes: int,
                        table: TableId = chunk.table,
                        advanced: list[int] = advanced,
                    ) -> None:
                        advanced[0] += rows
                        advanced[1] += nbytes
                        progress.advance(table, rows, nbytes)
                        limit.take(nbytes, rows)

                    try:
                        if src is None:
                            src = open_source(source_dsn, snapshot_name)
                        if tgt is None:
                            tgt = open_target(target_dsn)
                        rows, nbytes, _ = copy_chunk(
                            src,
                            tgt,
                            chunk,
                            how[chunk.table],
                            state_schema=state_schema,
                            migration_id=migration_id,
                            tick=tick,
                        )
                    except psycopg.OperationalError as exc:
                        progress.advance(chunk.table, -advanced[0], -advanced[1])
                        discard()
                        if attempt == RETRIES:
                            raise CopyError(
                                f"copying {describe_chunk(chunk)} failed {RETRIES} times: "
                                f"{exc}{RESUME_HINT}"
                            ) from exc
                        log.warning(
                            "copying %s failed (%s): retrying with new connections",
                            describe_chunk(chunk),
                            str(exc).strip().splitlines()[-1] if str(exc).strip() else exc,
                        )
                        time.sleep(0.5 * attempt)
                        continue
                    except psycopg.Error as exc:
                        progress.advance(chunk.table, -advanced[0], -advanced[1])
                        discard()
                        raise CopyError(
                            f"copying {describe_chunk(chunk)} failed: {exc}{RESUME_HINT}"
                        ) from exc
                    except BaseException:
                        progress.advance(chunk.table, -advanced[0], -advanced[1])
                        discard()
                        raise
                    progress.chunk_done(chunk.table, rows - advanced[0])
                    with lock:
                        totals.rows += rows
                        totals.bytes += nbytes
                        totals.chunks += 1
                    log.debug("copied %s: %d rows", describe_chunk(chunk), rows)
                    break
            if src is not None:
                # Done: end the snapshot transaction now so its locks hold up no writer.
                src.execute("COMMIT")
        except BaseException as exc:  # surfaced by the caller once every worker stopped
            with lock:
                errors.append(exc)
            stop.set()
        finally:
            discard()

    threads = [
        threading.Thread(target=work, name=f"snapshot-copy-{i}", daemon=True)
        for i in range(max(1, min(workers, len(chunks))))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return totals
