"""Every metric cdcsync exports, declared once, with typed helpers to update them.

Names follow Prometheus conventions: ``cdcsync_`` prefix, base units (``_seconds``,
``_bytes``), counters end in ``_total``. Labels are bounded: ``direction`` is
``forward`` or ``reverse``; ``table`` only names migrated tables (anything else is
``other``); ``topic``/``partition`` only those of the migration's topics; ``op``,
``kind``, ``state`` and ``phase`` come from fixed sets. Callers never write a label
string: they call the helpers below, which validate and map values, so a typo or an
unexpected value cannot create a new series.

Time lag is exported twice: as the source commit time of the last applied change
(``cdcsync_last_applied_source_timestamp_seconds``, the robust form: ``time() - x``
keeps growing while the daemon is stuck or paused), and as ``cdcsync_lag_seconds``
computed at scrape time from the same value.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cdcsync.core.events import Event, Op, RowChange, TableId, Truncate

# ``_created`` series double the counters' cardinality and nothing here reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

Direction = Literal["forward", "reverse"]
DIRECTIONS: Final[tuple[str, ...]] = ("forward", "reverse")
OPS: Final[tuple[str, ...]] = ("insert", "update", "delete", "read", "truncate")
ERROR_KINDS: Final[tuple[str, ...]] = (
    "decode",  # a message is not a Debezium event cdcsync understands
    "apply",  # the target refused a change (cast, constraint, missing table)
    "kafka",  # the Kafka client reported an error
    "source_connection",
    "target_connection",
    "connect",  # the Kafka Connect REST API failed or was unreachable
    "offset_conflict",  # another process moved a partition's stored offset
    "probe",  # a lag probe could not read a figure
    "request",  # an operator request could not be carried out
    "other",
)
#: What Kafka Connect reports (ABSENT: no such connector; UNKNOWN: Connect unreachable).
CONNECTOR_STATES: Final[tuple[str, ...]] = (
    "RUNNING",
    "PAUSED",
    "STOPPED",
    "FAILED",
    "UNASSIGNED",
    "RESTARTING",
    "ABSENT",
    "UNKNOWN",
)
#: pg_replication_slots.wal_status values (``missing``: the slot does not exist).
WAL_STATUSES: Final[tuple[str, ...]] = ("reserved", "extended", "unreserved", "lost", "missing")
#: Phases known in advance; others are added when first set (they come from code).
KNOWN_PHASES: Final[tuple[str, ...]] = ("snapshot", "snapshotted", "streaming", "cut_over")
OTHER: Final = "other"

REGISTRY = CollectorRegistry(auto_describe=True)

_BATCH_EVENTS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 20000, 50000)
_BATCH_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BYTES = tuple(float(1024 * 4**i) for i in range(10))  # 1 KiB … 256 MiB

# --------------------------------------------------------------------------- declarations
BUILD_INFO = Info("cdcsync_build", "Version of the running cdcsync.", registry=REGISTRY)

APPLIED_EVENTS = Counter(
    "cdcsync_applied_events_total",
    "Row change events applied to the database written to, by table and operation.",
    ["direction", "table", "op"],
    registry=REGISTRY,
)
APPLY_BATCH_EVENTS = Histogram(
    "cdcsync_apply_batch_events",
    "Kafka messages per applied batch (row changes, heartbeats, tombstones).",
    ["direction"],
    buckets=_BATCH_EVENTS,
    registry=REGISTRY,
)
APPLY_BATCH_BYTES = Histogram(
    "cdcsync_apply_batch_bytes",
    "Kafka message payload bytes per applied batch.",
    ["direction"],
    buckets=_BATCH_BYTES,
    registry=REGISTRY,
)
APPLY_BATCH_SECONDS = Histogram(
    "cdcsync_apply_batch_duration_seconds",
    "Time to apply one batch and commit it with its offsets.",
    ["direction"],
    buckets=_BATCH_SECONDS,
    registry=REGISTRY,
)
OFFSET_LAG = Gauge(
    "cdcsync_offset_lag_messages",
    "Kafka end offset minus the next offset stored in the database written to.",
    ["direction", "topic", "partition"],
    registry=REGISTRY,
)
LAST_APPLIED_SOURCE_TS = Gauge(
    "cdcsync_last_applied_source_timestamp_seconds",
    "Source commit time (Unix seconds) up to which every change is applied.",
    ["direction"],
    registry=REGISTRY,
)
SOURCE_WAL_LAG = Gauge(
    "cdcsync_source_wal_lag_bytes",
    "Source's current WAL position minus the last WAL position applied.",
    ["direction"],
    registry=REGISTRY,
)
SLOT_RETAINED_WAL = Gauge(
    "cdcsync_slot_retained_wal_bytes",
    "WAL the replication slot keeps on the source (current LSN minus restart_lsn).",
    ["direction"],
    registry=REGISTRY,
)
SLOT_MAX_WAL_KEEP = Gauge(
    "cdcsync_slot_max_wal_keep_size_bytes",
    "The source's max_slot_wal_keep_size (+Inf when unlimited).",
    ["direction"],
    registry=REGISTRY,
)
SLOT_SAFE_WAL = Gauge(
    "cdcsync_slot_safe_wal_size_bytes",
    "WAL that can still be written before the slot is in danger of being lost.",
    ["direction"],
    registry=REGISTRY,
)
SLOT_WAL_STATUS = Gauge(
    "cdcsync_slot_wal_status",
    "1 for the replication slot's current wal_status, 0 for the others.",
    ["direction", "status"],
    registry=REGISTRY,
)
SNAPSHOT_COPIED_ROWS = Gauge(
    "cdcsync_snapshot_copied_rows",
    "Rows the snapshot has copied and committed, by table.",
    ["table"],
    registry=REGISTRY,
)
SNAPSHOT_COPIED_BYTES = Gauge(
    "cdcsync_snapshot_copied_bytes",
    "Bytes the snapshot has copied and committed, by table.",
    ["table"],
    registry=REGISTRY,
)
SNAPSHOT_PLANNED_ROWS = Gauge(
    "cdcsync_snapshot_planned_rows",
    "Rows the snapshot copies in all, by table (an estimate until the table is done).",
    ["table"],
    registry=REGISTRY,
)
SNAPSHOT_PLANNED_BYTES = Gauge(
    "cdcsync_snapshot_planned_bytes",
    "Bytes the snapshot copies in all, by table (an estimate until the table is done).",
    ["table"],
    registry=REGISTRY,
)
SNAPSHOT_RATE_LIMIT = Gauge(
    "cdcsync_snapshot_rate_limit_rows_per_second",
    "Snapshot copy rate limit in rows per second (+Inf when unlimited).",
    registry=REGISTRY,
)
VERIFICATION_MISMATCHES = Gauge(
    "cdcsync_verification_mismatches",
    "Mismatched rows or chunks found by the last verification, by table.",
    ["table"],
    registry=REGISTRY,
)
VERIFICATION_RUNS = Counter(
    "cdcsync_verification_runs_total",
    "Verifications run, by result (clean or mismatch).",
    ["result"],
    registry=REGISTRY,
)
DEAD_LETTERS = Counter(
    "cdcsync_dead_letter_events_total",
    "Events sent to the dead-letter topic instead of being applied.",
    ["direction", "table"],
    registry=REGISTRY,
)
HALTED_PARTITIONS = Gauge(
    "cdcsync_halted_partitions",
    "Partitions whose applier stopped at an event it cannot apply.",
    ["direction"],
    registry=REGISTRY,
)
CONNECTOR_STATE = Gauge(
    "cdcsync_connector_state",
    "1 for the Debezium connector's current state (worst of connector and tasks).",
    ["direction", "state"],
    registry=REGISTRY,
)
PHASE = Gauge(
    "cdcsync_phase",
    "1 for the migration's current phase, 0 for the others.",
    ["phase"],
    registry=REGISTRY,
)
PAUSED = Gauge(
    "cdcsync_paused",
    "1 while an operator has paused the applier (cdcsync pause).",
    registry=REGISTRY,
)
CUTOVER_FREEZE = Gauge(
    "cdcsync_cutover_last_freeze_seconds",
    "Write freeze of the last cutover or rollback (NaN until one ran).",
    registry=REGISTRY,
)
LAG_SLO = Gauge(
    "cdcsync_lag_slo_seconds",
    "Configured time-lag objective; readiness and the lag alert compare against it.",
    registry=REGISTRY,
)
ERRORS = Counter(
    "cdcsync_errors_total",
    "Errors by kind (each also logged with its details).",
    ["kind"],
    registry=REGISTRY,
)


class _LagCollector(Collector):
    """``cdcsync_lag_seconds``: now minus the last applied source commit time, at scrape."""

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "cdcsync_lag_seconds",
            "Now minus the source commit time up to which every change is applied.",
            labels=["direction"],
        )
        now = _wall()
        for direction, ts in _positions.timestamps().items():
            family.add_metric([direction], max(now - ts, 0.0))
        yield family


# --------------------------------------------------------------------------- state
_wall: Callable[[], float] = time.time


class _Positions:
    """The applied position per direction; only ever moves forward."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ts: dict[str, float] = {}
        self._lsn: dict[str, int] = {}

    def advance(self, direction: str, ts: float | None, lsn: int | None) -> None:
        with self._lock:
            if ts is not None and ts > self._ts.get(direction, -math.inf):
                self._ts[direction] = ts
                LAST_APPLIED_SOURCE_TS.labels(direction).set(ts)
            if lsn is not None and lsn > self._lsn.get(direction, -1):
                self._lsn[direction] = lsn

    def timestamps(self) -> dict[str, float]:
        with self._lock:
            return dict(self._ts)

    def lsn(self, direction: str) -> int | None:
        with self._lock:
            return self._lsn.get(direction)

    def clear(self) -> None:
        with self._lock:
            for direction in self._ts:
                with contextlib.suppress(KeyError):
                    LAST_APPLIED_SOURCE_TS.remove(direction)
            self._ts.clear()
            self._lsn.clear()


