"""Indexes, constraints and the rest of ``pg_dump --section=post-data``, after the data.

Building an index once over loaded rows is far cheaper than maintaining it row by row.
Entries run in phases that respect their dependencies, each phase spread over the
workers:

1. indexes and primary-key/unique/exclusion constraints (parallel; CREATE INDEX on one
   table does not block another CREATE INDEX on it);
2. attaching partition indexes to their parents;
3. foreign keys (parallel; a deadlock between two of them is retried);
4. everything else — triggers, rules, policies, comments, statistics — in dump order.

An object that already exists (the operator created it, or an interrupted run did) is
kept and reported, so post-data can be run again after a crash.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

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


@dataclass
class PostDataResult:
    created: int = 0
    existing: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # foreign keys to tables not migrated
    failed: list[str] = field(default_factory=list)


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


def copy_post_data(
    target_dsn: str, script: Script, workers: int, keep: Callable[[Entry], bool] = lambda e: True
) -> PostDataResult:
    """Run every post-data entry on the target; raises listing every failure at the end."""
    result = PostDataResult()
    for name, entries, parallel in phases([e for e in script.entries if keep(e)]):
        if not entries:
            continue
        started = time.monotonic()
        run_phase(target_dsn, script.preamble, entries, workers if parallel else 1, result)
        log.info(
            "post-data %s: %d entries in %.1fs", name, len(entries), time.monotonic() - started
        )
    if result.failed:
        raise PreconditionError(
            f"{len(result.failed)} post-data object(s) could not be created on the target "
            "(data is copied; fix the cause and run cdcsync snapshot again to finish):\n  - "
            + "\n  - ".join(result.failed)
        )
    return result
