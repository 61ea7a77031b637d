"""Re-sent changes are applied once, whatever the batches, crashes and re-sends (model test).

The model: transactions commit in an order unrelated to their ids; within one, changes
sit at growing LSNs; a run of several inserts may share one LSN (a multi-row insert
record, rows possibly identical), sent in one burst — the model's one assumption: a run
is not interrupted for more than a second except by a task restart. Debezium's log is
the stream with re-sends spliced in: after a task restart (seconds later), everything from the first
change of an earlier run is sent again, as Debezium resumes at the first change whose
LSN differs from the last one it had flushed. The applier reads the log in random
batches and may crash before a commit (losing the batch and its in-memory marks, then
reloading what was saved and re-reading from the stored offset). Every original change
must be applied exactly once, in order.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdcsync.core.replay import RESEND_GAP_MS, CursorRow, Row, Tracker, digest

P = ("t.public.nokey", 0)


@dataclass(frozen=True)
class Change:
    txid: int
    lsn: int
    insert: bool
    image: str
    serial: int  # identifies the original change (not seen by the tracker)


@st.composite
def streams(draw: st.DrawFn) -> list[Change]:
    txids = draw(st.lists(st.integers(1, 10_000), min_size=1, max_size=10, unique=True))
    out: list[Change] = []
    lsn = 100
    serial = 0
    for txid in txids:
        for _ in range(draw(st.integers(1, 4))):
            lsn += draw(st.integers(1, 5))
            multi = draw(st.booleans())
            rows = draw(st.integers(2, 4)) if multi else 1
            insert = multi or draw(st.booleans())
            for _ in range(rows):
                image = draw(st.sampled_from(["a", "b", "c"]))  # identical rows happen
                out.append(Change(txid, lsn, insert, image, serial))
                serial += 1
    return out


@st.composite
def logs(draw: st.DrawFn) -> tuple[list[Change], list[tuple[Change, int]]]:
    """The original stream, and Kafka's log of (change, timestamp) with re-sends."""
    stream = draw(streams())
    starts = [
        i
        for i, c in enumerate(stream)
        if i == 0 or (stream[i - 1].txid, stream[i - 1].lsn) != (c.txid, c.lsn)
    ]
    log: list[tuple[Change, int]] = []
    clock = 0

    def send(changes: list[Change]) -> None:
        # A record's rows go out in one burst; between runs any time may pass.
        nonlocal clock
        for c in changes:
            prev = log[-1][0] if log else None
            same_run = prev is not None and (prev.txid, prev.lsn) == (c.txid, c.lsn)
            clock += draw(st.integers(0, 3)) if same_run else draw(st.integers(0, 3000))
            log.append((c, clock))

    sent = 0
    for _ in range(draw(st.integers(0, 3))):
        upto = draw(st.sampled_from([s for s in starts if s >= sent] + [len(stream)]))
        upto = draw(st.integers(sent, max(sent, upto)))  # a failure may cut a run short
        send(stream[sent:upto])
        sent = upto
        earlier = [s for s in starts if s < sent]
        if earlier:
            clock += RESEND_GAP_MS + draw(st.integers(1, 5000))  # the task restarts
            send(stream[draw(st.sampled_from(earlier)) : sent])
    send(stream[sent:])
    return stream, log


def _ask(t: Tracker, offset: int, c: Change, ts: int) -> bool:
    return t.seen(P, offset, c.txid, c.lsn, insert=c.insert, ident=digest("c", c.image), ts_ms=ts)


@settings(
    max_examples=500,
    suppress_health_check=[HealthCheck.large_base_example, HealthCheck.too_slow],
)
@given(logs(), st.data())
def test_every_change_applied_once(
    case: tuple[list[Change], list[tuple[Change, int]]], data: st.DataObject
) -> None:
    stream, log = case
    marks: dict[int, Row] = {}
    cursor: CursorRow | None = None
    applied: list[Change] = []
    offset = 0
    tracker = Tracker()
    while offset < len(log):
        batch = log[offset : offset + data.draw(st.integers(1, 5))]
        taken = [c for i, (c, ts) in enumerate(batch) if not _ask(tracker, offset + i, c, ts)]
        if data.draw(st.integers(0, 3)) == 0:  # crash before the commit
            tracker = Tracker()
            tracker.reset(list(marks.values()), [] if cursor is None else [cursor])
            continue
        applied += taken
        for row in tracker.pending():
            marks[row[2]] = row
        for c in tracker.cursors():
            cursor = c
        tracker.saved()
        offset += len(batch)
    assert [c.serial for c in applied] == [c.serial for c in stream]


def test_a_single_change_sent_twice_is_applied_once() -> None:
    t = Tracker()
    change = Change(7, 100, True, "a", 0)
    assert not _ask(t, 0, change, 1000)
    assert _ask(t, 1, change, 1000 + RESEND_GAP_MS + 1)  # the re-send after a restart
    update = Change(8, 200, False, "b", 1)
    assert not _ask(t, 2, update, 9000)
    assert _ask(t, 3, update, 9001)  # an update is one change per record: a re-send


def test_identical_rows_of_one_record_are_all_applied() -> None:
    t = Tracker()
    for i in range(3):
        assert not _ask(t, i, Change(7, 100, True, "same", i), 1000 + i)