_positions = _Positions()
REGISTRY.register(_LagCollector())

_labels_lock = threading.Lock()
_tables: set[str] | None = None  # None until declared: then every table name passes
_phases: set[str] = set(KNOWN_PHASES)
_offset_series: dict[str, set[tuple[str, str]]] = {}
_snapshot_series: set[str] = set()


def _init_static() -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        BUILD_INFO.info({"version": version("cdcsync")})
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        BUILD_INFO.info({"version": "unknown"})
    for kind in ERROR_KINDS:
        ERRORS.labels(kind)
    for result in ("clean", "mismatch"):
        VERIFICATION_RUNS.labels(result)
    for phase in KNOWN_PHASES:
        PHASE.labels(phase).set(0)
    PAUSED.set(0)
    CUTOVER_FREEZE.set(math.nan)
    SNAPSHOT_RATE_LIMIT.set(math.inf)
    LAG_SLO.set(math.nan)


_init_static()


# --------------------------------------------------------------------------- label mapping
def direction_label(direction: str) -> str:
    """``forward`` or ``reverse``; anything else is a programming error."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    return direction


def table_label(table: TableId | str | None) -> str:
    """The table as ``schema.name`` if it is migrated, else ``other``."""
    if table is None:
        return OTHER
    name = str(table)
    with _labels_lock:
        if _tables is not None and name not in _tables:
            return OTHER
    return name


def declare_tables(direction: str, tables: Iterable[TableId | str]) -> None:
    """The migrated tables: the only values ``table`` may take (others become ``other``).

    Also creates their series at zero, so ``rate``/``increase`` see the first event.
    """
    global _tables  # noqa: PLW0603 - the one registry of allowed label values
    d = direction_label(direction)
    names = {str(t) for t in tables}
    with _labels_lock:
        _tables = (_tables or set()) | names
    for name in (*sorted(names), OTHER):
        DEAD_LETTERS.labels(d, name)
        for op in OPS:
            APPLIED_EVENTS.labels(d, name, op)
    HALTED_PARTITIONS.labels(d).set(0)


# --------------------------------------------------------------------------- helpers: applier
def record_batch(
    direction: str,
    events: Sequence[Event],
    seconds: float,
    nbytes: int = 0,
    *,
    messages: int | None = None,
) -> None:
    """One committed batch: its events (after dead-lettering), apply time and size.

    Counts row changes by table and operation and moves the applied position to the
    batch's newest commit. ``messages`` is the number of Kafka messages the batch
    covered (default: ``len(events)``). Call after the commit: a rolled-back batch
    applied nothing.
    """
    d = direction_label(direction)
    counts, ts_ms, lsn = _summarise(events)
    for (table, op), n in counts.items():
        APPLIED_EVENTS.labels(d, table_label(table), op).inc(n)
    APPLY_BATCH_EVENTS.labels(d).observe(len(events) if messages is None else messages)
    APPLY_BATCH_BYTES.labels(d).observe(nbytes)
    APPLY_BATCH_SECONDS.labels(d).observe(seconds)
    _positions.advance(d, None if ts_ms < 0 else ts_ms / 1000.0, None if lsn < 0 else lsn)


_OP_LABEL: Final = {op: op.name.lower() for op in Op}


def _summarise(events: Sequence[Event]) -> tuple[dict[tuple[TableId, str], int], int, int]:
    """Row changes per (table, op), newest commit time (ms) and LSN, in one pass (-1: none)."""
    counts: dict[tuple[TableId, str], int] = {}
    ts = lsn = -1
    for event in events:
        if isinstance(event, RowChange):
            key = (event.table, _OP_LABEL[event.op])
        elif isinstance(event, Truncate):
            key = (event.table, "truncate")
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
        source = event.source
        if source.commit_ts_ms is not None and source.commit_ts_ms > ts:
            ts = source.commit_ts_ms
        if source.lsn is not None and source.lsn > lsn:
            lsn = source.lsn
    return counts, ts, lsn


def record_applied_position(
    direction: str, source_ts: float | None, lsn: int | None = None
) -> None:
    """Everything committed on the source up to ``source_ts`` (Unix seconds) is applied.

    Monotonic: an older value is ignored. :func:`record_batch` calls it with the
    batch's newest commit time; call it yourself only with a proven bound (the lag
    probe does when the applier is caught up with everything Debezium confirmed).
    """
    _positions.advance(direction_label(direction), source_ts, lsn)


def applied_lsn(direction: str) -> int | None:
    """Newest source LSN known applied in this process (None if none yet)."""
    return _positions.lsn(direction_label(direction))


def time_lag_seconds(direction: str, now: float | None = None) -> float | None:
    """Now minus the applied source commit time; None until something is known."""
    ts = _positions.timestamps().get(direction_label(direction))
    if ts is None:
        return None
    return max((_wall() if now is None else now) - ts, 0.0)


def record_dead_letter(direction: str, table: TableId | str | None) -> None:
    """One event sent to the dead-letter topic (``table`` None when not decodable)."""
    DEAD_LETTERS.labels(direction_label(direction), table_label(table)).inc()


def record_error(kind: str) -> None:
    """One error of a kind from :data:`ERROR_KINDS` (unknown kinds count as ``other``)."""
    ERRORS.labels(kind if kind in ERROR_KINDS else OTHER).inc()


def set_halted_partitions(direction: str, partitions: int) -> None:
    HALTED_PARTITIONS.labels(direction_label(direction)).set(partitions)


def set_paused(paused: bool) -> None:
    PAUSED.set(1 if paused else 0)


# --------------------------------------------------------------------------- helpers: probes
def set_offset_lag(direction: str, lags: Mapping[tuple[str, int], int]) -> None:
    """Offset lag of every consumed partition; partitions no longer listed are dropped."""
    d = direction_label(direction)
    keys = {(topic, str(partition)) for topic, partition in lags}
    with _labels_lock:
        gone = _offset_series.get(d, set()) - keys
        _offset_series[d] = keys
    for topic, part in gone:
        with contextlib.suppress(KeyError):
            OFFSET_LAG.remove(d, topic, part)
    for (topic, partition), lag in lags.items():
        OFFSET_LAG.labels(d, topic, str(partition)).set(lag)


def set_source_wal_lag(direction: str, nbytes: int | None) -> None:
    """WAL not yet applied; None (nothing known applied yet) removes the series."""
    _set_or_drop(
        SOURCE_WAL_LAG, None if nbytes is None else max(nbytes, 0), direction_label(direction)
    )


def set_slot(
    direction: str,
    *,
    retained_bytes: int | None,
    max_keep_bytes: int | None,
    safe_bytes: int | None,
    wal_status: str | None,
) -> None:
    """The replication slot's figures; ``max_keep_bytes`` None means unlimited (-1)."""
    d = direction_label(direction)
    _set_or_drop(SLOT_RETAINED_WAL, retained_bytes, d)
    SLOT_MAX_WAL_KEEP.labels(d).set(math.inf if max_keep_bytes is None else max_keep_bytes)
    _set_or_drop(SLOT_SAFE_WAL, safe_bytes, d)
    status = wal_status if wal_status in WAL_STATUSES else "missing"
    for value in WAL_STATUSES:
        SLOT_WAL_STATUS.labels(d, value).set(1 if value == status else 0)


