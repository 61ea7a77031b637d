"""Scale-out benchmark: one backlog drained by one, then by two cdcsync processes.

The source workload (pgbench plus an insert-heavy table) is captured by Debezium into
topics of ``--partitions`` partitions (the connector is then removed). Each round
restores a fresh target and starts N applier processes in one consumer group, each a
``StreamLoop`` with its own instance id, held paused until the group is stable with
every process assigned; the time runs from then until every partition's stored offset
reaches its end, and the result is checked
against the source by per-table digests. On this machine's two cores the broker,
PostgreSQL and the appliers share the CPU: the ratio says what a second process buys
here, not on a larger host. The last line is one JSON object.

    python bench/scale_out.py --scale 10 --transactions 20000 --inserts 200000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.apply import admin, check, drop, fresh_target, prepare_source, run_workload
from cdcsync.adapters.connect_rest import ConnectClient
from cdcsync.adapters.debezium_connector import source_connector_config
from cdcsync.adapters.state_store import ensure_schema
from cdcsync.config import load_settings
from cdcsync.engine.drain import applied_offsets, connector_lsn, end_offsets, lagging
from cdcsync.engine.stream import Endpoint, StreamLoop, _Unobserved
from cdcsync.engine.switch import ensure_topics


class _Gate(_Unobserved):
    """Holds the applier (paused, in the group) until the parent says go."""

    def __init__(self, go: Any) -> None:
        self.go = go

    def paused(self, direction: str | None = None) -> str | None:
        return None if self.go.is_set() else "waiting for the group to settle"


def _applier(settings: Any, endpoint: Endpoint, go: Any, stop: Any) -> None:
    """One applier process: join the group, apply from ``go`` until ``stop``."""
    loop = StreamLoop(settings, endpoint, observer=_Gate(go))
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    stop.wait()
    loop.stop.set()
    thread.join(timeout=60)


def drain_with(processes: int, settings: Any, endpoint: Endpoint, ends: Any) -> float:
    """Seconds from "go" (every process in the group, assigned) until all is applied."""
    ctx = multiprocessing.get_context("spawn")
    go, stop = ctx.Event(), ctx.Event()
    children = [
        ctx.Process(
            target=_applier,
            args=(
                settings.model_copy(update={"instance_id": f"{settings.migration_id}-{i}"}),
                endpoint,
                go,
                stop,
            ),
        )
        for i in range(processes)
    ]
    for child in children:
        child.start()
    try:
        _settled(settings.kafka_bootstrap, f"cdcsync-{settings.migration_id}-forward", processes)
        go.set()
        first = time.perf_counter()
        with psycopg.connect(endpoint.target_dsn) as conn:
            while True:
                applied = applied_offsets(conn, "cdcsync", settings.migration_id, "forward")
                conn.rollback()
                if not lagging(ends, applied):
                    break
                if any(not c.is_alive() for c in children):
                    raise SystemExit("an applier process died")
                time.sleep(0.02)
        return time.perf_counter() - first
    finally:
        stop.set()
        for child in children:
            child.join(timeout=90)


def _settled(bootstrap: str, group: str, members: int, timeout: float = 120) -> None:
    """Until ``group`` is stable with ``members`` members, each holding partitions."""
    from confluent_kafka import ConsumerGroupState
    from confluent_kafka.admin import AdminClient

    admin_client = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        desc = admin_client.describe_consumer_groups([group])[group].result(timeout=10)
        if (
            desc.state == ConsumerGroupState.STABLE
            and len(desc.members) == members
            and all(m.assignment.topic_partitions for m in desc.members)
        ):
            return
        time.sleep(0.5)
    raise SystemExit(f"consumer group {group} did not settle with {members} members")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=2, help="pgbench scale of the source")
    parser.add_argument("--transactions", type=int, default=5000, help="per pgbench client")
    parser.add_argument("--inserts", type=int, default=50000, help="rows of the insert table")
    parser.add_argument("--partitions", type=int, default=4, help="partitions per table topic")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    env = os.environ
    source_admin, target_admin = env["CDCSYNC_SOURCE_DSN"], env["CDCSYNC_TARGET_DSN"]
    bootstrap, connect_url = env["CDCSYNC_KAFKA_BOOTSTRAP"], env["CDCSYNC_CONNECT_URL"]
    run = secrets.token_hex(3)
    prefix = f"scale{run}"
    src_db = f"scale_src_{run}"
    admin(source_admin, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(src_db)))
    source = psycopg.conninfo.make_conninfo(source_admin, dbname=src_db)
    settings = load_settings(
        source_dsn=source,
        target_dsn=target_admin,
        kafka_bootstrap=bootstrap,
        connect_url=connect_url,
        migration_id=prefix,
        connect_secrets_file=env["CDCSYNC_CONNECT_SECRETS_FILE"],
    )
    client = ConnectClient(connect_url)
    dump = Path(tempfile.mkdtemp()) / "base.dump"
    results: dict[str, list[float]] = {}
    created: list[str] = []
    try:
        tables = prepare_source(source, settings, args.scale, dump, [settings.slot_name])
        end_lsn, expected = run_workload(source, args.transactions, args.inserts)
        ensure_topics(bootstrap, prefix, tables, partitions=args.partitions)
        name = f"{prefix}-source"
        client.put_config(name, source_connector_config(settings, tables, dsn=source))
        client.wait_running(name, timeout=120)
        t0 = time.monotonic()
        while (connector_lsn(client, name) or 0) < end_lsn:
            time.sleep(0.5)
            if time.monotonic() - t0 > 1800:
                raise SystemExit("Debezium did not catch up")
        client.delete(name)
        ends = end_offsets(bootstrap, prefix)
        events = sum(ends.values())
        print(f"{events} events in {len(ends)} partitions", flush=True)
        for round_no in range(args.repeat):
            for processes in (1, 2):
                db = f"scale_t{processes}_{run}_{round_no}"
                created.append(db)
                target = fresh_target(target_admin, dump, db)
                with psycopg.connect(target, autocommit=True) as conn:
                    ensure_schema(conn)
                mig = f"{prefix}_p{processes}_r{round_no}"
                s = settings.model_copy(update={"migration_id": mig, "target_dsn": target})
                endpoint = Endpoint("forward", prefix, target, source, set(tables))
                seconds = drain_with(processes, s, endpoint, ends)
                label = f"processes_{processes}"
                results.setdefault(label, []).append(seconds)
                print(f"{label}: {seconds:.2f} s ({events / seconds:.0f} events/s)", flush=True)
                check(target, expected, label)
    finally:
        for db in created:
            drop(target_admin, db)
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
    print(
        json.dumps(
            {
                "events": events,
                "partitions": args.partitions,
                "cores": os.cpu_count(),
                "medians_s": medians,
                "events_per_s": {k: events / v for k, v in medians.items()},
                "speedup_2_vs_1": medians["processes_1"] / medians["processes_2"],
            }
        )
    )


if __name__ == "__main__":
    main()
