"""Debezium's re-sent changes, recognised so that tables without a key never double rows.

After its task restarts (a broker outage, a killed Connect worker, a source crash)
Debezium sends again the changes after the last source offset Connect flushed: it
resumes at the first change whose LSN differs from the last flushed one. A keyed table
absorbs that (the same image upserted twice is one row); a table without a key cannot:
an insert sent twice is two rows. So for those tables' changes, and for every truncate,
the applier keeps per partition and source transaction the position of the last change
it applied, (LSN, ordinal), and skips a change at or before it: within one transaction
WAL positions only grow. Transaction ids are not ordered by commit, hence one position
per transaction rather than one watermark.

The ordinal counts changes of one run — consecutive changes at one LSN, which only a
multi-row insert record (COPY) produces. A re-send of a run looks like more rows of it,
so a change that repeats the run at the same LSN starts the run again when it cannot be
one of its rows: it is not an insert (updates, deletes and truncates are one change per
WAL record), or it is an insert identical to the run's first row that reached Kafka
more than :data:`RESEND_GAP_MS` after the run's last change (a record's rows are sent in
one burst; a re-send follows a task restart). The marks are committed with the batch's
rows and offsets; :class:`Tracker` is the pure bookkeeping.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

Partition = tuple[str, int]

#: How far back (in Kafka offsets of the partition) a re-sent change can be: Debezium
#: re-sends what followed Connect's last flushed source offset, at most its queue and
#: the producer's batches (thousands), so a million offsets is a wide margin.
WINDOW = 1_000_000
#: The least time between a run's last change and a re-send of it (a task restart).
RESEND_GAP_MS = 1000


@dataclass(frozen=True, order=True)
class Mark:
    """Where a change sits in its transaction."""

    lsn: int
    ordinal: int


@dataclass(frozen=True)
class Cursor:
    """The last change seen in a partition (applied or skipped), to continue ordinals."""

    txid: int
    mark: Mark
    first: str  # digest of the run's first change
    ts_ms: int  # Kafka timestamp of the run's last change


def digest(kind: str, image: object) -> str:
    """A change's identity within its run: its kind and row image."""
    return hashlib.sha1(repr((kind, image)).encode(), usedforsecurity=False).hexdigest()


@dataclass
class _PartitionMarks:
    applied: dict[int, tuple[Mark, int]] = field(default_factory=dict)  # txid → (mark, offset)
    last: Cursor | None = None
    pending: dict[int, tuple[Mark, int]] = field(default_factory=dict)  # not yet saved
    moved: bool = False  # ``last`` changed since the last save


Row = tuple[str, int, int, int, int, int]  # topic, partition, txid, lsn, ordinal, offset
CursorRow = tuple[str, int, int, int, int, str, int]  # …, txid, lsn, ordinal, first, ts_ms


class Tracker:
    """Per partition: which changes of which transactions were applied."""

    def __init__(self) -> None:
        self._parts: dict[Partition, _PartitionMarks] = {}

    def reset(self, rows: list[Row], cursors: list[CursorRow]) -> None:
        """Forget everything, then load the saved marks and cursors."""
        self._parts.clear()
        for topic, partition, txid, lsn, ordinal, offset in rows:
            p = self._parts.setdefault((topic, partition), _PartitionMarks())
            p.applied[txid] = (Mark(lsn, ordinal), offset)
        for topic, partition, txid, lsn, ordinal, first, ts_ms in cursors:
            p = self._parts.setdefault((topic, partition), _PartitionMarks())
            p.last = Cursor(txid, Mark(lsn, ordinal), first, ts_ms)

    def seen(
        self,
        where: Partition,
        offset: int,
        txid: int,
        lsn: int,
        *,
        insert: bool,
        ident: str,
        ts_ms: int,
    ) -> bool:
        """Whether this change was applied already; if not, it is recorded as applied now.

        ``ident`` is :func:`digest` of the change, ``ts_ms`` its Kafka timestamp.
        """
        p = self._parts.setdefault(where, _PartitionMarks())
        last = p.last
        if last is not None and last.txid == txid and last.mark.lsn == lsn:
            restarts = not insert or (ident == last.first and ts_ms - last.ts_ms > RESEND_GAP_MS)
            if restarts:
                p.last = Cursor(txid, Mark(lsn, 0), ident, ts_ms)
            else:
                p.last = Cursor(txid, Mark(lsn, last.mark.ordinal + 1), last.first, ts_ms)
        else:
            p.last = Cursor(txid, Mark(lsn, 0), ident, ts_ms)
        p.moved = True
        mark = p.last.mark
        done = p.applied.get(txid)
        if done is not None and mark <= done[0]:
            return True
        p.applied[txid] = p.pending[txid] = (mark, offset)
        if len(p.applied) > WINDOW // 25 and len(p.applied) % 1000 == 0:
            oldest = offset - WINDOW
            p.applied = {t: v for t, v in p.applied.items() if v[1] >= oldest}
        return False

    def pending(self) -> list[Row]:
        """Marks recorded since the last :meth:`saved`, as rows to store."""
        return [
            (topic, partition, txid, mark.lsn, mark.ordinal, offset)
            for (topic, partition), p in self._parts.items()
            for txid, (mark, offset) in p.pending.items()
        ]

    def cursors(self) -> list[CursorRow]:
        """The last change seen in each partition that moved since the last save."""
        return [
            (topic, partition, c.txid, c.mark.lsn, c.mark.ordinal, c.first, c.ts_ms)
            for (topic, partition), p in self._parts.items()
            if p.moved and (c := p.last) is not None
        ]

    def saved(self) -> None:
        for p in self._parts.values():
            p.pending.clear()
            p.moved = False