def forget_slot(direction: str) -> None:
    """The slot could not be read: drop its series rather than show stale figures."""
    d = direction_label(direction)
    for gauge in (SLOT_RETAINED_WAL, SLOT_MAX_WAL_KEEP, SLOT_SAFE_WAL):
        _set_or_drop(gauge, None, d)
    for status in WAL_STATUSES:
        with contextlib.suppress(KeyError):
            SLOT_WAL_STATUS.remove(d, status)


def _set_or_drop(gauge: Gauge, value: float | None, *labels: str) -> None:
    """Set the series, or remove it when the figure is unknown (no stale numbers)."""
    if value is not None:
        gauge.labels(*labels).set(value)
        return
    with contextlib.suppress(KeyError):
        gauge.remove(*labels)


def set_connector_state(direction: str, state: str) -> None:
    """One of :data:`CONNECTOR_STATES` is 1, the rest 0 (unknown words count as UNKNOWN)."""
    d = direction_label(direction)
    current = state if state in CONNECTOR_STATES else "UNKNOWN"
    for value in CONNECTOR_STATES:
        CONNECTOR_STATE.labels(d, value).set(1 if value == current else 0)


def set_phase(phase: str) -> None:
    """The migration's phase: 1 for it, 0 for every phase seen before."""
    with _labels_lock:
        _phases.add(phase)
        phases = sorted(_phases)
    for value in phases:
        PHASE.labels(value).set(1 if value == phase else 0)


