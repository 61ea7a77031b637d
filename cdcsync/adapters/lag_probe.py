"""Lag probes: the figures the applier cannot see from inside its own loop.

Per direction: the source's current WAL position, the slot's confirmed_flush_lsn,
restart_lsn, retained WAL and ``max_slot_wal_keep_size``; the Kafka end offset of every
partition the applier consumes against the next offset stored in the database written
to; the connector's state from Kafka Connect. Also the migration's phase and the
snapshot's progress from the state schema. Each figure is read fresh; one that cannot
be read is left out (and counted as an error), never guessed.

Lag stays honest on an idle source, without any data change flowing. Every probe
notes a *mark*: the source's clock (``now()``) and then its WAL insert position, so any
transaction visible before that time ends before that position. The reads happen in
the order slot → Kafka end offsets → stored offsets; when every stored offset has
reached the end offsets, every change Debezium had confirmed at the slot read is
applied. So the newest mark at or below ``confirmed_flush_lsn`` bounds the applied
position in source time, and time lag is measured from it instead of from the last
data change. (Debezium confirms positions as it commits its offsets; to keep the bound
moving while the source writes only non-transactional WAL, enable
``heartbeat.action.query``.)

Time lag compares the source's commit clock with this host's clock; keep both in sync.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from cdcsync import metrics
from cdcsync.adapters.connect_rest import ConnectClient
from cdcsync.adapters.kafka_log import client_logging
from cdcsync.adapters.pg import connect
from cdcsync.config import Settings
from cdcsync.core.debezium import HEARTBEAT_TOPIC_PREFIX
from cdcsync.core.events import TableId
from cdcsync.errors import CdcsyncError
from cdcsync.health import HealthState
from cdcsync.snapshot.catalog import exists

log = logging.getLogger("cdcsync.lag")

_UNITS = {"B": 1, "kB": 1024, "8kB": 8192, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


@dataclass(frozen=True)
class ProbeTarget:
    """One direction of replication as the probe sees it."""

    direction: str
    source_dsn: str  # where changes come from: its WAL and its slot
    state_dsn: str  # the database written to, holding the applied offsets
    slot_name: str
    topic_prefix: str
    connector_name: str
    migration_id: str
    state_schema: str = "cdcsync"
    dead_letter_topic: str | None = None


def forward_target(settings: Settings) -> ProbeTarget:
    return ProbeTarget(
        direction="forward",
        source_dsn=settings.source_conninfo(),
        state_dsn=settings.target_conninfo(),
        slot_name=settings.slot_name,
        topic_prefix=settings.topic_prefix,
        connector_name=settings.connector_name,
        migration_id=settings.migration_id,
        state_schema=settings.state_schema,
        dead_letter_topic=settings.apply.dead_letter_topic or f"{settings.topic_prefix}-dlq",
    )


def reverse_target(settings: Settings) -> ProbeTarget:
    """After cutover: the target's WAL streams back into the old source."""
    return ProbeTarget(
        direction="reverse",
        source_dsn=settings.target_conninfo(),
        state_dsn=settings.source_conninfo(),
        slot_name=settings.reverse_slot_name,
        topic_prefix=settings.reverse_topic_prefix,
        connector_name=settings.reverse_connector_name,
        migration_id=settings.migration_id,
        state_schema=settings.state_schema,
        dead_letter_topic=settings.apply.dead_letter_topic
        or f"{settings.reverse_topic_prefix}-dlq",
    )


# --------------------------------------------------------------------------- readings
@dataclass(frozen=True)
class SlotReading:
    """The source's WAL position and its replication slot, read in one statement."""

    slot_name: str
    exists: bool
    current_lsn: int  # pg_current_wal_lsn(): written WAL
    source_time: float  # source clock (Unix seconds) at the start of the read
    insert_lsn: int = 0  # pg_current_wal_insert_lsn(), read after source_time
    confirmed_flush_lsn: int | None = None
    restart_lsn: int | None = None
    retained_bytes: int | None = None
    wal_status: str | None = None
    safe_wal_size: int | None = None
    max_wal_keep_size: int | None = None  # None: unlimited (-1)


