"""Apply benchmark: drain the same Debezium topics with cdcsync and with its peers.

One source workload (pgbench plus an insert-heavy table) is captured twice from the
same point: by Debezium into Kafka topics (then the connector is removed), and by a
second logical slot for PostgreSQL's native logical replication. Each contender starts
from the same restored target and is timed until it has applied everything (cdcsync in
a process of its own, as the daemon runs, the sink in Connect's JVM); each result is
checked against the source by per-table digests. Ceilings: consume-only,
decode-only, and apply-only (pre-decoded events). The last line is one JSON object.

    python bench/apply.py --scale 10 --transactions 20000 --inserts 200000

``--applier-rss`` drains the topics once more with cdcsync and reports its RSS every 5 s
and its peak (VmHWM): the memory the applier needs for a backlog.
``--skip jdbc_sink,native_logical`` leaves out peers on large runs (ratios then omitted);
``--skip ceilings,cdcsync,jdbc_sink,native_logical --applier-rss`` only fills the topics and
drains them with the applier in its own process (a large backlog, for its memory).

``--format avro`` captures with Apicurio's Avro converter and the stack's registry
(``CDCSYNC_KAFKA__SCHEMA_REGISTRY_URL``; ``cdcsync stack up registry``): cdcsync decodes
Avro, the JDBC sink reads the same topics with the same converter, and the decode ceiling
uses the Avro decoder. ``--producer compression.type=lz4`` sets
``producer.override.*`` on the source connector. ``--consumer-variant
NAME:KEY=VALUE,...`` (repeatable) drains the same topics again with those librdkafka
settings merged into every consumer (``consume.batch=N``: messages per ``consume()``),
timing the consume ceiling and cdcsync for each, beside a ``default`` variant;
``--applier-consumer KEY=VALUE,...`` does the same for the ``--applier-rss`` process.
The topics are deleted at the end (kept with ``BENCH_KEEP_TOPICS=1``).

Needs CDCSYNC_SOURCE_DSN, CDCSYNC_TARGET_DSN, CDCSYNC_KAFKA_BOOTSTRAP,
CDCSYNC_CONNECT_URL and CDCSYNC_CONNECT_SECRETS_FILE (``cdcsync stack env``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peers import SinkFailed, native_subscription, run_jdbc_sink, run_native
from bench.tuning import parse_pairs, parse_variant, tuned_consumers
from cdcsync import metrics
from cdcsync.adapters.connect_rest import ConnectClient
from cdcsync.adapters.debezium_connector import source_connector_config
from cdcsync.adapters.pg_apply import PgApplier
from cdcsync.adapters.schema_registry import decoder_for
from cdcsync.adapters.state_store import ensure_schema
from cdcsync.config import load_settings
from cdcsync.core.connector_config import converter_settings
from cdcsync.core.events import Event, TableId
from cdcsync.engine.drain import applied_offsets, connector_lsn, end_offsets, lagging
from cdcsync.engine.stream import FETCH, Endpoint, StreamLoop, _Unobserved
from tests.integration.workload import conninfo_env, digests_in

PG_BIN = "/usr/lib/postgresql/15/bin"
MARKER = "bench-end-marker"


def admin(dsn: str, statement: sql.Composed) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement)


def fresh_target(target_admin: str, dump: Path, name: str) -> str:
    admin(target_admin, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = psycopg.conninfo.make_conninfo(target_admin, dbname=name)
    subprocess.run(
        [f"{PG_BIN}/pg_restore", "--no-owner", "-d", dsn, str(dump)],
        check=True,
        capture_output=True,
    )
    return dsn


def cdcsync_target(
    target_admin: str, dump: Path, name: str, settings: Any, migration_id: str
) -> tuple[str, Any]:
    """A restored target with cdcsync's state schema, and settings applying into it."""
    target = fresh_target(target_admin, dump, name)
    with psycopg.connect(target, autocommit=True) as conn:
        ensure_schema(conn)
    update = {"migration_id": migration_id, "target_dsn": target, "instance_id": migration_id}
    return target, settings.model_copy(update=update)


def drop(target_admin: str, name: str) -> None:
    dsn = psycopg.conninfo.make_conninfo(target_admin, dbname=name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for (sub,) in conn.execute(
                "SELECT subname FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid "
                "WHERE d.datname = current_database()"
            ).fetchall():
                ident = sql.Identifier(str(sub))
                conn.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(ident))
                conn.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(ident))
                conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(ident))
    except psycopg.OperationalError:
        pass  # never created
    admin(
        target_admin,
        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)),
    )


