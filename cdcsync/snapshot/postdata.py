"""Indexes, constraints and the rest of ``pg_dump --section=post-data``, after the data.

Building an index once over loaded rows is far cheaper than maintaining it row by row,
and a table's indexes need only that table's rows: so a table's indexes and its
primary-key/unique/exclusion constraints are built as soon as its last chunk commits,
while the other tables are still being copied (:class:`Builder`). What needs more than
one table waits for the whole copy, in phases that respect the dependencies:

1. indexes and keys of the tables copied last, and any whose table is not a migrated
   one (a materialized view's, say) (parallel; CREATE INDEX on one table does not
   block another CREATE INDEX on it);
2. attaching partition indexes to their parents;
3. foreign keys, once both their tables and keys exist (parallel; a deadlock between
   two of them is retried);
4. everything else — triggers, rules, policies, comments, statistics — in dump order.

An object that already exists (the operator created it, or an interrupted run did) is
kept and reported, so post-data can be run again after a crash.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from cdcsync.core.events import TableId
from cdcsync.errors import PreconditionError
from cdcsync.snapshot.schema_copy import Entry, Script

log = logging.getLogger("cdcsync.snapshot")

INDEX_TYPES = frozenset({"INDEX", "CONSTRAINT"})
ATTACH_TYPES = frozenset({"INDEX ATTACH"})
FK_TYPES = frozenset({"FK CONSTRAINT"})
_EXISTS = frozenset({"42P07", "42710"})  # duplicate_table, duplicate_object
_MULTIPLE_PKS = "42P16"  # invalid_table_definition: "multiple primary keys … not allowed"
_DEADLOCK = "40P01"
_UNDEFINED_TABLE = "42P01"

# pg_dump writes every name schema-qualified (its search_path is empty), quoted where
# it must be: "a ""b""" or a plain lower-case word.
_IDENT = r'(?:"(?:[^"]|"")*"|[^\s."(),;]+)'
_ON_TABLE = {
    "INDEX": re.compile(
        rf"^CREATE (?:UNIQUE )?INDEX {_IDENT} ON (?:ONLY )?({_IDENT})\.({_IDENT}) USING "
    ),
    "CONSTRAINT": re.compile(
        rf"^ALTER TABLE (?:ONLY )?({_IDENT})\.({_IDENT})\s+ADD CONSTRAINT {_IDENT} "
        r"(?:PRIMARY KEY|UNIQUE|EXCLUDE)\b"
    ),
}
_COLUMNS = r'\((?:"(?:[^"]|"")*"|[^()"])*\)'
_FOREIGN = re.compile(
    rf"^ALTER TABLE (?:ONLY )?({_IDENT})\.({_IDENT})\s+ADD CONSTRAINT {_IDENT} "
    rf"FOREIGN KEY {_COLUMNS} REFERENCES ({_IDENT})\.({_IDENT})\("
)


@dataclass
class PostDataResult:
    created: int = 0
    existing: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # foreign keys to tables not migrated
    failed: list[str] = field(default_factory=list)


def _unquote(ident: str) -> str:
    return ident[1:-1].replace('""', '"') if ident.startswith('"') else ident


def table_of(entry: Entry) -> TableId | None:
    """The table an index or key constraint is built on, read from its SQL.

    None for every other kind of entry, and for SQL not understood: such an entry
    simply waits for the whole copy.
    """
    pattern = _ON_TABLE.get(entry.type)
    match = pattern.match(entry.body) if pattern is not None else None
    if match is None:
        return None
    return TableId(_unquote(match.group(1)), _unquote(match.group(2)))


def references_of(entry: Entry) -> tuple[TableId, TableId] | None:
    """(table, referenced table) of a foreign key, read from its SQL; None if not one."""
    match = _FOREIGN.match(entry.body) if entry.type in FK_TYPES else None
    if match is None:
        return None
    return (
        TableId(_unquote(match.group(1)), _unquote(match.group(2))),
        TableId(_unquote(match.group(3)), _unquote(match.group(4))),
    )


@dataclass
class Split:
    """Post-data entries sorted by when they can run."""

    per_table: dict[TableId, list[Entry]]  # once that table is copied
    after_copy: list[tuple[str, list[Entry], bool]]  # (name, entries, parallel), in order
    # Foreign keys between two plain tables: once both are copied and keyed.
    foreign_keys: list[tuple[Entry, TableId, TableId]] = field(default_factory=list)


