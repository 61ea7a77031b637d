"""The streaming loop: Kafka → decode → batch → one target transaction {rows, offsets}.

Exactly-once effect: a batch's rows and the next offset of every partition it covers
commit in one transaction on the database written to; on start and on every partition
assignment the consumer seeks to the offsets stored there (Kafka's own commits are
advisory). An offset gap halts; a bad event halts (default) or goes to a dead-letter
topic, and in either case no offset moves past an event whose effect is not applied.
Signal handlers only set a flag: the loop finishes the batch in flight and exits.

An optional observer (:class:`StreamObserver`, the daemon's ``Observability``) hears
every turn, committed batch, dead letter and halt, and says when an operator paused the
applier; while paused the loop pauses its partitions (keeping its group membership),
applies nothing and keeps turning, then re-reads the stored offsets on resume.
"""

from __future__ import annotations

import gc
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

import psycopg

from cdcsync import faultpoints
from cdcsync.adapters import offset_store, replay_store
from cdcsync.adapters.kafka_log import client_logging
from cdcsync.adapters.pg import connect
from cdcsync.adapters.pg_apply import (
    ApplyError,
    PgApplier,
    SourceFetch,
    ValueSql,
    fetch_rows_by_key,
)
from cdcsync.adapters.schema_follow import column_adder
from cdcsync.adapters.schema_registry import decoder_for
from cdcsync.adapters.state_store import ensure_schema
from cdcsync.config import Settings
from cdcsync.core import plan as plan_mod
from cdcsync.core import replay
from cdcsync.core.batching import Batch, BatchPolicy, gap
from cdcsync.core.debezium import HEARTBEAT_TOPIC_PREFIX
from cdcsync.core.events import Event, Op, RowChange, TableId, Truncate
from cdcsync.errors import ConfigError, DecodeError, HaltedError

log = logging.getLogger("cdcsync.stream")

#: A batch in progress is applied once the topics stay quiet this long.
IDLE_LINGER_SECONDS = 0.02
TRANSIENT_RETRIES = 5
GC_THRESHOLD = 10_000


#: How the applier's consumer fetches (shared with the benchmark's consume ceiling).
#: Bounds what librdkafka buffers, whatever the backlog: 16 MB is about 180 ms of
#: uncompressed JSON events at the apply rate, and the message count caps what compressed
#: topics would otherwise inflate to (the byte limit counts compressed bytes; the default
#: count is 100,000). One fetch holds up to ``max.partition.fetch.bytes`` of each
#: partition, decompressed at once: a consumer reading an lz4 backlog peaked at 250 MB
#: with the default 1 MB and at 155 MB with 256 kB, as fast. A partition over those
#: bounds is not fetched again for ``fetch.queue.backoff.ms``: at the default (1 s) a
#: consumer that empties its queue faster sits idle, and read a backlog at 16k
#: messages/s instead of 125k.
FETCH: dict[str, int] = {
    "queued.max.messages.kbytes": 16384,
    "queued.min.messages": 10000,
    "fetch.max.bytes": 16 * 1024 * 1024,
    "max.partition.fetch.bytes": 256 * 1024,
    "fetch.queue.backoff.ms": 10,
}


@dataclass
class StreamStatus:
    """What the loop exposes to health checks and metrics."""

    batches: int = 0
    events: int = 0
    last_commit_ts_ms: int | None = None
    last_lsn: int | None = None
    halted: str | None = None
    heartbeat: float = field(default_factory=time.monotonic)


class StreamObserver(Protocol):
    """What a loop reports (one observer may serve loops of both directions)."""

    def stream_started(self, direction: str, tables: Iterable[TableId] | None) -> None: ...
    def stream_stopped(self, direction: str) -> None: ...
    def heartbeat(self) -> None: ...
    def batch_applied(
        self,
        direction: str,
        events: Sequence[Event],
        seconds: float,
        nbytes: int = 0,
        *,
        messages: int | None = None,
    ) -> None: ...
    def halted(self, direction: str, reason: str, partitions: int = 1) -> None: ...
    def dead_lettered(
        self, direction: str, table: TableId | None, kind: str = "decode"
    ) -> None: ...
    def paused(self, direction: str | None = None) -> str | None: ...