@dataclass(frozen=True)
class StoredOffset:
    topic: str
    partition: int
    next_offset: int
    last_lsn: int | None
    last_commit_ts: float | None


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    stored: int | None  # next offset stored in the database written to
    low: int
    end: int
    lag: int


@dataclass
class DirectionReport:
    direction: str
    connector: str | None = None  # None: not asked
    slot: SlotReading | None = None
    partitions: list[PartitionLag] = field(default_factory=list)
    offset_lag: int | None = None
    caught_up: bool | None = None
    applied_lsn: int | None = None
    wal_lag_bytes: int | None = None
    applied_source_ts: float | None = None
    time_lag_seconds: float | None = None
    errors: list[str] = field(default_factory=list)


@dataclass
class ProbeReport:
    at: float
    phase: str | None = None
    last_freeze_seconds: float | None = None  # recorded by the last cutover or rollback
    snapshot: list[metrics.SnapshotTable] = field(default_factory=list)
    directions: list[DirectionReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def size_setting(value: str, unit: str | None) -> int | None:
    """A pg_settings size in bytes; None for -1 (unlimited)."""
    n = int(value)
    if n < 0:
        return None
    return n * _UNITS.get(unit or "B", 1)


def wal_lag_bytes(current_lsn: int, applied_lsn: int | None) -> int | None:
    """Source WAL not yet applied (never negative); None when nothing is known applied."""
    if applied_lsn is None:
        return None
    return max(current_lsn - applied_lsn, 0)


def read_slot(conn: psycopg.Connection[Any], slot_name: str) -> SlotReading:
    """Current LSN, the slot's positions and retained WAL, and the retention limit."""
    row = conn.execute(
        """
        SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint,
               extract(epoch FROM now())::float8,
               s.slot_name IS NOT NULL,
               pg_wal_lsn_diff(s.confirmed_flush_lsn, '0/0')::bigint,
               pg_wal_lsn_diff(s.restart_lsn, '0/0')::bigint,
               pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint,
               s.wal_status,
               s.safe_wal_size,
               k.setting,
               k.unit,
               pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint
        FROM pg_settings k
        LEFT JOIN pg_replication_slots s ON s.slot_name = %s
        WHERE k.name = 'max_slot_wal_keep_size'
        """,
        (slot_name,),
    ).fetchone()
    assert row is not None  # pg_settings always has the row
    return SlotReading(
        slot_name=slot_name,
        exists=bool(row[2]),
        current_lsn=int(row[0]),
        source_time=float(row[1]),
        confirmed_flush_lsn=_int(row[3]),
        restart_lsn=_int(row[4]),
        retained_bytes=_int(row[5]),
        wal_status=row[6],
        safe_wal_size=_int(row[7]),
        max_wal_keep_size=size_setting(str(row[8]), row[9]),
        insert_lsn=int(row[10]),
    )


def read_stored(
    conn: psycopg.Connection[Any], schema: str, migration_id: str, direction: str
) -> dict[tuple[str, int], StoredOffset]:
    """Offsets stored with the applied rows (empty when the state schema is not there yet)."""
    if not _exists(conn, schema, "kafka_offset"):
        return {}
    rows = conn.execute(
        sql.SQL(
            "SELECT topic, kafka_partition, next_offset, "
            "pg_wal_lsn_diff(last_lsn, '0/0')::bigint, "
            "extract(epoch FROM last_commit_ts)::float8 "
            "FROM {} WHERE migration_id = %s AND direction = %s"
        ).format(sql.Identifier(schema, "kafka_offset")),
        (migration_id, direction),
    ).fetchall()
    return {
        (str(t), int(p)): StoredOffset(str(t), int(p), int(o), _int(lsn), _float(ts))
        for t, p, o, lsn, ts in rows
    }


def read_last_freeze(conn: psycopg.Connection[Any], schema: str, migration_id: str) -> float | None:
    """The write freeze the last cutover or rollback recorded (the CLI ran it, not us)."""
    if not _exists(conn, schema, "migration"):
        return None
    row = conn.execute(
        sql.SQL(
            "SELECT (data->>'last_freeze_seconds')::float8 FROM {} WHERE migration_id = %s"
        ).format(sql.Identifier(schema, "migration")),
        (migration_id,),
    ).fetchone()
    return None if row is None or row[0] is None else float(row[0])


def read_phase(conn: psycopg.Connection[Any], schema: str, migration_id: str) -> str | None:
    if not _exists(conn, schema, "migration"):
        return None
    row = conn.execute(
        sql.SQL("SELECT phase FROM {} WHERE migration_id = %s").format(
            sql.Identifier(schema, "migration")
        ),
        (migration_id,),
    ).fetchone()
    return None if row is None else str(row[0])


def read_snapshot(
    state: psycopg.Connection[Any],
    source: psycopg.Connection[Any] | None,
    schema: str,
    migration_id: str,
) -> list[metrics.SnapshotTable]:
    """Per source table: rows and bytes committed by the snapshot against its plan.

    Planned bytes come from the chunk plan; planned rows from the source's statistics
    while a table is being copied, and become the copied figures once it is done.
    """
    if not (_exists(state, schema, "snapshot_plan") and _exists(state, schema, "snapshot_chunk")):
        return []
    rows = state.execute(
        sql.SQL(
            "SELECT p.source_schema, p.source_name, count(*), count(c.chunk_no), "
            "sum(p.est_bytes)::bigint, coalesce(sum(c.rows_copied), 0)::bigint, "
            "coalesce(sum(c.bytes_copied), 0)::bigint "
            "FROM {plan} p LEFT JOIN {chunk} c USING "
            "(migration_id, table_schema, table_name, chunk_no) "
            "WHERE p.migration_id = %s GROUP BY 1, 2 ORDER BY 1, 2"
        ).format(
            plan=sql.Identifier(schema, "snapshot_plan"),
            chunk=sql.Identifier(schema, "snapshot_chunk"),
        ),
        (migration_id,),
    ).fetchall()
    unfinished = [(str(r[0]), str(r[1])) for r in rows if r[3] < r[2]]
    estimates = _row_estimates(source, unfinished) if unfinished and source else {}
    out = []
    for s, n, chunks, done, est_bytes, rows_copied, bytes_copied in rows:
        finished = done >= chunks
        planned_rows = rows_copied if finished else estimates.get((str(s), str(n)), 0)
        planned_bytes = bytes_copied if finished else int(est_bytes or 0)
        out.append(
            metrics.SnapshotTable(
                f"{s}.{n}", int(rows_copied), int(bytes_copied), planned_rows, planned_bytes
            )
        )
    return out


def _row_estimates(
    source: psycopg.Connection[Any], tables: list[tuple[str, str]]
) -> dict[tuple[str, str], int]:
    rows = source.execute(
        "SELECT n.nspname, c.relname, greatest(c.reltuples, 0)::bigint "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "JOIN unnest(%s::text[], %s::text[]) AS t(s, n) ON t.s = n.nspname AND t.n = c.relname",
        ([s for s, _ in tables], [n for _, n in tables]),
    ).fetchall()
    return {(str(s), str(n)): int(r) for s, n, r in rows}


def consumed_topics(topics: Iterable[str], prefix: str, exclude: Iterable[str] = ()) -> list[str]:
    """The topics the applier of ``prefix`` consumes: its data topics and its heartbeats."""
    skip = set(exclude)
    data = re.compile(rf"^{re.escape(prefix)}\.")
    heartbeat = f"{HEARTBEAT_TOPIC_PREFIX}.{prefix}"
    return sorted(t for t in topics if t not in skip and (data.match(t) or t == heartbeat))


def offset_lags(
    watermarks: Mapping[tuple[str, int], tuple[int, int]],
    stored: Mapping[tuple[str, int], StoredOffset],
) -> list[PartitionLag]:
    """End offset minus the stored next offset (from the low watermark if none is stored)."""
    out = []
    for (topic, partition), (low, end) in sorted(watermarks.items()):
        s = stored.get((topic, partition))
        start = s.next_offset if s is not None else low
        out.append(
            PartitionLag(
                topic,
                partition,
                None if s is None else s.next_offset,
                low,
                end,
                max(end - start, 0),
            )
        )
    return out


class Marks:
    """(WAL insert position, source time) pairs noted by successive probes.

    Any transaction visible on the source at a mark's time ends at or before the mark's
    position, so once Debezium has confirmed that position and the applier has caught
    up with what Debezium produced, everything committed before that time is applied.
    """

    def __init__(self, limit: int = 4096) -> None:
        self._marks: deque[tuple[int, float]] = deque(maxlen=limit)

    def note(self, lsn: int, source_time: float) -> None:
        if not self._marks or lsn >= self._marks[-1][0]:
            self._marks.append((lsn, source_time))

    def proven(self, confirmed_lsn: int) -> float | None:
        """Newest source time whose mark Debezium has confirmed; older marks are dropped."""
        best: tuple[int, float] | None = None
        while self._marks and self._marks[0][0] <= confirmed_lsn:
            best = self._marks.popleft()
        if best is None:
            return None
        self._marks.appendleft(best)  # still the bound until a newer mark is confirmed
        return best[1]


# --------------------------------------------------------------------------- Kafka
class KafkaOffsets:
    """Topic metadata and watermarks through a consumer that never joins its group."""

    METADATA_TTL = 30.0

    def __init__(self, bootstrap: str, group_id: str, timeout: float = 5.0) -> None:
        from confluent_kafka import Consumer

        self.timeout = timeout
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group_id,
                "enable.auto.commit": False,
                "log_level": 3,
                **client_logging(),
            }
        )
        self._metadata: dict[str, list[int]] = {}
        self._metadata_at = -float("inf")

    def partitions(self, prefix: str, exclude: Iterable[str] = ()) -> list[tuple[str, int]]:
        self._consumer.poll(0)  # serves the queued log lines (never a message: no assignment)
        now = time.monotonic()
        if now - self._metadata_at > self.METADATA_TTL:
            meta = self._consumer.list_topics(timeout=self.timeout)
            self._metadata = {
                name: sorted(t.partitions) for name, t in meta.topics.items() if t.error is None
            }
            self._metadata_at = now
        return [
            (topic, p)
            for topic in consumed_topics(self._metadata, prefix, exclude)
            for p in self._metadata[topic]
        ]

    def watermarks(
        self, partitions: Iterable[tuple[str, int]]
    ) -> dict[tuple[str, int], tuple[int, int]]:
        from confluent_kafka import TopicPartition

        out = {}
        for topic, p in partitions:
            low, high = self._consumer.get_watermark_offsets(
                TopicPartition(topic, p), timeout=self.timeout, cached=False
            )
            out[(topic, p)] = (int(low), int(high))
        return out

    def close(self) -> None:
        self._consumer.close()


