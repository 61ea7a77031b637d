"""Snapshot benchmark: cdcsync against a raw COPY pipe, pgcopydb and pg_dump | pg_restore.

All four copy the same source database into fresh target databases on the same
clusters in one run; each result is checked against the source by per-table digests.
The raw pipe copies data only (tables created beforehand, no indexes): it is the
ceiling. The last line of output is one JSON object with the medians and ratios.

    python bench/snapshot.py --scale 100 --jsonb-rows 200000 --repeat 3

Needs CDCSYNC_SOURCE_DSN and CDCSYNC_TARGET_DSN (``cdcsync stack env`` prints them).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdcsync.config import load_settings
from cdcsync.snapshot.runner import run_snapshot
from tests.integration.workload import conninfo_env, digests_in

PG_BIN = "/usr/lib/postgresql/15/bin"


def admin(dsn: str, statement: sql.Composed) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement)


def db_dsn(dsn: str, name: str) -> str:
    return psycopg.conninfo.make_conninfo(dsn, dbname=name)


def uri(dsn: str) -> str:
    """pgcopydb wants URIs; the passfile stays a parameter, never a password."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    return (
        f"postgresql://{info.get('user', 'postgres')}@{info['host']}:{info['port']}/"
        f"{info['dbname']}?passfile={info.get('passfile', '')}"
    )


def build_source(dsn: str, scale: int, jsonb_rows: int) -> None:
    subprocess.run(
        [f"{PG_BIN}/pgbench", "-i", "-q", "-s", str(scale)],
        env={**os.environ, **conninfo_env(dsn)},
        check=True,
        capture_output=True,
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY")
        conn.execute("CREATE TABLE docs (id bigint PRIMARY KEY, body jsonb NOT NULL)")
        conn.execute(
            "INSERT INTO docs SELECT g, jsonb_build_object('g', g, 'items', "
            "(SELECT jsonb_agg(jsonb_build_object('sku', md5((g * 31 + i)::text), 'n', i)) "
            "FROM generate_series(1, 40) i)) FROM generate_series(1, %s) g",
            (jsonb_rows,),
        )
        conn.execute("VACUUM ANALYZE")


def tables_of(dsn: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT schemaname, tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    return [(str(s), str(t)) for s, t in rows]


def run_cdcsync(source: str, target: str, workers: int) -> None:
    migration = f"bench_{secrets.token_hex(3)}"
    settings = load_settings(
        source_dsn=source, target_dsn=target, migration_id=migration, workers=workers
    )
    run_snapshot(settings)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (settings.slot_name,))
        conn.execute(
            sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(settings.publication_name))
        )


def run_raw_pipe(source: str, target: str, workers: int) -> None:
    pre = subprocess.run(
        [f"{PG_BIN}/pg_dump", "--section=pre-data", "-d", source],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    subprocess.run(
        [f"{PG_BIN}/psql", "-X", "-q", "-d", target],
        input=pre,
        text=True,
        check=True,
        capture_output=True,
    )
    todo = tables_of(source)
    lock = threading.Lock()

    def work() -> None:
        with psycopg.connect(source) as src, psycopg.connect(target) as tgt:
            while True:
                with lock:
                    if not todo:
                        return
                    schema, name = todo.pop()
                ident = sql.Identifier(schema, name)
                with (
                    src.cursor().copy(
                        sql.SQL("COPY {} TO STDOUT (FORMAT binary)").format(ident)
                    ) as r,
                    tgt.cursor().copy(
                        sql.SQL("COPY {} FROM STDIN (FORMAT binary)").format(ident)
                    ) as w,
                ):
                    for data in r:
                        w.write(data)
                tgt.commit()

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run_pgcopydb(source: str, target: str, workers: int) -> None:
    workdir = Path(f"/tmp/pgcopydb-bench-{secrets.token_hex(3)}")
    subprocess.run(
        [
            "pgcopydb",
            "clone",
            "--source",
            uri(source),
            "--target",
            uri(target),
            "--table-jobs",
            str(workers),
            "--index-jobs",
            str(workers),
            "--dir",
            str(workdir),
            "--no-owner",
            "--no-acl",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(["rm", "-rf", str(workdir)], check=False)


def run_dump_restore(source: str, target: str, workers: int) -> None:
    del workers  # a pipe cannot restore in parallel
    dump = subprocess.Popen([f"{PG_BIN}/pg_dump", "-Fc", "-d", source], stdout=subprocess.PIPE)
    subprocess.run(
        [f"{PG_BIN}/pg_restore", "--no-owner", "-d", target],
        stdin=dump.stdout,
        check=True,
        capture_output=True,
    )
    assert dump.wait() == 0


PEERS: dict[str, Callable[[str, str, int], None]] = {
    "cdcsync": run_cdcsync,
    "raw_copy_pipe": run_raw_pipe,
    "pgcopydb": run_pgcopydb,
    "pg_dump_restore": run_dump_restore,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=10, help="pgbench scale (100 ≈ 1.5 GB)")
    parser.add_argument("--jsonb-rows", type=int, default=20000, help="rows of ~3 KB jsonb")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    source_admin = os.environ["CDCSYNC_SOURCE_DSN"]
    target_admin = os.environ["CDCSYNC_TARGET_DSN"]
    run_id = secrets.token_hex(3)
    src_db = f"bench_src_{run_id}"
    admin(source_admin, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(src_db)))
    source = db_dsn(source_admin, src_db)
    times: dict[str, list[float]] = {name: [] for name in PEERS}
    try:
        build_source(source, args.scale, args.jsonb_rows)
        with psycopg.connect(source) as conn:
            expected = digests_in(conn)
            size = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        print(f"source: {len(expected)} tables, {size[0] / 1e6 if size else 0:.0f} MB", flush=True)
        for round_no in range(args.repeat):
            for name, peer in PEERS.items():
                db = f"bench_{name}_{run_id}_{round_no}"
                admin(target_admin, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
                target = db_dsn(target_admin, db)
                try:
                    started = time.perf_counter()
                    peer(source, target, args.workers)
                    elapsed = time.perf_counter() - started
                    with psycopg.connect(target) as conn:
                        got = digests_in(conn)
                    got.pop("cdcsync.snapshot_chunk", None)
                    if got != expected:
                        raise SystemExit(f"{name}: copy differs from the source")
                    times[name].append(elapsed)
                    print(f"round {round_no + 1} {name:16s} {elapsed:8.2f} s", flush=True)
                finally:
                    admin(
                        target_admin,
                        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                            sql.Identifier(db)
                        ),
                    )
    finally:
        admin(
            source_admin,
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(src_db)),
        )
    medians = {name: statistics.median(v) for name, v in times.items()}
    ratios = {
        "cdcsync_vs_raw_copy_pipe": medians["raw_copy_pipe"] / medians["cdcsync"],
        "cdcsync_vs_pgcopydb": medians["pgcopydb"] / medians["cdcsync"],
        "cdcsync_vs_pg_dump_restore": medians["pg_dump_restore"] / medians["cdcsync"],
    }
    for name, value in medians.items():
        print(f"median {name:16s} {value:8.2f} s")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x (>1 means cdcsync is faster)")
    print(
        json.dumps(
            {
                "scale": args.scale,
                "jsonb_rows": args.jsonb_rows,
                "workers": args.workers,
                "medians_s": medians,
                "ratios": ratios,
            }
        )
    )


if __name__ == "__main__":
    main()