def split(
    entries: Sequence[Entry],
    owner: Mapping[TableId, TableId],
    partitioned: frozenset[TableId] = frozenset(),
) -> Split:
    """Group the index and key entries by the migrated table they need.

    ``owner`` maps every heap that is copied (a table, or a leaf partition) to the
    migrated table whose copy fills it; the index of a leaf partition is built once
    the whole partitioned table is copied. A foreign key between two migrated tables
    that are not ``partitioned`` can run once both are copied and their keys built; one
    that involves a partitioned table waits for the partition indexes to be attached.
    """
    per_table: dict[TableId, list[Entry]] = {}
    foreign: list[tuple[Entry, TableId, TableId]] = []
    rest: list[Entry] = []
    for entry in entries:
        pair = references_of(entry)
        if pair is not None and all(owner.get(t) == t and t not in partitioned for t in pair):
            foreign.append((entry, *pair))
            continue
        on = table_of(entry)
        table = owner.get(on) if on is not None else None
        if table is None:
            rest.append(entry)
        else:
            per_table.setdefault(table, []).append(entry)
    return Split(per_table, phases(rest), foreign)


def phases(entries: Sequence[Entry]) -> list[tuple[str, list[Entry], bool]]:
    """(name, entries, parallel) in the order they must run."""
    first = [e for e in entries if e.type in INDEX_TYPES]
    attach = [e for e in entries if e.type in ATTACH_TYPES]
    fks = [e for e in entries if e.type in FK_TYPES]
    rest = [e for e in entries if e.type not in INDEX_TYPES | ATTACH_TYPES | FK_TYPES]
    return [
        ("indexes and keys", first, True),
        ("partition index attachments", attach, False),
        ("foreign keys", fks, True),
        ("triggers, rules, policies and the rest", rest, False),
    ]


def _label(entry: Entry) -> str:
    schema = "" if entry.schema in ("", "-") else f"{entry.schema}."
    return f"{entry.type.lower()} {schema}{entry.name}"


def _run_entry(
    conn: psycopg.Connection[Any], entry: Entry, result: PostDataResult, lock: threading.Lock
) -> None:
    text = "\n".join([*entry.settings, entry.body])
    for attempt in range(1, 4):
        try:
            conn.execute(text)
        except psycopg.Error as exc:
            state = exc.sqlstate or ""
            if state in _EXISTS or (state == _MULTIPLE_PKS and "PRIMARY KEY" in entry.body):
                with lock:
                    result.existing.append(_label(entry))
                log.info("%s already exists on the target: kept", _label(entry))
                return
            if state == _UNDEFINED_TABLE and entry.type in FK_TYPES:
                with lock:
                    result.skipped.append(_label(entry))
                log.warning(
                    "%s not created: it references a table that is not migrated", _label(entry)
                )
                return
            if state == _DEADLOCK and attempt < 3:
                time.sleep(0.2 * attempt)
                continue
            with lock:
                result.failed.append(f"{_label(entry)}: {str(exc).strip()}")
            return
        with lock:
            result.created += 1
        return


def _connect(dsn: str, preamble: Sequence[str]) -> psycopg.Connection[Any]:
    conn = psycopg.connect(
        psycopg.conninfo.make_conninfo(dsn, application_name="cdcsync snapshot"), autocommit=True
    )
    conn.execute("SET statement_timeout = 0; SET maintenance_work_mem = '256MB'")
    if preamble:
        conn.execute("\n".join(preamble))
    return conn