class _Unobserved:
    """The observer of a loop nobody watches (tests, benchmarks)."""

    def stream_started(self, direction: str, tables: Iterable[TableId] | None) -> None:
        pass

    def stream_stopped(self, direction: str) -> None:
        pass

    def heartbeat(self) -> None:
        pass

    def batch_applied(
        self,
        direction: str,
        events: Sequence[Event],
        seconds: float,
        nbytes: int = 0,
        *,
        messages: int | None = None,
    ) -> None:
        pass

    def halted(self, direction: str, reason: str, partitions: int = 1) -> None:
        pass

    def dead_lettered(self, direction: str, table: TableId | None, kind: str = "decode") -> None:
        pass

    def paused(self, direction: str | None = None) -> str | None:
        return None


@dataclass
class Endpoint:
    """One direction of replication: where events come from and where they go."""

    direction: str
    topic_prefix: str
    target_dsn: str  # written to (the target forward, the old source in reverse)
    source_dsn: str  # read from by key when an event cannot carry a value exactly
    tables: set[TableId] | None = None


def forward_endpoint(settings: Settings) -> Endpoint:
    return Endpoint(
        "forward",
        settings.topic_prefix,
        settings.target_conninfo(),
        settings.source_conninfo(),
    )


class StreamLoop:
    """Consumes one direction's topics and applies them until stopped or halted."""

    def __init__(
        self,
        settings: Settings,
        endpoint: Endpoint,
        *,
        stop: threading.Event | None = None,
        on_batch: Callable[[StreamStatus], None] | None = None,
        observer: StreamObserver | None = None,
    ) -> None:
        self.settings = settings
        self.endpoint = endpoint
        self.stop = stop or threading.Event()
        self.plan = plan_mod.load(settings.plan) if settings.plan else plan_mod.EMPTY
        # Events arrive in the names of the side they come from: forward ones are mapped
        # onto the target's tables and columns, reverse ones back onto the source's.
        self._map: Callable[[Event], Event] | None = None
        if self.plan.maps_columns:
            forward = endpoint.direction == "forward"
            self._map = self.plan.map_event if forward else self.plan.reverse_event
        self.on_batch = on_batch
        self.observer: StreamObserver = observer or _Unobserved()
        self._paused: str | None = None
        self.status = StreamStatus()
        self.expected: dict[tuple[str, int], int | None] = {}
        self.low: dict[tuple[str, int], int] = {}
        self._consumer: Any = None
        self._partition_counts: dict[str, int] = {}
        self.replays = replay.Tracker()
        self._resent = 0  # re-sent changes skipped in the batch being gathered
        self._callback_error: Exception | None = None
        self._dlq: Any = None
        self._decode_message = decoder_for(settings)  # JSON or Avro, by kafka.format
        # Bumped on every assignment change: a batch gathered across one is dropped,
        # since the new assignment re-reads from the offsets stored in the target.
        self._generation = 0
        # Outside the subscribed pattern, or the loop would read its own dead letters back.
        self.dead_letter_topic = settings.apply.dead_letter_topic or f"{endpoint.topic_prefix}-dlq"
        if self.dead_letter_topic.startswith(f"{endpoint.topic_prefix}."):
            raise ConfigError(
                f"apply.dead_letter_topic {self.dead_letter_topic!r} is under the topic prefix "
                f"{endpoint.topic_prefix!r}.: the applier would consume its own dead letters"
            )

    # ------------------------------------------------------------- plumbing
    def _connect(self) -> tuple[psycopg.Connection[Any], PgApplier]:
        conn = connect(self.endpoint.target_dsn, "target", autocommit=True)
        ensure_schema(conn, self.settings.state_schema)
        conn.autocommit = False
        conn.execute(
            "SELECT set_config('synchronous_commit', %s, false)",
            (self.settings.apply.synchronous_commit,),
        )
        conn.commit()
        source = connect(self.endpoint.source_dsn, "source", autocommit=True)
        source.read_only = True
        allowed = self.endpoint.tables
        if allowed is not None and self.endpoint.direction == "forward":
            allowed = set(self.plan.on_target(sorted(allowed, key=str)))  # mapped events' names
        applier = PgApplier(
            conn,
            tables=allowed,
            unknown_table=self.settings.apply.unknown_table,
            fetch_source=_mapped_fetch(fetch_rows_by_key(source), self.plan, self.endpoint),
            add_columns=(
                column_adder(source, state_schema=self.settings.state_schema)
                if self.settings.apply.add_new_columns
                else None
            ),
            transforms=_transforms(self.plan) if self.endpoint.direction == "forward" else None,
            stage_types=_reverse_casts(self.plan) if self.endpoint.direction == "reverse" else None,
        )
        applier.prepare_session()
        conn.commit()
        return conn, applier

    def _consumer_for(self, conn: psycopg.Connection[Any]) -> Any:
        from confluent_kafka import OFFSET_BEGINNING, Consumer

        prefix = self.endpoint.topic_prefix
        consumer = Consumer(
            {
                "bootstrap.servers": self.settings.kafka_bootstrap,
                "group.id": f"cdcsync-{self.settings.migration_id}-{self.endpoint.direction}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                # Static membership: a restarted daemon gets its partitions back at once
                # instead of after the session timeout.
                "group.instance.id": self.settings.instance_id,
                "session.timeout.ms": 15000,
                # Spread every topic-partition over the group: most tables have one
                # partition, which the range assignor would all give to one member.
                "partition.assignment.strategy": "roundrobin",
                "enable.partition.eof": False,
                **FETCH,
                "topic.metadata.refresh.interval.ms": 5000,
                "log_level": 3,
                **client_logging(),  # served by consume(), which runs all the time
            }
        )

        def on_assign(c: Any, partitions: list[Any]) -> None:
            # An exception raised out of librdkafka's callback would end the thread
            # without passing through ``run``: keep it for ``consume``'s caller.
            try:
                assign(c, partitions)
            except Exception as exc:
                self._callback_error = exc

        def assign(c: Any, partitions: list[Any]) -> None:
            self._generation += 1
            self.expected.clear()
            conn.rollback()
            stored = offset_store.load(
                conn,
                self.settings.state_schema,
                self.settings.migration_id,
                self.endpoint.direction,
            )
            conn.rollback()
            for tp in partitions:
                key = (tp.topic, tp.partition)
                # No broker round trip here: a callback that blocks (a broker still
                # electing leaders after a crash) misses heartbeats, the group evicts the
                # member, and the next assignment blocks again. The low watermark is only
                # needed for a partition nothing was applied from: ``_decode`` asks then.
                self.low.pop(key, None)
                start = stored.get(key)
                self.expected[key] = start
                tp.offset = start if start is not None else OFFSET_BEGINNING
            self._load_replays(conn, [(tp.topic, tp.partition) for tp in partitions])
            c.assign(partitions)
            log.info(
                "assigned %s", [f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in partitions]
            )

        def on_revoke(c: Any, partitions: list[Any]) -> None:
            try:
                self._generation += 1
                for tp in partitions:
                    self.expected.pop((tp.topic, tp.partition), None)
                c.unassign()
            except Exception as exc:
                self._callback_error = exc

        consumer.subscribe(
            [f"^{_re(prefix)}\\..*", f"^{_re(HEARTBEAT_TOPIC_PREFIX)}\\.{_re(prefix)}$"],
            on_assign=on_assign,
            on_revoke=on_revoke,
        )
        return consumer

    # ----------------------------------------------------------------- loop
    def run(self) -> int:
        """Stream until stopped (exit 0) or halted (raises :class:`HaltedError`)."""
        # Each event allocates a handful of containers that live until its batch is
        # applied; at the default threshold (700) the collector ran every ~100 events and
        # took a fifth of the decoding time. The events hold no cycles to collect.
        gc.set_threshold(GC_THRESHOLD, 50, 100)
        conn, applier = self._connect()
        consumer = self._consumer = self._consumer_for(conn)
        policy = BatchPolicy(
            self.settings.apply.batch_max_events,
            self.settings.apply.batch_max_bytes,
            self.settings.apply.batch_max_wait_ms / 1000.0,
        )
        observer, direction = self.observer, self.endpoint.direction
        # Only a dead letter needs the original message (a halt names the decoded key):
        # the default policy does not hold a whole batch of raw messages until applied.
        keep_raw = self.settings.apply.on_error == "dead-letter"
        observer.stream_started(direction, self.endpoint.tables)
        try:
            while not self.stop.is_set():
                self.status.heartbeat = time.monotonic()
                observer.heartbeat()
                if self._hold_if_paused(consumer, conn):
                    continue
                batch = Batch(policy, time.monotonic())
                events: list[Event] = []
                raw: dict[tuple[str, int, int], Any] = {}
                generation = self._generation
                while not batch.full(time.monotonic()) and not self.stop.is_set():
                    # consume() waits its whole timeout unless the count fills, so a
                    # short one: a quiet spell ends the batch in progress. A backlog still
                    # fills whole batches, and the tail of a burst (a cutover's drain) is
                    # applied without lingering.
                    msgs = consumer.consume(
                        num_messages=min(5000, policy.max_events - batch.events),
                        timeout=IDLE_LINGER_SECONDS,
                    )
                    self.status.heartbeat = time.monotonic()
                    observer.heartbeat()
                    if self._callback_error is not None:
                        exc, self._callback_error = self._callback_error, None
                        raise HaltedError(f"partition assignment failed: {exc}") from exc
                    if self._generation != generation:
                        # The assignment changed under this batch: start over from the
                        # stored offsets (the messages just read included).
                        batch = Batch(policy, time.monotonic())
                        events, raw = [], {}
                        generation = self._generation
                        self._reseek(consumer, conn)
                        continue
                    for msg in msgs:
                        if msg.error():
                            self._kafka_error(msg)
                            continue
                        # Each accessor call crosses into librdkafka: read them once.
                        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
                        value = msg.value()
                        event = self._decode(msg, topic, partition, offset, value)
                        if self._map is not None and event is not None:
                            event = self._mapped(event, msg)
                        if (
                            event is not None
                            # keyed changes are idempotent: only others can be replays
                            and (type(event) is not RowChange or not event.key)
                            and self._replayed(event, msg, topic, partition, offset)
                        ):
                            # Applied before: its offset moves on with the batch.
                            batch.add(topic, partition, offset, len(value or b""))
                            continue
                        if event is None:
                            continue  # sent to the dead-letter topic
                        batch.add(topic, partition, offset, len(value or b""))
                        events.append(event)
                        if keep_raw:
                            raw[(topic, partition, offset)] = msg
                    if not msgs:
                        break
                if batch.events:
                    self._apply(conn, applier, batch, events, raw)
            return 0
        except HaltedError as exc:
            observer.halted(direction, str(exc))
            raise
        finally:
            observer.stream_stopped(direction)
            consumer.close()
            conn.close()

    def _mapped(self, event: Event, msg: Any) -> Event:
        """The event in the target's names; a plan hook that raises halts naming where."""
        assert self._map is not None
        try:
            return self._map(event)
        except Exception as exc:
            raise HaltedError(
                f"the plan's mapping failed on {_where(msg)}: {type(exc).__name__}: {exc}"
            ) from exc

    def _hold_if_paused(self, consumer: Any, conn: psycopg.Connection[Any]) -> bool:
        """While an operator pause lasts: fetch nothing, apply nothing, keep the group.

        Called between batches only, so nothing is in flight. Partitions are paused
        (again on every turn: a rebalance assigns them unpaused); ``consume`` still
        runs to serve the group protocol and rebalance callbacks. Anything it returns
        is dropped, and on resume every partition is re-positioned at the offset
        stored in the database written to, so nothing is skipped or applied twice.
        """
        reason = self.observer.paused(self.endpoint.direction)
        if reason is None:
            if self._paused is not None:
                self._paused = None
                consumer.resume(consumer.assignment())
                self._reseek(consumer, conn)
                log.info("%s applier resumed", self.endpoint.direction)
            return False
        if self._paused is None:
            log.warning("%s applier paused by the operator: %s", self.endpoint.direction, reason)
        self._paused = reason
        assigned = consumer.assignment()
        if assigned:
            consumer.pause(assigned)
        dropped = consumer.consume(num_messages=100, timeout=0.2)
        if dropped:
            log.debug("paused: %d fetched message(s) left for after resume", len(dropped))
        return True

    def _reseek(self, consumer: Any, conn: psycopg.Connection[Any]) -> None:
        """Position every assigned partition at its stored offset again."""
        from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition

        conn.rollback()
        stored = offset_store.load(
            conn, self.settings.state_schema, self.settings.migration_id, self.endpoint.direction
        )
        conn.rollback()
        assigned = consumer.assignment()
        self._load_replays(conn, [(tp.topic, tp.partition) for tp in assigned])
        for tp in assigned:
            key = (tp.topic, tp.partition)
            start = stored.get(key)
            self.expected[key] = start
            try:
                consumer.seek(
                    TopicPartition(
                        tp.topic, tp.partition, start if start is not None else OFFSET_BEGINNING
                    )
                )
            except KafkaException as exc:
                # Not fetching yet: the assignment itself starts at the stored offset.
                log.debug("seek %s[%d]: %s", tp.topic, tp.partition, exc)

    def _load_replays(
        self, conn: psycopg.Connection[Any], partitions: list[tuple[str, int]]
    ) -> None:
        """The replay marks as committed: in-memory ones of a dropped batch are forgotten."""
        with conn.transaction():
            marks, cursors = replay_store.load(
                conn,
                self.settings.state_schema,
                self.settings.migration_id,
                self.endpoint.direction,
                partitions,
            )
        self.replays.reset(marks, cursors)

    def _replayed(self, event: Event, msg: Any, topic: str, partition: int, offset: int) -> bool:
        """Whether Debezium sent this change before and it was applied (keyless tables
        and truncates only: keyed changes are idempotent)."""
        if isinstance(event, Truncate):
            insert, ident = False, replay.digest("truncate", str(event.table))
        elif isinstance(event, RowChange) and not event.keyed:
            image = event.after if event.after is not None else event.before
            insert, ident = event.op is Op.INSERT, replay.digest(event.op.name, image)
        else:
            return False
        src = event.source
        if src.tx_id is None or src.lsn is None:
            return False
        seen = self.replays.seen(
            (topic, partition),
            offset,
            src.tx_id,
            src.lsn,
            insert=insert,
            ident=ident,
            ts_ms=int(msg.timestamp()[1]),
        )
        if seen:
            if not self._resent:
                log.info("changes sent again by the connector, skipped from %s", _where(msg))
            self._resent += 1
        return seen

    def _kafka_error(self, msg: Any) -> None:
        err = msg.error()
        if err.fatal():
            raise HaltedError(f"Kafka: {err}")
        log.warning("Kafka: %s", err)

    def _decode(
        self, msg: Any, topic: str, partition: int, offset: int, value: bytes | None
    ) -> Event | None:
        key = (topic, partition)
        expected = self.expected.get(key)
        if expected != offset:  # the common case, in order, needs no further check
            low = self.low.get(key)
            if low is None and expected is None and offset > 0:
                from confluent_kafka import TopicPartition

                low = self.low[key] = _low_watermark(
                    self._consumer, TopicPartition(topic, partition)
                )
            problem = gap(expected, low or 0, offset)
            if problem:
                raise HaltedError(
                    f"offset gap on {topic}[{partition}]: {problem} — refusing to skip "
                    "(re-snapshot the migration)"
                )
        self.expected[key] = offset + 1
        try:
            event = self._decode_message(  # positional: cheaper per message
                topic, partition, offset, msg.key(), value, self.endpoint.topic_prefix
            )
            if isinstance(event, Truncate) and self._partitions(topic) > 1:
                raise HaltedError(
                    f"truncate of {event.table} at {_where(msg)}: its topic has "
                    f"{self._partitions(topic)} partitions, so the truncate cannot be ordered "
                    "against the table's other changes; re-snapshot the table, and give "
                    "tables that are truncated a one-partition topic"
                )
            return event
        except DecodeError as exc:
            where = _where(msg)
            if self.settings.apply.on_error == "dead-letter":
                self._dead_letter(msg, str(exc))
                self.observer.dead_lettered(self.endpoint.direction, None, "decode")
                return None
            raise HaltedError(f"cannot decode {where}: {exc}") from None

    def _partitions(self, topic: str) -> int:
        """How many partitions ``topic`` has (asked rarely: on truncates only)."""
        if topic not in self._partition_counts:
            meta = self._consumer.list_topics(topic, timeout=10)
            self._partition_counts[topic] = len(meta.topics[topic].partitions)
        return self._partition_counts[topic]

    def _dead_letter(self, msg: Any, reason: str) -> None:
        from confluent_kafka import Producer

        topic = self.dead_letter_topic
        if self._dlq is None:
            self._dlq = Producer(
                {
                    "bootstrap.servers": self.settings.kafka_bootstrap,
                    "acks": "all",
                    "enable.idempotence": True,
                }
            )
        headers = [
            ("cdcsync.error", reason.encode()),
            ("cdcsync.topic", msg.topic().encode()),
            ("cdcsync.partition", str(msg.partition()).encode()),
            ("cdcsync.offset", str(msg.offset()).encode()),
        ]
        self._dlq.produce(topic, key=msg.key(), value=msg.value(), headers=headers)
        if self._dlq.flush(30) != 0:
            raise HaltedError(f"dead-letter topic {topic} did not acknowledge {_where(msg)}")
        log.error("dead-lettered %s: %s", _where(msg), reason)

    def _apply(
        self,
        conn: psycopg.Connection[Any],
        applier: PgApplier,
        batch: Batch,
        events: list[Event],
        raw: dict[tuple[str, int, int], Any],
    ) -> None:
        started = time.monotonic()
        retries = 0
        while True:
            try:
                with conn.transaction():
                    stats = applier.apply(events)
                    offset_store.save(
                        conn,
                        self.settings.state_schema,
                        self.settings.migration_id,
                        self.endpoint.direction,
                        self._progress(batch, events),
                    )
                    replay_store.save(
                        conn,
                        self.settings.state_schema,
                        self.settings.migration_id,
                        self.endpoint.direction,
                        self.replays.pending(),
                        self.replays.cursors(),
                    )
                    faultpoints.hit("batch-before-commit")
                faultpoints.hit("batch-after-commit")
                self.replays.saved()
                if self._resent:
                    log.info("%d re-sent change(s) skipped in this batch", self._resent)
                    self._resent = 0
                break
            except offset_store.PartitionLost as exc:
                # A rebalance gave the partition to another process, which applied past
                # this batch: drop it (rolled back) and go on from the stored offsets.
                applier.forget()
                log.warning("%s: batch dropped, re-reading from the stored offsets", exc)
                self._reseek(self._consumer, conn)
                return
            except ApplyError as exc:
                applier.forget()
                if _transient(exc) and retries < TRANSIENT_RETRIES:
                    # Deadlock or serialization failure against another writer (another
                    # process of the group): the whole batch again, never a dead letter.
                    retries += 1
                    log.warning("batch retried (%d): %s", retries, exc)
                    time.sleep(0.05 * retries)
                    continue
                pos = exc.position
                msg = raw.get((pos.topic, pos.partition, pos.offset)) if pos else None
                bad = next((e for e in events if e.position == pos), None)
                if self.settings.apply.on_error != "dead-letter" or msg is None or _resource(exc):
                    where = _where(msg) if msg is not None else _event_where(bad)
                    raise HaltedError(f"cannot apply {where}: {exc}") from None
                self._dead_letter(msg, str(exc))
                table = getattr(bad, "table", None)
                self.observer.dead_lettered(
                    self.endpoint.direction, table if isinstance(table, TableId) else None, "apply"
                )
                events = [e for e in events if e.position != pos]
            except psycopg.OperationalError as exc:
                raise HaltedError(f"target connection lost: {exc}") from exc
        self.observer.batch_applied(
            self.endpoint.direction,
            events,
            time.monotonic() - started,
            batch.size,
            messages=batch.events,
        )
        self.status.batches += 1
        self.status.events += len(events)
        lsn = ts_ms = None
        for event in reversed(events):  # the newest position with each field set
            if isinstance(event, RowChange | Truncate):
                lsn = lsn or event.source.lsn
                ts_ms = ts_ms or event.source.commit_ts_ms
                if lsn and ts_ms:
                    break
        self.status.last_lsn = lsn or self.status.last_lsn
        self.status.last_commit_ts_ms = ts_ms or self.status.last_commit_ts_ms
        if self.on_batch:
            self.on_batch(self.status)
        log.debug("batch of %d events applied: %s", len(events), stats.applied)
        self._consumer.commit(offsets=_kafka_offsets(batch.next_offset), asynchronous=True)

    def _progress(self, batch: Batch, events: list[Event]) -> list[offset_store.Progress]:
        last: dict[tuple[str, int], tuple[int | None, int | None]] = {}
        wanted = len(batch.next_offset)
        for event in reversed(events):  # each partition's newest change, from the end
            if isinstance(event, RowChange | Truncate):
                tp = (event.position.topic, event.position.partition)
                if tp not in last:
                    last[tp] = (event.source.lsn, event.source.commit_ts_ms)
                    if len(last) == wanted:
                        break
        out = []
        for tp, nxt in batch.next_offset.items():
            first = batch.first_offset[tp]
            lsn, ts = last.get(tp, (None, None))
            out.append(offset_store.Progress(tp[0], tp[1], first, nxt, lsn, ts))
        return out