@dataclass(frozen=True)
class SnapshotTable:
    """One table's snapshot progress (rows/bytes planned are estimates until done)."""

    table: str
    rows_copied: int
    bytes_copied: int
    rows_planned: int
    bytes_planned: int


def set_snapshot_progress(tables: Iterable[SnapshotTable]) -> None:
    """Snapshot progress of every table (from the state schema or a live counter)."""
    seen: set[str] = set()
    for t in tables:
        name = table_label(t.table)
        seen.add(name)
        SNAPSHOT_COPIED_ROWS.labels(name).set(t.rows_copied)
        SNAPSHOT_COPIED_BYTES.labels(name).set(t.bytes_copied)
        SNAPSHOT_PLANNED_ROWS.labels(name).set(max(t.rows_planned, t.rows_copied))
        SNAPSHOT_PLANNED_BYTES.labels(name).set(max(t.bytes_planned, t.bytes_copied))
    with _labels_lock:
        gone = _snapshot_series - seen
        _snapshot_series.clear()
        _snapshot_series.update(seen)
    for name in gone:
        for gauge in (
            SNAPSHOT_COPIED_ROWS,
            SNAPSHOT_COPIED_BYTES,
            SNAPSHOT_PLANNED_ROWS,
            SNAPSHOT_PLANNED_BYTES,
        ):
            with contextlib.suppress(KeyError):
                gauge.remove(name)


