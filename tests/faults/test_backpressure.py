"""A stalled target under a fast, large backlog: the daemon's memory stays bounded.

A session on the target holds ``LOCK TABLE … IN ACCESS EXCLUSIVE MODE`` on a table
while the source inserts tens of thousands of ~2 KB rows into it as fast as it can
(on top of the usual load and the ledger). The applier's batch waits on the lock, so
nothing is applied; the question is what the process holds meanwhile. The bound, by
construction of the consumer and the batch:

- librdkafka prefetches at most ``queued.max.messages.kbytes`` (16 MiB) into its queue,
  plus one fetch response in flight (``fetch.max.bytes``, 16 MiB, at most 256 kB of
  each partition: ``cdcsync.engine.stream.FETCH``);
- the batch being applied holds at most ``apply.batch_max_bytes`` (32 MiB) of message
  values plus their decoded events (of the same order);
- the interpreter, psycopg, confluent-kafka and the HTTP endpoints take ~70-90 MiB.

So ~250 MiB at worst during the stall: the test asserts VmRSS under 300 MiB then, a
growth during the stall under 120 MiB (queue, fetch and batch, with slack), and a
growth smaller than the backlog's payload (the consumer stopped fetching instead of
buffering the backlog). Catching up is the costlier moment — a full batch being
decoded and staged while the queue refills behind it — so the process's high-water
mark (VmHWM) gets 350 MiB. Then the proof holds.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition

from tests.faults.faultkit import proc_status_kb, stored_offsets
from tests.faults.harness import FaultRun
from tests.integration.cutover_helpers import settings_for

pytestmark = pytest.mark.stack

ROWS = 80_000
PER_TX = 1_000
BOUND_KB = 300 * 1024
HWM_KB = 350 * 1024
STALL_GROWTH_KB = 120 * 1024
BLOB_DDL = "CREATE TABLE public.blob (id bigint PRIMARY KEY, payload text NOT NULL)"
# ~1.9 KB of hex per row: not compressible enough to be TOASTed or shrunk by pglz.
INSERT = (
    "INSERT INTO public.blob SELECT g, (SELECT string_agg(md5(random()::text || g || i), '') "
    "FROM generate_series(1, 60) i) FROM generate_series(%s::bigint, %s::bigint) g"
)


@dataclass
class Sampler:
    """VmRSS of one process every ``every`` seconds, until stopped."""

    pid: int
    every: float = 0.5
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = proc_status_kb(self.pid)["VmRSS"]
            except (OSError, KeyError):
                return
            self.samples.append((time.monotonic(), rss))
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def peak(self, since: float = 0.0, until: float = float("inf")) -> int:
        return max((kb for t, kb in self.samples if since <= t <= until), default=0)


def _end_offset(bootstrap: str, topic: str) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "cdcsync-probe"})
    try:
        _low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        return int(high)
    finally:
        consumer.close()


@pytest.mark.slow
@pytest.mark.scenario(
    "slow target: a table locked (>= 40 s, until the backlog is in Kafka) under 80k ~2 KB inserts",
    "consumer stops fetching at its bound (RSS < 300 MiB stalled, HWM < 350 MiB); catches up; "
    "0 lost, 0 doubled",
)
def test_locked_target_table_bounds_memory(
    fault_run: FaultRun, connectors: list[str], source_dsn: str, target_dsn: str
) -> None:
    env = fault_run.env
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(BLOB_DDL)
    fault_run.start(connectors, seconds=60)
    proc = fault_run.daemon.proc
    assert proc is not None
    sampler = Sampler(proc.pid)
    sampler.start()
    time.sleep(5)
    before = proc_status_kb(proc.pid)["VmRSS"]

    settings = settings_for(env)
    topic = f"{settings.topic_prefix}.public.blob"
    lock = psycopg.connect(target_dsn)
    lock.execute("LOCK TABLE public.blob IN ACCESS EXCLUSIVE MODE")
    stall_started = time.monotonic()
    produced_bytes = 0
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        for first in range(1, ROWS + 1, PER_TX):
            conn.execute(INSERT, (first, min(first + PER_TX - 1, ROWS)))
        row = conn.execute("SELECT sum(octet_length(payload)) FROM public.blob").fetchone()
        produced_bytes = int(row[0]) if row and row[0] else 0
    # Hold the lock until Debezium has put the whole backlog in Kafka, and 40 s at least.
    deadline = stall_started + 240
    while _end_offset(env["CDCSYNC_KAFKA_BOOTSTRAP"], topic) < ROWS:
        assert time.monotonic() < deadline, "Debezium did not produce the backlog in 240 s"
        time.sleep(1)
    produced_at = time.monotonic()
    time.sleep(max(5.0, 40 - (produced_at - stall_started)))
    applied_during_stall = stored_offsets(env).get((topic, 0), 0)
    stall_peak = sampler.peak(stall_started)
    lock.rollback()  # the release
    lock.close()
    stall_seconds = time.monotonic() - stall_started

    fault_run.finish(timeout=400)
    sampler.stop()
    status = proc_status_kb(proc.pid)
    catchup_peak = sampler.peak(stall_started + stall_seconds)
    print(
        f"BACKPRESSURE rss_before_kb={before} stall_peak_kb={stall_peak} "
        f"catchup_peak_kb={catchup_peak} vmhwm_kb={status['VmHWM']} vmrss_end_kb={status['VmRSS']} "
        f"stall_s={stall_seconds:.0f} backlog_rows={ROWS} payload_bytes={produced_bytes} "
        f"applied_during_stall={applied_during_stall}"
    )
    assert applied_during_stall == 0, "the locked table was written to during the stall"
    assert stall_peak < BOUND_KB, f"VmRSS reached {stall_peak} KiB during the stall"
    assert status["VmHWM"] < HWM_KB, f"VmHWM {status['VmHWM']} KiB"
    # The stall may add the prefetch queue (64 MiB), one fetch in flight (16 MiB) and
    # the blocked batch (32 MiB of values): 120 MiB with slack. The backlog's payload
    # alone is ~150 MB (its messages, with their JSON schemas, about twice that): had
    # the consumer buffered it, the growth would be larger than the payload.
    growth_kb = stall_peak - before
    assert growth_kb < STALL_GROWTH_KB, f"VmRSS grew {growth_kb} KiB during the stall"
    assert produced_bytes > 140e6
    assert growth_kb * 1024 < produced_bytes, (before, stall_peak, produced_bytes)