def all_messages(bootstrap: str, topics: list[str], total: int, keep: bool = True) -> list[Any]:
    """Every message of ``topics`` (or, without ``keep``, only read and counted)."""
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{secrets.token_hex(4)}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            **FETCH,  # fetched as the applier fetches
        }
    )
    consumer.subscribe(topics)
    out: list[Any] = []
    seen = 0
    deadline = time.monotonic() + 1800
    while seen < total and time.monotonic() < deadline:
        got = [m for m in consumer.consume(5000, timeout=1.0) if not m.error()]
        seen += len(got)
        if keep:
            out.extend(got)
    consumer.close()
    if seen < total:
        raise SystemExit(f"consumed {seen} of {total} messages in 30 min")
    return out


def delete_topics(bootstrap: str, prefix: str) -> None:
    """Drop the run's change and heartbeat topics (a large backlog fills the disk)."""
    from confluent_kafka.admin import AdminClient

    client = AdminClient({"bootstrap.servers": bootstrap})
    names = [
        t
        for t in client.list_topics(timeout=10).topics
        if t.startswith(f"{prefix}.") or t.endswith(f".{prefix}")
    ]
    for future in client.delete_topics(names).values() if names else []:
        future.result(timeout=60)


def vm_kb(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith(field))


TABLES = ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history", "ins")


def prepare_source(
    source: str, settings: Any, scale: int, dump: Path, slots: list[str]
) -> list[TableId]:
    """pgbench tables (history keyed) plus an insert table, the publication, a dump of that
    starting point, then the logical ``slots`` that will see the workload."""
    subprocess.run(
        [f"{PG_BIN}/pgbench", "-i", "-q", "-s", str(scale)],
        env={**os.environ, **conninfo_env(source)},
        check=True,
        capture_output=True,
    )
    tables = [TableId("public", t) for t in TABLES]
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY")
        conn.execute("CREATE TABLE ins (id bigserial PRIMARY KEY, payload text NOT NULL)")
        conn.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                sql.Identifier(settings.publication_name),
                sql.SQL(", ").join(sql.Identifier(t.schema, t.name) for t in tables),
            )
        )
    subprocess.run([f"{PG_BIN}/pg_dump", "-Fc", "-f", str(dump), "-d", source], check=True)
    with psycopg.connect(source, autocommit=True) as conn:
        for slot in slots:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    return tables