class Builder:
    """Post-data entries run on a pool of target connections that can grow.

    While the copy runs, a few connections build the indexes of tables already copied
    (the copy workers keep the rest of the machine); once it is done, the pool grows to
    the full worker count. ``spans`` records when each entry ran, so the caller can
    tell how much of the work overlapped the copy.
    """

    def __init__(self, dsn: str, preamble: Sequence[str], result: PostDataResult) -> None:
        self.dsn = dsn
        self.preamble = list(preamble)
        self.result = result
        self.spans: list[tuple[float, float]] = []
        self._todo: queue.Queue[tuple[Entry, Callable[[], None] | None] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._conns: list[psycopg.Connection[Any]] = []
        self._errors: list[BaseException] = []
        self._stopping = False

    def grow(self, threads: int) -> None:
        """At least ``threads`` connections from now on."""
        with self._lock:
            if self._stopping:
                return
            while len(self._threads) < threads:
                thread = threading.Thread(
                    target=self._work, name=f"snapshot-post-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()

    def submit(self, entries: Iterable[Entry], done: Callable[[], None] | None = None) -> None:
        """Queue ``entries``; ``done`` is called after each has run (or failed)."""
        for entry in entries:
            self._todo.put((entry, done))

    def wait(self) -> None:
        """Until every entry submitted so far has run; raises what broke a connection."""
        if not self._threads:
            self.grow(1)
        self._todo.join()
        with self._lock:
            if self._errors:
                raise self._errors[0]

    def close(self, *, cancel: bool = False) -> None:
        """Stop the connections; ``cancel`` also interrupts the statements running."""
        with self._lock:
            self._stopping = True
            threads = list(self._threads)
            conns = list(self._conns) if cancel else []
        if cancel:
            while True:  # entries not started are dropped
                try:
                    self._todo.get_nowait()
                except queue.Empty:
                    break
                self._todo.task_done()
            for conn in conns:
                with contextlib.suppress(psycopg.Error, OSError):
                    conn.cancel_safe(timeout=5)
        for _ in threads:
            self._todo.put(None)
        for thread in threads:
            thread.join(timeout=60)

    def _work(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        try:
            while True:
                item = self._todo.get()
                try:
                    if item is None:
                        return
                    entry, done = item
                    try:
                        if conn is None:
                            conn = _connect(self.dsn, self.preamble)
                            with self._lock:
                                self._conns.append(conn)
                        started = time.monotonic()
                        _run_entry(conn, entry, self.result, self._lock)
                        with self._lock:
                            self.spans.append((started, time.monotonic()))
                    except BaseException as exc:
                        with self._lock:
                            if not self._stopping:
                                self._errors.append(exc)
                        if conn is not None:
                            conn.close()
                            conn = None
                    if done is not None:
                        try:  # before task_done: what it queues is waited for too
                            done()
                        except Exception:
                            log.exception("after post-data %s", _label(entry))
                finally:
                    self._todo.task_done()
        finally:
            if conn is not None:
                with self._lock:
                    if conn in self._conns:
                        self._conns.remove(conn)
                conn.close()

    def busy_before(self, moment: float) -> float:
        """Seconds of entry work (summed over connections) done before ``moment``."""
        with self._lock:
            return sum(max(0.0, min(end, moment) - start) for start, end in self.spans)


def run_phase(
    dsn: str,
    preamble: Sequence[str],
    entries: Sequence[Entry],
    workers: int,
    result: PostDataResult,
) -> None:
    todo: queue.Queue[Entry] = queue.Queue()
    for entry in entries:
        todo.put(entry)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with _connect(dsn, preamble) as conn:
                while True:
                    try:
                        entry = todo.get_nowait()
                    except queue.Empty:
                        return
                    _run_entry(conn, entry, result, lock)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [
        threading.Thread(target=work, name=f"snapshot-post-{i}", daemon=True)
        for i in range(max(1, min(workers, len(entries))))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def run_after_copy(
    target_dsn: str,
    preamble: Sequence[str],
    after_copy: Sequence[tuple[str, list[Entry], bool]],
    workers: int,
    result: PostDataResult,
) -> None:
    """The phases that wait for the whole copy, one after the other."""
    for name, entries, parallel in after_copy:
        if not entries:
            continue
        started = time.monotonic()
        run_phase(target_dsn, preamble, entries, workers if parallel else 1, result)
        log.info(
            "post-data %s: %d entries in %.1fs", name, len(entries), time.monotonic() - started
        )


def raise_failures(result: PostDataResult) -> None:
    if result.failed:
        raise PreconditionError(
            f"{len(result.failed)} post-data object(s) could not be created on the target "
            "(data is copied; fix the cause and run cdcsync snapshot again to finish):\n  - "
            + "\n  - ".join(result.failed)
        )


def copy_post_data(
    target_dsn: str, script: Script, workers: int, keep: Callable[[Entry], bool] = lambda e: True
) -> PostDataResult:
    """Run every post-data entry on the target; raises listing every failure at the end."""
    result = PostDataResult()
    run_after_copy(
        target_dsn,
        script.preamble,
        phases([e for e in script.entries if keep(e)]),
        workers,
        result,
    )
    raise_failures(result)
    return result


class PostDataRun:
    """The post-data section of one snapshot run, started table by table during the copy.

    ``start`` is told how many chunks of each migrated table are still to copy; every
    committed chunk is reported to ``chunk_done`` (from the copy worker that committed
    it, so it only queues work). A table whose chunks are all committed — before this
    run or in it — has its indexes and keys queued at once, and a foreign key between
    two plain tables is queued once both tables' keys are built. When the last chunks
    are in flight, the pool grows by the copy workers gone idle. ``finish`` waits for
    all that, then runs the phases that need the whole copy.
    """

    def __init__(
        self,
        target_dsn: str,
        script: Script,
        owner: Mapping[TableId, TableId],
        partitioned: frozenset[TableId] = frozenset(),
    ) -> None:
        self.target_dsn = target_dsn
        self.preamble = list(script.preamble)
        self.split = split(script.entries, owner, partitioned)
        self.result = PostDataResult()
        self.builder = Builder(target_dsn, script.preamble, self.result)
        self.copy_ended: float | None = None
        self._lock = threading.Lock()
        self._tables = set(owner.values())
        self._left: dict[TableId, int] = {}
        self._remaining = 0
        self._queued: set[TableId] = set()
        self._pending: dict[TableId, int] = {}  # entries of a table's group not yet run
        self._built: set[TableId] = set()
        self._waiting = list(self.split.foreign_keys)
        self._during_copy = {"tables": 0, "foreign keys": 0}
        self._during = 1
        self._workers = 1

    def start(self, chunks_left: Mapping[TableId, int], *, during_copy: int, workers: int) -> None:
        self._during = max(1, during_copy)
        self._workers = max(1, workers)
        with self._lock:
            self._left = dict(chunks_left)
            self._remaining = sum(chunks_left.values())
        for table in sorted(self._tables | set(self.split.per_table)):
            if self._left.get(table, 0) <= 0:
                self._queue(table)

    def chunk_done(self, table: TableId) -> None:
        try:
            with self._lock:
                self._left[table] = self._left.get(table, 0) - 1
                self._remaining -= 1
                ready = self._left[table] <= 0
                idle = max(0, self._workers - self._remaining)
            if ready:
                self._queue(table)
            if idle:
                self.builder.grow(min(self._workers, self._during + idle))
        except Exception:  # never break the copy: copy_done queues what is left
            log.exception("queueing the post-data entries of %s failed", table)

    def _queue(self, table: TableId) -> None:
        """``table`` is copied: queue its group (or count it built if it has none)."""
        entries = self.split.per_table.get(table, [])
        with self._lock:
            if table in self._queued:
                return
            self._queued.add(table)
            if entries:
                self._pending[table] = len(entries)
                if self.copy_ended is None:
                    self._during_copy["tables"] += 1
        if entries:
            self.builder.grow(self._during)
            self.builder.submit(entries, lambda: self._entry_done(table))
            log.debug("%s copied: building its %d index(es) and key(s)", table, len(entries))
        else:
            self._group_built(table)

    def _entry_done(self, table: TableId) -> None:
        with self._lock:
            self._pending[table] -= 1
            built = self._pending[table] == 0
        if built:
            self._group_built(table)

    def _group_built(self, table: TableId) -> None:
        with self._lock:
            self._built.add(table)
            ready = [e for e, a, b in self._waiting if a in self._built and b in self._built]
            self._waiting = [
                fk for fk in self._waiting if not (fk[1] in self._built and fk[2] in self._built)
            ]
            if self.copy_ended is None:
                self._during_copy["foreign keys"] += len(ready)
        if ready:
            self.builder.submit(ready)

    def copy_done(self) -> None:
        """The copy is over: whatever is still held back is queued, on every worker."""
        self.copy_ended = time.monotonic()
        for table in sorted(self._tables | set(self.split.per_table)):
            self._queue(table)
        self.builder.grow(self._workers)

    def started_during_copy(self) -> dict[str, int]:
        """Tables whose indexes and keys, and foreign keys, began before the copy ended."""
        with self._lock:
            return dict(self._during_copy)

    def finish(self, workers: int) -> PostDataResult:
        """Wait for the per-table entries on ``workers`` connections, then run the phases
        that need the whole copy; raises listing every failure at the end."""
        if self.copy_ended is None:
            self.copy_done()
        try:
            self.builder.grow(workers)
            started = time.monotonic()
            self.builder.wait()
            log.info(
                "post-data of copied tables: waited %.1fs for the last of their indexes, keys "
                "and foreign keys",
                time.monotonic() - started,
            )
        finally:
            self.builder.close()
        with self._lock:
            left = [e for e, _, _ in self._waiting]  # only if a table was never built
            self._waiting = []
        after = [
            (name, [*entries, *left] if name == "foreign keys" else entries, parallel)
            for name, entries, parallel in self.split.after_copy
        ]
        run_after_copy(self.target_dsn, self.preamble, after, workers, self.result)
        raise_failures(self.result)
        return self.result