def _transforms(plan: plan_mod.Plan) -> dict[TableId, dict[str, ValueSql]]:
    """The plan's transforms as SQL over the applier's staged values, by target table."""
    out: dict[TableId, dict[str, ValueSql]] = {}
    for tp in plan.tables.values():
        table = tp.target_table
        for column, chain in tp.transformed().items():

            def value(ref: Any, chain: Any = chain) -> Any:
                for step in chain:
                    ref = step.sql(ref)
                return ref

            out.setdefault(table, {})[column] = value
    return out


def _reverse_casts(plan: plan_mod.Plan) -> dict[TableId, dict[str, str]]:
    """Source column → the type its values come back in (the plan's cast on the target)."""
    out: dict[TableId, dict[str, str]] = {}
    for table, tp in plan.tables.items():
        for column in tp.columns.values():
            if column.cast and not column.drop:
                out.setdefault(table, {})[column.name] = column.cast
    return out


def _mapped_fetch(fetch: SourceFetch, plan: plan_mod.Plan, endpoint: Endpoint) -> SourceFetch:
    """Reads rows by key from the side events come from, in the names (and, forward,
    with the hooks) the applier uses.

    ``table`` is the applier's (the target's name forward, the source's in reverse); the
    rows are read from the other side's table of the same plan entry.
    """
    if not plan.maps_columns:
        return fetch
    forward = endpoint.direction == "forward"

    def mapped(
        table: TableId, key: tuple[str, ...], keys: list[tuple[Any, ...]]
    ) -> dict[tuple[Any, ...], dict[str, Any]]:
        tp = plan.table(plan.source_table(table) if forward else table)
        there = tp.source_of if forward else tp.target_of
        back = tp.target_of if forward else tp.source_of
        origin = tp.table if forward else tp.target_table
        rows = fetch(origin, tuple(str(there(k)) for k in key), keys)
        # Read from the source, a hooked column's value goes through its hook as an
        # event's would; read back from the target, it is carried as it is.
        hooks = tp.hooks() if forward else {}
        return {
            k: {
                b: v if (h := hooks.get(n)) is None else h.apply(v)
                for n, v in row.items()
                if (b := back(n)) is not None
            }
            for k, row in rows.items()
        }

    return mapped


