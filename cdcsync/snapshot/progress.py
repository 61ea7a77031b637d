"""Progress of the copy: per-table counters, shown as bars on a terminal or logged otherwise.

The counters are the source of truth (the metrics exporter reads them through
:meth:`Progress.tables` and :meth:`Progress.totals`); the display only renders them,
from a thread of its own, so copy workers never wait on a terminal.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Literal

from cdcsync.core.events import TableId

log = logging.getLogger("cdcsync.snapshot")

Mode = Literal["auto", "bars", "log", "quiet"]


@dataclass(frozen=True)
class TableProgress:
    table: TableId
    rows_total: int  # an estimate until the table is done
    bytes_total: int
    chunks_total: int
    rows_done: int = 0
    bytes_done: int = 0
    chunks_done: int = 0

    @property
    def done(self) -> bool:
        return self.chunks_done >= self.chunks_total


class Progress:
    """Thread-safe snapshot counters with an optional live display."""

    def __init__(
        self,
        mode: Mode = "auto",
        *,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode == "auto":
            mode = "bars" if sys.stderr.isatty() else "log"
        self.mode = mode
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._tables: dict[TableId, TableProgress] = {}
        self._started = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listeners: list[Callable[[TableId], None]] = []

    # ----------------------------------------------------------------- counters
    def plan(self, totals: Mapping[TableId, tuple[int, int, int]]) -> None:
        """Estimated rows, bytes and the chunk count of each table."""
        with self._lock:
            for table, (rows, nbytes, chunks) in totals.items():
                self._tables[table] = TableProgress(table, rows, nbytes, chunks)

    def already_done(self, table: TableId, rows: int, nbytes: int, chunks: int) -> None:
        """Chunks an earlier run copied (a resume)."""
        with self._lock:
            t = self._tables[table]
            self._tables[table] = replace(
                t,
                rows_done=t.rows_done + rows,
                bytes_done=t.bytes_done + nbytes,
                chunks_done=t.chunks_done + chunks,
            )

    def advance(self, table: TableId, rows: int, nbytes: int) -> None:
        with self._lock:
            t = self._tables[table]
            self._tables[table] = replace(
                t, rows_done=t.rows_done + rows, bytes_done=t.bytes_done + nbytes
            )

    def chunk_done(self, table: TableId, row_correction: int = 0) -> None:
        """A chunk committed; ``row_correction`` fixes the streamed row count to the exact one."""
        with self._lock:
            t = self._tables[table]
            t = replace(t, rows_done=t.rows_done + row_correction, chunks_done=t.chunks_done + 1)
            if t.done:  # estimates become facts
                t = replace(t, rows_total=t.rows_done, bytes_total=t.bytes_done)
            self._tables[table] = t
        if t.done and self.mode == "log":
            log.info("table %s copied: rows=%d bytes=%d", table, t.rows_done, t.bytes_done)
        for listener in list(self._listeners):
            listener(table)

    @contextmanager
    def listening(self, listener: Callable[[TableId], None]) -> Iterator[None]:
        """Call ``listener`` with the table of every chunk that commits while the block runs.

        It runs in the copy worker that committed the chunk, so it must not block.
        """
        self._listeners.append(listener)
        try:
            yield
        finally:
            self._listeners.remove(listener)

    def tables(self) -> list[TableProgress]:
        with self._lock:
            return list(self._tables.values())

    def totals(self) -> TableProgress:
        """All tables summed (``table`` is ``*.*``)."""
        rows_total = bytes_total = chunks_total = rows = nbytes = chunks = 0
        for t in self.tables():
            rows_total += max(t.rows_total, t.rows_done)
            bytes_total += max(t.bytes_total, t.bytes_done)
            chunks_total += t.chunks_total
            rows += t.rows_done
            nbytes += t.bytes_done
            chunks += t.chunks_done
        return TableProgress(
            TableId("*", "*"), rows_total, bytes_total, chunks_total, rows, nbytes, chunks
        )

    def line(self) -> str:
        """One structured summary line (also what log mode prints)."""
        t = self.totals()
        elapsed = max(self.clock() - self._started, 1e-9)
        rate = t.bytes_done / elapsed
        left = max(t.bytes_total - t.bytes_done, 0)
        eta = f"{left / rate:.0f}" if rate > 0 else "unknown"
        return (
            f"snapshot progress: chunks={t.chunks_done}/{t.chunks_total} "
            f"rows={t.rows_done}/~{t.rows_total} bytes={t.bytes_done}/~{t.bytes_total} "
            f"rate_mb_s={rate / 1e6:.1f} eta_s={eta}"
        )

    # ------------------------------------------------------------------ display
    @contextmanager
    def shown(self) -> Iterator[Progress]:
        """Render while the block runs (bars on a terminal, log lines otherwise)."""
        self._started = self.clock()
        if self.mode == "bars":
            target: Callable[[], None] = self._bars
        elif self.mode == "log":
            target = self._log_loop
        else:
            yield self
            return
        self._stop.clear()
        self._thread = threading.Thread(target=target, name="snapshot-progress", daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=5)
            if self.mode == "log":
                log.info(self.line())

    def _log_loop(self) -> None:
        while not self._stop.wait(self.interval):
            log.info(self.line())

    def _bars(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TaskID,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import (
            Progress as RichProgress,
        )

        bars = RichProgress(
            TextColumn("{task.description}", justify="left"),
            BarColumn(),
            TextColumn("{task.fields[rows]:>12} rows"),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        tasks: dict[TableId, TaskID] = {}
        with bars:
            overall = bars.add_task("all tables", total=None, rows="0")
            while True:
                stopping = self._stop.wait(0.5)
                total = self.totals()
                bars.update(
                    overall,
                    total=max(total.bytes_total, 1),
                    completed=total.bytes_done,
                    rows=f"{total.rows_done:,}",
                )
                for t in self.tables():
                    active = t.bytes_done > 0 and not t.done
                    if t.table not in tasks and active:
                        tasks[t.table] = bars.add_task(str(t.table), total=None, rows="0")
                    if t.table in tasks:
                        bars.update(
                            tasks[t.table],
                            total=max(t.bytes_total, t.bytes_done, 1),
                            completed=t.bytes_done,
                            rows=f"{t.rows_done:,}",
                            visible=not t.done,
                        )
                if stopping:
                    return