def run_workload(
    source: str, transactions: int, inserts: int
) -> tuple[int, dict[str, tuple[int, str]]]:
    """pgbench, then the inserts and the end marker: (end LSN, per-table digests)."""
    print("workload …", flush=True)
    subprocess.run(
        [f"{PG_BIN}/pgbench", "-n", "-t", str(transactions), "-c", "4", "-j", "2"],
        env={**os.environ, **conninfo_env(source)},
        check=True,
        capture_output=True,
    )
    with psycopg.connect(source, autocommit=True) as conn:
        for start in range(0, inserts, 500):
            conn.execute(
                "INSERT INTO ins (payload) SELECT md5(g::text) || repeat('x', 100) "
                "FROM generate_series(1, %s) g",
                (min(500, inserts - start),),
            )
        conn.execute("INSERT INTO ins (payload) VALUES (%s)", (MARKER,))
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        expected = digests_in(conn)
    high, low = str(row[0]).split("/")
    return (int(high, 16) << 32) | int(low, 16), expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=2, help="pgbench scale of the source")
    parser.add_argument(
        "--transactions", type=int, default=5000, help="pgbench transactions per client"
    )
    parser.add_argument("--inserts", type=int, default=50000, help="rows of the insert-heavy table")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated: ceilings, cdcsync (the in-process drain), jdbc_sink, native_logical",
    )
    parser.add_argument(
        "--applier-rss",
        action="store_true",
        help="also drain with cdcsync in its own process and report its peak RSS (VmHWM)",
    )
    parser.add_argument(
        "--format",
        choices=("json", "avro"),
        default="json",
        help="event format on Kafka: JSON with embedded schemas, or Avro with the registry",
    )
    parser.add_argument(
        "--producer",
        default="",
        metavar="KEY=VALUE,...",
        help="producer settings of the source connector (as producer.override.KEY), "
        "e.g. compression.type=lz4,linger.ms=20",
    )
    parser.add_argument(
        "--consumer-variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="also time consume-only and cdcsync with these librdkafka settings "
        "(consume.batch=N: messages per consume() call); repeatable",
    )
    parser.add_argument(
        "--applier-consumer",
        default="",
        metavar="KEY=VALUE,...",
        help="librdkafka settings merged into the consumer of the --applier-rss process",
    )
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    unknown = skip - {"ceilings", "cdcsync", "jdbc_sink", "native_logical"}
    if unknown:
        raise SystemExit(f"--skip: unknown {sorted(unknown)}")
    producer = {f"producer.override.{k}": v for k, v in parse_pairs(args.producer).items()}
    variants = [parse_variant(v) for v in args.consumer_variant]
    if variants:
        variants.insert(0, ("default", {}, None))
    env = os.environ
    source_admin, target_admin = env["CDCSYNC_SOURCE_DSN"], env["CDCSYNC_TARGET_DSN"]
    bootstrap, connect_url = env["CDCSYNC_KAFKA_BOOTSTRAP"], env["CDCSYNC_CONNECT_URL"]
    registry = env.get("CDCSYNC_KAFKA__SCHEMA_REGISTRY_URL") if args.format == "avro" else None
    if args.format == "avro" and not registry:
        raise SystemExit("--format avro needs CDCSYNC_KAFKA__SCHEMA_REGISTRY_URL")
    run = secrets.token_hex(3)
    prefix = f"bench{run}"
    src_db = f"bench_src_{run}"
    admin(source_admin, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(src_db)))
    source = psycopg.conninfo.make_conninfo(source_admin, dbname=src_db)
    settings = load_settings(
        source_dsn=source,
        target_dsn=target_admin,
        kafka_bootstrap=bootstrap,
        connect_url=connect_url,
        migration_id=prefix,
        connect_secrets_file=env["CDCSYNC_CONNECT_SECRETS_FILE"],
        kafka={"format": args.format, "schema_registry_url": registry},
    )
    decode = decoder_for(settings)
    converters = {
        k: v
        for k, v in converter_settings(args.format, registry).items()
        if k.startswith(("key.converter", "value.converter"))
    }
    client = ConnectClient(connect_url)
    dump = Path(tempfile.mkdtemp()) / "base.dump"
    results: dict[str, list[float]] = {}
    created: list[str] = []
    applier_rss_mb: float | None = None
    applier_rate: float | None = None
    events = 0
    try:
        slots = [settings.slot_name]
        if "native_logical" not in skip:
            slots.append(f"{prefix}_native")
        tables = prepare_source(source, settings, args.scale, dump, slots)
        t0 = time.monotonic()
        end_lsn, expected = run_workload(source, args.transactions, args.inserts)
        print(f"workload took {time.monotonic() - t0:.1f}s", flush=True)

        name = f"{prefix}-source"
        config = source_connector_config(settings, tables, dsn=source)
        client.put_config(name, {**config, **producer})
        client.wait_running(name, timeout=120)
        t0 = time.monotonic()
        while (connector_lsn(client, name) or 0) < end_lsn:
            time.sleep(0.5)
            if time.monotonic() - t0 > 3600:
                raise SystemExit("Debezium did not catch up")
        published = time.monotonic() - t0
        client.delete(name)
        ends = end_offsets(bootstrap, prefix)
        topics = sorted({t for t, _ in ends})
        events = sum(ends.values())
        print(
            f"{events} events in {len(topics)} topics, format {args.format} (Debezium took "
            f"{published:.1f}s to publish them: {events / published:.0f} events/s)",
            flush=True,
        )
        # The fill leaves gigabytes of topic data and WAL dirty in the page cache; their
        # writeback would otherwise fall on whichever contender runs first.
        t0 = time.monotonic()
        os.sync()
        print(f"dirty pages written back before timing: {time.monotonic() - t0:.1f}s", flush=True)

        def record(label: str, elapsed: float, extra: str = "") -> None:
            results.setdefault(label, []).append(elapsed)
            print(
                f"{label:22s} {elapsed:8.2f} s  {events / elapsed:10.0f} events/s{extra}",
                flush=True,
            )

        def timed(label: str, fn: Any) -> None:
            t = time.perf_counter()
            fn()
            record(label, time.perf_counter() - t)

        for round_no in range(args.repeat):
            if "ceilings" not in skip:
                # Ceilings.
                box: dict[str, Any] = {}
                timed(
                    "consume_only",
                    lambda box=box: box.update(msgs=all_messages(bootstrap, topics, events)),
                )
                timed(
                    "decode_only",
                    lambda box=box: box.update(
                        events=[
                            decode(
                                m.topic(),
                                m.partition(),
                                m.offset(),
                                m.key(),
                                m.value(),
                                topic_prefix=prefix,
                            )
                            for m in box.pop("msgs")
                        ]
                    ),
                )
                db = f"bench_apply_{run}_{round_no}"
                created.append(db)
                target = fresh_target(target_admin, dump, db)

                def apply_only(target: str = target, box: dict[str, Any] = box) -> None:
                    decoded: list[Event] = box.pop("events")
                    with psycopg.connect(target) as conn:
                        applier = PgApplier(conn)
                        applier.prepare_session()
                        conn.execute("SET synchronous_commit = off")
                        for i in range(0, len(decoded), 20000):
                            applier.apply(decoded[i : i + 20000])
                            conn.commit()

                timed("apply_only", apply_only)

            # cdcsync, then once per consumer variant (with its consume ceiling).
            for vname, overrides, batch in variants or [("default", {}, None)]:
                if "cdcsync" in skip and not variants:
                    break
                suffix = f"[{vname}]" if variants else ""
                with tuned_consumers(overrides, batch):
                    if variants:
                        timed(
                            f"consume_only{suffix}",
                            lambda: all_messages(bootstrap, topics, events, keep=False),
                        )
                    if "cdcsync" in skip:
                        continue
                    db = f"bench_cdcsync_{run}_{round_no}_{len(created)}"
                    created.append(db)
                    mig = f"{prefix}_r{round_no}_{len(created)}"
                    target, s = cdcsync_target(target_admin, dump, db, settings, mig)
                    # In a process of its own, as the daemon runs (and as the sink runs in
                    # Connect's JVM): not in this one, which holds the ceilings' messages.
                    drained = drain_in_child(
                        s,
                        Endpoint("forward", prefix, target, source, set(tables)),
                        ends,
                        overrides,
                        batch,
                    )
                    record(
                        f"cdcsync{suffix}",
                        drained["seconds"],
                        f"  peak RSS {drained['vmhwm_kb'] / 1024:.0f} MB",
                    )
                    check(target, expected, f"cdcsync{suffix}")

            # Debezium JDBC sink.
            if "jdbc_sink" not in skip:
                db = f"bench_jdbc_{run}_{round_no}"
                created.append(db)
                target = fresh_target(target_admin, dump, db)
                try:
                    timed(
                        "jdbc_sink",
                        lambda target=target: run_jdbc_sink(
                            client,
                            bootstrap=bootstrap,
                            target_dsn=target,
                            secrets_file=env["CDCSYNC_CONNECT_SECRETS_FILE"],
                            keyed_topics=topics,
                            keyless_topics=[],
                            converters=converters if args.format == "avro" else None,
                        ),
                    )
                    check(target, expected, "jdbc_sink")
                except SinkFailed as exc:
                    print(f"!! {exc}", flush=True)

            # Native logical replication from its own slot over the same changes.
            if round_no == 0 and "native_logical" not in skip:
                db = f"bench_native_{run}"
                created.append(db)
                target = fresh_target(target_admin, dump, db)
                native_subscription(
                    target,
                    source,
                    settings.publication_name,
                    f"{prefix}_native",
                    f"{prefix}_native",
                )
                timed(
                    "native_logical",
                    lambda target=target: run_native(target, f"{prefix}_native", MARKER),
                )
                check(target, expected, "native_logical")
        if args.applier_rss:
            db = f"bench_rss_{run}"
            created.append(db)
            target, s = cdcsync_target(target_admin, dump, db, settings, f"{prefix}_rss")
            t = time.perf_counter()
            rss = drain_in_child(
                s,
                Endpoint("forward", prefix, target, source, set(tables)),
                ends,
                parse_pairs(args.applier_consumer),
                None,
            )
            elapsed = time.perf_counter() - t
            applier_rss_mb = rss["vmhwm_kb"] / 1024
            applier_rate = events / rss["seconds"]
            curve = " ".join(f"{n / 1e6:.2f}M:{kb / 1024:.0f}" for n, kb in rss["samples"])
            print(
                f"applier in its own process: {elapsed:.2f} s with start-up, {rss['seconds']:.2f}"
                f" s draining ({applier_rate:.0f} events/s), peak RSS (VmHWM) "
                f"{applier_rss_mb:.0f} MB; RSS (MB) by events applied: {curve}",
                flush=True,
            )
            check(target, expected, "cdcsync (rss)")
    finally:
        for db in created:
            drop(target_admin, db)
        if not os.environ.get("BENCH_KEEP_TOPICS"):
            delete_topics(bootstrap, prefix)
        with psycopg.connect(source_admin, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name LIKE %s AND NOT active",
                (f"{prefix}%",),
            )
        admin(
            source_admin,
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(src_db)),
        )
    medians = {k: statistics.median(v) for k, v in results.items()}
    mine = medians.get("cdcsync", medians.get("cdcsync[default]"))
    ratios = {
        f"cdcsync_vs_{peer}": medians[peer] / mine
        for peer in ("jdbc_sink", "native_logical", "apply_only")
        if peer in medians and mine
    }
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process (holds the decode ceiling's events too): {rss_mb:.0f} MB")
    print(
        json.dumps(
            {
                "events": events,
                "format": args.format,
                "producer": producer,
                "medians_s": medians,
                "events_per_s": {k: events / v for k, v in medians.items()},
                "ratios": ratios,
                "peak_rss_mb": rss_mb,
                "applier_peak_rss_mb": applier_rss_mb,
                "applier_events_per_s": applier_rate,
            }
        )
    )


def drain_in_child(
    settings: Any,
    endpoint: Endpoint,
    ends: Any,
    overrides: dict[str, str],
    batch: int | None,
) -> dict[str, Any]:
    """Drain with cdcsync in a fresh interpreter: its drain time, peak RSS and samples."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "drain.json"
        child = multiprocessing.get_context("spawn").Process(
            target=_drain_child, args=(settings, endpoint, ends, report, overrides, batch)
        )
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"the applier process exited with {child.exitcode}")
        out: dict[str, Any] = json.loads(report.read_text())
    return out


def _drain_child(
    settings: Any,
    endpoint: Endpoint,
    ends: Any,
    report: Path,
    overrides: dict[str, str],
    batch: int | None,
) -> None:
    """Drain with cdcsync, then write its peak RSS to ``report``, with RSS samples
    (events applied, kB) taken every 5 s so a trend shows."""
    with tuned_consumers(overrides, batch):
        _drain(settings, endpoint, ends, report)


class _BatchMetrics(_Unobserved):
    """Records each batch's metrics as the daemon's observer does: that pass over the
    batch's events is part of the applier's work."""

    def batch_applied(
        self,
        direction: str,
        events: Sequence[Event],
        seconds: float,
        nbytes: int = 0,
        *,
        messages: int | None = None,
    ) -> None:
        metrics.record_batch(direction, events, seconds, nbytes, messages=messages)


def _drain(settings: Any, endpoint: Endpoint, ends: Any, report: Path) -> None:
    loop = StreamLoop(settings, endpoint, observer=_BatchMetrics())
    started = time.perf_counter()
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    samples: list[tuple[int, int]] = []
    next_sample = started
    with psycopg.connect(endpoint.target_dsn) as conn:
        while True:
            applied = applied_offsets(conn, "cdcsync", settings.migration_id, "forward")
            conn.rollback()
            if time.perf_counter() >= next_sample:
                samples.append((sum(applied.values()), vm_kb("VmRSS:")))
                next_sample += 5.0
            if not lagging(ends, applied):
                break
            if not thread.is_alive():
                raise SystemExit("the applier stopped before the end of the topics")
            time.sleep(0.05)
    seconds = time.perf_counter() - started
    loop.stop.set()
    thread.join()
    samples.append((sum(ends.values()), vm_kb("VmRSS:")))
    report.write_text(
        json.dumps({"vmhwm_kb": vm_kb("VmHWM:"), "seconds": seconds, "samples": samples})
    )


def check(target: str, expected: dict[str, tuple[int, str]], label: str) -> None:
    with psycopg.connect(target) as conn:
        got = digests_in(conn)
    if got != expected:
        diff = sorted(k for k in expected if got.get(k) != expected[k])
        print(f"!! {label}: target differs from the source in {diff}", flush=True)


if __name__ == "__main__":
    main()