def _low_watermark(consumer: Any, tp: Any, attempts: int = 10) -> int:
    """The partition's first offset; retried while a new topic's leader is elected."""
    from confluent_kafka import KafkaException

    for attempt in range(attempts):
        try:
            low, _high = consumer.get_watermark_offsets(tp, timeout=10, cached=False)
            return int(low)
        except KafkaException as exc:
            if attempt == attempts - 1:
                raise
            log.info("watermarks of %s[%d]: %s — retrying", tp.topic, tp.partition, exc)
            time.sleep(0.5)
    raise AssertionError("unreachable")


def _transient(exc: BaseException) -> bool:
    """A failure that the same batch, applied again, may not meet."""
    cause = exc.__cause__
    state = getattr(cause, "sqlstate", None) or ""
    return state.startswith("40") or state == "55P03"


def _resource(exc: BaseException) -> bool:
    """The database failed, not the event (disk full, shutdown, I/O): halt, never DLQ."""
    state = getattr(exc.__cause__, "sqlstate", None) or ""
    return state[:2] in ("08", "53", "57", "58", "XX")


def _kafka_offsets(next_offsets: dict[tuple[str, int], int]) -> list[Any]:
    from confluent_kafka import TopicPartition

    return [TopicPartition(t, p, o) for (t, p), o in next_offsets.items()]