def set_snapshot_rate_limit(rows_per_second: float | None) -> None:
    """The snapshot copy's current rate limit (None or 0: unlimited)."""
    SNAPSHOT_RATE_LIMIT.set(rows_per_second or math.inf)


# --------------------------------------------------------------------------- helpers: cutover
def record_cutover_freeze(seconds: float) -> None:
    """Write-freeze duration of the cutover (or rollback) that just finished."""
    CUTOVER_FREEZE.set(seconds)


def record_verification(mismatches: Mapping[TableId | str, int]) -> None:
    """Result of one verification: mismatches per table (0 for clean tables)."""
    total = 0
    for table, n in mismatches.items():
        VERIFICATION_MISMATCHES.labels(table_label(table)).set(n)
        total += n
    VERIFICATION_RUNS.labels("mismatch" if total else "clean").inc()


def set_lag_slo(seconds: float) -> None:
    LAG_SLO.set(seconds)


def exposition() -> bytes:
    """The registry in Prometheus' text format (what /metrics serves by default)."""
    from prometheus_client import generate_latest

    return generate_latest(REGISTRY)


def _reset_for_tests() -> None:
    """Forget positions, declared tables and labelled series (tests share one process)."""
    global _tables  # noqa: PLW0603
    _positions.clear()
    with _labels_lock:
        _tables = None
    for collector in list(REGISTRY._collector_to_names):
        if getattr(collector, "_labelnames", None) and hasattr(collector, "clear"):
            collector.clear()
    _init_static()


__all__ = [
    "CONNECTOR_STATES",
    "DIRECTIONS",
    "ERROR_KINDS",
    "OPS",
    "REGISTRY",
    "WAL_STATUSES",
    "SnapshotTable",
    "applied_lsn",
    "declare_tables",
    "direction_label",
    "exposition",
    "forget_slot",
    "record_applied_position",
    "record_batch",
    "record_cutover_freeze",
    "record_dead_letter",
    "record_error",
    "record_verification",
    "set_connector_state",
    "set_halted_partitions",
    "set_lag_slo",
    "set_offset_lag",
    "set_paused",
    "set_phase",
    "set_slot",
    "set_snapshot_progress",
    "set_snapshot_rate_limit",
    "set_source_wal_lag",
    "table_label",
    "time_lag_seconds",
]