# --------------------------------------------------------------------------- the probe
class LagProbe:
    """Reads every figure of every direction; publishes them to metrics and health.

    Use :meth:`probe` for one report (``cdcsync status``) or :meth:`start` to refresh
    the metrics from a daemon thread every ``interval`` seconds, independently of the
    applier's loop — so lag keeps growing visibly while the applier is paused or stuck.
    """

    def __init__(
        self,
        settings: Settings,
        targets: list[ProbeTarget] | None = None,
        *,
        health: HealthState | None = None,
        use_kafka: bool | None = None,
        use_connect: bool | None = None,
        interval: float | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.targets = targets if targets is not None else [forward_target(settings)]
        self.health = health
        self.use_kafka = bool(settings.kafka_bootstrap) if use_kafka is None else use_kafka
        self.use_connect = bool(settings.connect_url) if use_connect is None else use_connect
        self.interval = interval or settings.health.probe_interval_seconds
        self.wall = wall
        self._conns: dict[tuple[str, str], psycopg.Connection[Any]] = {}
        self._kafka: KafkaOffsets | None = None
        self._connect: ConnectClient | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_errors: set[str] = set()
        self._snapshot_done: list[metrics.SnapshotTable] | None = None
        self._marks: dict[str, Marks] = {}

    # ----------------------------------------------------------- connections
    def _db(self, dsn: str, side: str) -> psycopg.Connection[Any]:
        conn = self._conns.get((side, dsn))
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        conn = connect(dsn, side, autocommit=True, application_name="cdcsync-probe")
        conn.execute("SET statement_timeout = '10s'")
        self._conns[(side, dsn)] = conn
        return conn

    def _kafka_offsets(self) -> KafkaOffsets:
        if self._kafka is None:
            self._kafka = KafkaOffsets(
                self.settings.kafka_bootstrap, f"cdcsync-{self.settings.migration_id}-probe"
            )
        return self._kafka

    def _connect_client(self) -> ConnectClient:
        if self._connect is None:
            self._connect = ConnectClient(self.settings.connect_url, timeout=5.0)
        return self._connect

    def _drop(self, dsn: str, side: str) -> None:
        conn = self._conns.pop((side, dsn), None)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    # ----------------------------------------------------------- reading
    def probe(self) -> ProbeReport:
        report = ProbeReport(at=self.wall())
        first = self.targets[0] if self.targets else None
        if first is not None:
            try:
                # The migration's state lives on the target, whichever way it streams.
                state = self._db(self.settings.target_conninfo() or first.state_dsn, "target")
                report.phase = read_phase(state, first.state_schema, first.migration_id)
                report.last_freeze_seconds = read_last_freeze(
                    state, first.state_schema, first.migration_id
                )
                report.snapshot = self._snapshot(state, first)
            except (psycopg.Error, CdcsyncError) as exc:
                self._drop(first.state_dsn, "target")
                report.errors.append(f"state: {_short(exc)}")
        for target in self.targets:
            report.directions.append(self._direction(target))
        return report

    def _snapshot(
        self, state: psycopg.Connection[Any], target: ProbeTarget
    ) -> list[metrics.SnapshotTable]:
        if self._snapshot_done is not None:
            return self._snapshot_done
        source: psycopg.Connection[Any] | None
        try:
            source = self._db(target.source_dsn, "source")
        except CdcsyncError:
            source = None
        tables = read_snapshot(state, source, target.state_schema, target.migration_id)
        if tables and all(t.rows_copied >= t.rows_planned for t in tables):
            phase = read_phase(state, target.state_schema, target.migration_id)
            if phase not in (None, "snapshot"):
                self._snapshot_done = tables  # final: no need to read it again
        return tables

    def _direction(self, target: ProbeTarget) -> DirectionReport:
        r = DirectionReport(target.direction)
        # 1. the slot and the source's current position (t0)
        try:
            r.slot = read_slot(self._db(target.source_dsn, "source"), target.slot_name)
            self._marks.setdefault(target.direction, Marks()).note(
                r.slot.insert_lsn, r.slot.source_time
            )
        except (psycopg.Error, CdcsyncError) as exc:
            self._drop(target.source_dsn, "source")
            r.errors.append(f"source: {_short(exc)}")
        # 2. Kafka end offsets (t1 ≥ t0)
        watermarks: dict[tuple[str, int], tuple[int, int]] | None = None
        if self.use_kafka:
            try:
                kafka = self._kafka_offsets()
                exclude = [target.dead_letter_topic] if target.dead_letter_topic else []
                watermarks = kafka.watermarks(kafka.partitions(target.topic_prefix, exclude))
            except Exception as exc:  # librdkafka raises KafkaException and others
                r.errors.append(f"kafka: {_short(exc)}")
        # 3. offsets stored with the applied rows (t2 ≥ t1)
        stored: dict[tuple[str, int], StoredOffset] | None = None
        try:
            stored = read_stored(
                self._db(target.state_dsn, "target"),
                target.state_schema,
                target.migration_id,
                target.direction,
            )
        except (psycopg.Error, CdcsyncError) as exc:
            self._drop(target.state_dsn, "target")
            r.errors.append(f"offsets: {_short(exc)}")
        if self.use_connect:
            try:
                r.connector = self._connect_client().state(target.connector_name)
            except CdcsyncError as exc:
                r.connector = "UNKNOWN"
                r.errors.append(f"connect: {_short(exc)}")
        self._derive(r, watermarks, stored, self._marks.get(target.direction))
        return r

    def _derive(
        self,
        r: DirectionReport,
        watermarks: dict[tuple[str, int], tuple[int, int]] | None,
        stored: dict[tuple[str, int], StoredOffset] | None,
        marks: Marks | None = None,
    ) -> None:
        if stored is None:
            return
        lsns = [s.last_lsn for s in stored.values() if s.last_lsn is not None]
        stamps = [s.last_commit_ts for s in stored.values() if s.last_commit_ts is not None]
        r.applied_lsn = max(lsns) if lsns else None
        r.applied_source_ts = max(stamps) if stamps else None
        if watermarks is not None:
            r.partitions = offset_lags(watermarks, stored)
            r.offset_lag = sum(p.lag for p in r.partitions)
            r.caught_up = r.offset_lag == 0
        slot = r.slot
        if slot is not None and slot.exists and r.caught_up and slot.confirmed_flush_lsn:
            # Everything Debezium confirmed before the end offsets were read is applied.
            r.applied_lsn = max(r.applied_lsn or 0, slot.confirmed_flush_lsn)
            proven = marks.proven(slot.confirmed_flush_lsn) if marks else None
            if proven is not None:
                r.applied_source_ts = max(r.applied_source_ts or 0.0, proven)
        if slot is not None:
            r.wal_lag_bytes = wal_lag_bytes(slot.current_lsn, r.applied_lsn)
        if r.applied_source_ts is not None:
            r.time_lag_seconds = max(self.wall() - r.applied_source_ts, 0.0)

    # ----------------------------------------------------------- publishing
    def publish(self, report: ProbeReport) -> None:
        """Metrics (and the health state's connector states) from one report."""
        if report.phase is not None:
            metrics.set_phase(report.phase)
        if report.last_freeze_seconds is not None:
            metrics.record_cutover_freeze(report.last_freeze_seconds)
        if report.snapshot:
            metrics.set_snapshot_progress(report.snapshot)
        errors = list(report.errors)
        for r in report.directions:
            errors.extend(f"{r.direction} {e}" for e in r.errors)
            if r.connector is not None:
                if self.health is not None:
                    self.health.set_connector_state(r.direction, r.connector)
                else:
                    metrics.set_connector_state(r.direction, r.connector)
            if self.use_kafka:  # empty when unreadable: a stale figure is dropped
                metrics.set_offset_lag(
                    r.direction, {(p.topic, p.partition): p.lag for p in r.partitions}
                )
            metrics.record_applied_position(r.direction, r.applied_source_ts, r.applied_lsn)
            if r.slot is not None:
                # Newest applied LSN known in this process or persisted, whichever is ahead.
                known = [x for x in (r.applied_lsn, metrics.applied_lsn(r.direction)) if x]
                metrics.set_source_wal_lag(
                    r.direction, wal_lag_bytes(r.slot.current_lsn, max(known) if known else None)
                )
                metrics.set_slot(
                    r.direction,
                    retained_bytes=r.slot.retained_bytes,
                    max_keep_bytes=r.slot.max_wal_keep_size,
                    safe_bytes=r.slot.safe_wal_size,
                    wal_status=r.slot.wal_status if r.slot.exists else "missing",
                )
            else:
                metrics.set_source_wal_lag(r.direction, None)
                metrics.forget_slot(r.direction)
        for _ in errors:
            metrics.record_error("probe")
        fresh = set(errors) - self._last_errors
        for e in sorted(fresh):
            log.warning("lag probe: %s", e)
        self._last_errors = set(errors)

    # ----------------------------------------------------------- thread
    def start(self) -> LagProbe:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cdcsync-lag-probe", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                self.publish(self.probe())
            except Exception:  # the probe must never take the daemon down
                log.exception("lag probe failed")
                metrics.record_error("probe")
            if self._stop.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.close()

    def close(self) -> None:
        for side, dsn in list(self._conns):
            self._drop(dsn, side)
        if self._kafka is not None:
            with contextlib.suppress(Exception):
                self._kafka.close()
            self._kafka = None


def _exists(conn: psycopg.Connection[Any], schema: str, table: str) -> bool:
    return exists(conn, TableId(schema, table))


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