def _where(msg: Any) -> str:
    key = msg.key()
    shown = key.decode(errors="replace")[:200] if key else "null"
    return f"{msg.topic()}[{msg.partition()}]@{msg.offset()} key={shown}"


def _event_where(event: Event | None) -> str:
    """``_where`` for an event whose message was not kept: the key as decoded."""
    if event is None:
        return "batch"
    pos = event.position
    key = getattr(event, "key", None)
    shown = json.dumps(dict(key), default=str)[:200] if key else "null"
    return f"{pos.topic}[{pos.partition}]@{pos.offset} key={shown}"


def _re(text: str) -> str:
    import re

    return re.escape(text)


def install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM and SIGINT only set the flag the loop checks."""

    def handler(signum: int, frame: FrameType | None) -> None:
        del frame
        log.info("signal %d: finishing the batch in flight", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def configure_logging(fmt: str | None) -> None:
    import sys

    use_json = fmt == "json" or (fmt is None and not sys.stderr.isatty())
    handler = logging.StreamHandler()
    if use_json:

        class JsonFormatter(logging.Formatter):
            def format(self, record: logging.LogRecord) -> str:
                return json.dumps(
                    {
                        "ts": record.created,
                        "level": record.levelname,
                        "logger": record.name,
                        "msg": record.getMessage(),
                    }
                )

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("cdcsync")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
