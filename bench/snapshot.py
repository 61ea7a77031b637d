"""Snapshot benchmark: cdcsync beside a raw COPY pipe, pgcopydb clone and pg_dump | pg_restore.

All four copy the same source database (pgbench tables plus a table of 2–8 KB jsonb
documents) into fresh target databases on the same two clusters, in one run, round
after round; each copy is checked against the source by per-table digests before its
time counts. Printed: every time, the medians, and the ratios (peer time / cdcsync
time, so above 1 means cdcsync is faster). The last line is one JSON object.

* cdcsync: ``run_snapshot`` — pre-data, slot with exported snapshot, parallel binary
  COPY by key ranges, sequences, indexes and constraints, write fence.
* raw_copy_pipe: the floor for the same work without bookkeeping — ``pg_dump
  --section=pre-data | psql``, then ``psql -c 'COPY … TO STDOUT' | psql -c 'COPY … FROM
  STDIN'`` (binary, C on both ends) over the same chunk sizes with the same number of
  parallel pipes, then ``pg_dump --section=post-data | psql``. Its data phase alone is
  compared with cdcsync's copy phase as well.
* pgcopydb: ``pgcopydb clone`` (0.10, Debian) with the same table, index and
  same-table concurrency.
* pg_dump_restore: ``pg_dump -Fc | pg_restore`` (a pipe cannot restore in parallel).

    python bench/snapshot.py --scale 100 --jsonb-rows 200000 --repeat 3

Needs CDCSYNC_SOURCE_DSN and CDCSYNC_TARGET_DSN (``cdcsync stack env`` prints them);
creates and drops its own databases there.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdcsync.config import load_settings
from cdcsync.snapshot.chunking import block_ranges, chunk_bytes, pieces_for
from cdcsync.snapshot.progress import Progress
from cdcsync.snapshot.runner import run_snapshot
from cdcsync.snapshot.schema_copy import client_env, pg_bin
from tests.integration.workload import conninfo_env, digests_in


@dataclass
class Run:
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)


def admin(dsn: str, statement: sql.Composed) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement)


def db_dsn(dsn: str, name: str) -> str:
    return psycopg.conninfo.make_conninfo(dsn, dbname=name)


def uri(dsn: str) -> str:
    """pgcopydb wants URIs; the passfile stays a parameter, never a password."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    query = f"?passfile={info['passfile']}" if info.get("passfile") else ""
    return (
        f"postgresql://{info.get('user', 'postgres')}@{info.get('host', '127.0.0.1')}:"
        f"{info.get('port', 5432)}/{info['dbname']}{query}"
    )


def build_source(dsn: str, scale: int, jsonb_rows: int) -> None:
    subprocess.run(
        [pg_bin("pgbench"), "-i", "-q", "-s", str(scale), "--foreign-keys"],
        env={**os.environ, **conninfo_env(dsn)},
        check=True,
        capture_output=True,
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        # pgbench_history has no key; a migration needs its updates streamed.
        conn.execute("ALTER TABLE pgbench_history REPLICA IDENTITY FULL")
        conn.execute("CREATE TABLE docs (id bigint PRIMARY KEY, body jsonb NOT NULL)")
        # 30 to 120 items of ~60 bytes: documents of 2 to 8 KB.
        conn.execute(
            "INSERT INTO docs SELECT g, jsonb_build_object('g', g, 'items', "
            "(SELECT jsonb_agg(jsonb_build_object('sku', md5((g * 131 + i)::text), 'n', i, "
            "'note', left(md5(i::text), 8))) FROM generate_series(1, 30 + g %% 91) i)) "
            "FROM generate_series(1, %s) g",
            (jsonb_rows,),
        )
        conn.execute("VACUUM ANALYZE")


def run_cdcsync(source: str, target: str, workers: int, chunk_blocks: int) -> Run:
    migration = f"bench_{secrets.token_hex(3)}"
    settings = load_settings(
        source_dsn=source,
        target_dsn=target,
        migration_id=migration,
        workers=workers,
        snapshot_chunk_blocks=chunk_blocks,
    )
    started = time.perf_counter()
    result = run_snapshot(settings, progress=Progress("quiet"))
    elapsed = time.perf_counter() - started
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (settings.slot_name,))
        conn.execute(
            sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(settings.publication_name))
        )
    steps = {k: v for k, v in result.timings.items() if k not in ("copy", "total")}
    return Run(elapsed, {"data": result.timings.get("copy", 0.0), **steps})


def _psql(
    dsn: str, *args: str, stdin: IO[bytes] | int | None = None, stdout: int | None = None
) -> subprocess.Popen[bytes]:
    conninfo, env = client_env(dsn)
    return subprocess.Popen(
        [pg_bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", *args, "-d", conninfo],
        stdin=stdin,
        stdout=stdout,
        env=env,
    )


def _section(source: str, target: str, section: str) -> None:
    conninfo, env = client_env(source)
    dump = subprocess.Popen(
        [pg_bin("pg_dump"), f"--section={section}", "-d", conninfo],
        stdout=subprocess.PIPE,
        env=env,
    )
    restore = _psql(target, stdin=dump.stdout, stdout=subprocess.DEVNULL)
    assert dump.stdout is not None
    dump.stdout.close()
    if restore.wait() != 0 or dump.wait() != 0:
        raise SystemExit(f"raw pipe: {section} failed")


def run_raw_pipe(source: str, target: str, workers: int, chunk_blocks: int) -> Run:
    started = time.perf_counter()
    _section(source, target, "pre-data")
    pre = time.perf_counter()
    with psycopg.connect(source) as conn:
        rows = conn.execute(
            "SELECT schemaname, tablename, pg_relation_size(c.oid) / 8192, pg_table_size(c.oid) "
            "FROM pg_tables t JOIN pg_class c ON c.oid = format('%I.%I', schemaname, "
            "tablename)::regclass WHERE schemaname = 'public'"
        ).fetchall()
    # The same chunk sizes as cdcsync plans, cut by block ranges.
    size = chunk_bytes(sum(int(r[3]) for r in rows), workers, chunk_blocks * 8192)
    pieces: list[tuple[sql.Composed, sql.Identifier]] = []
    for schema, name, blocks, nbytes in rows:
        rel = sql.Identifier(schema, name)
        for lo, hi in block_ranges(int(blocks), pieces_for(int(nbytes), size)):
            where = [
                sql.SQL(op).format(sql.Literal(f"({bound},0)"))
                for op, bound in (("ctid >= {}::tid", lo), ("ctid < {}::tid", hi))
                if bound is not None
            ]
            query = sql.SQL("SELECT * FROM ONLY {}").format(rel)
            if where:
                query = sql.SQL("{} WHERE {}").format(query, sql.SQL(" AND ").join(where))
            pieces.append((query, rel))
    lock = threading.Lock()
    failures: list[str] = []

    def work() -> None:
        while True:
            with lock:
                if not pieces:
                    return
                query, rel = pieces.pop()
            out = sql.SQL("COPY ({}) TO STDOUT (FORMAT binary)").format(query).as_string(None)
            into = sql.SQL("COPY {} FROM STDIN (FORMAT binary)").format(rel).as_string(None)
            reader = _psql(source, "-c", out, stdout=subprocess.PIPE)
            writer = _psql(target, "-c", into, stdin=reader.stdout, stdout=subprocess.DEVNULL)
            assert reader.stdout is not None
            reader.stdout.close()
            if writer.wait() != 0 or reader.wait() != 0:
                with lock:
                    failures.append(out)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise SystemExit(f"raw pipe failed: {failures[:3]}")
    data = time.perf_counter() - pre
    _section(source, target, "post-data")
    return Run(time.perf_counter() - started, {"data": data})


def run_pgcopydb(source: str, target: str, workers: int, chunk_blocks: int) -> Run:
    workdir = Path(tempfile.mkdtemp(prefix="pgcopydb-bench-"))
    started = time.perf_counter()
    done = subprocess.run(
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
            "--split-tables-larger-than",
            f"{chunk_blocks * 8}kB",
            "--dir",
            str(workdir / "work"),
            "--no-owner",
            "--no-acl",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    shutil.rmtree(workdir, ignore_errors=True)
    if done.returncode != 0:
        raise SystemExit(f"pgcopydb failed: {done.stderr[-2000:]}")
    return Run(elapsed)


def run_dump_restore(source: str, target: str, workers: int, chunk_blocks: int) -> Run:
    del workers, chunk_blocks  # a pipe cannot restore in parallel
    started = time.perf_counter()
    src_info, src_env = client_env(source)
    tgt_info, tgt_env = client_env(target)
    dump = subprocess.Popen(
        [pg_bin("pg_dump"), "-Fc", "-d", src_info], stdout=subprocess.PIPE, env=src_env
    )
    restore = subprocess.run(
        [pg_bin("pg_restore"), "--no-owner", "--exit-on-error", "-d", tgt_info],
        stdin=dump.stdout,
        capture_output=True,
        env=tgt_env,
        check=False,
    )
    if dump.wait() != 0 or restore.returncode != 0:
        raise SystemExit(f"pg_dump | pg_restore failed: {restore.stderr[-2000:]!r}")
    return Run(time.perf_counter() - started)


PEERS: dict[str, Callable[[str, str, int, int], Run]] = {
    "cdcsync": run_cdcsync,
    "raw_copy_pipe": run_raw_pipe,
    "pgcopydb": run_pgcopydb,
    "pg_dump_restore": run_dump_restore,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--scale", type=int, default=10, help="pgbench scale (100 ≈ 1.5 GB)")
    parser.add_argument("--jsonb-rows", type=int, default=20000, help="rows of 2–8 KB jsonb")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument(
        "--chunk-blocks", type=int, default=4096, help="8 KiB blocks per chunk (all peers)"
    )
    parser.add_argument("--only", nargs="*", choices=list(PEERS), help="run only these peers")
    args = parser.parse_args()
    source_admin = os.environ["CDCSYNC_SOURCE_DSN"]
    target_admin = os.environ["CDCSYNC_TARGET_DSN"]
    peers = {name: PEERS[name] for name in (args.only or PEERS)}
    run_id = secrets.token_hex(3)
    src_db = f"bench_src_{run_id}"
    admin(source_admin, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(src_db)))
    source = db_dsn(source_admin, src_db)
    runs: dict[str, list[Run]] = {name: [] for name in peers}
    try:
        build_source(source, args.scale, args.jsonb_rows)
        with psycopg.connect(source) as conn:
            expected = digests_in(conn)
            size = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        mb = size[0] / 1e6 if size else 0.0
        print(f"source: {len(expected)} tables, {mb:.0f} MB; workers={args.workers}", flush=True)
        for round_no in range(args.repeat):
            for name, peer in peers.items():
                db = f"bench_{name}_{run_id}_{round_no}"
                admin(target_admin, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
                target = db_dsn(target_admin, db)
                try:
                    run = peer(source, target, args.workers, args.chunk_blocks)
                    with psycopg.connect(target) as conn:
                        got = digests_in(conn)
                    if got != expected:
                        bad = sorted(
                            k for k in set(got) | set(expected) if got.get(k) != expected.get(k)
                        )
                        raise SystemExit(f"{name}: copy differs from the source in {bad}")
                    runs[name].append(run)
                    phases = " ".join(f"{k}={v:.2f}s" for k, v in run.phases.items())
                    print(
                        f"round {round_no + 1} {name:16s} {run.seconds:8.2f} s  {phases}",
                        flush=True,
                    )
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
    medians = {name: statistics.median(r.seconds for r in v) for name, v in runs.items()}
    data_medians = {
        name: statistics.median(r.phases["data"] for r in v)
        for name, v in runs.items()
        if v and "data" in v[0].phases
    }
    ratios = {
        f"cdcsync_vs_{name}": medians[name] / medians["cdcsync"]
        for name in medians
        if name != "cdcsync" and "cdcsync" in medians
    }
    if {"cdcsync", "raw_copy_pipe"} <= data_medians.keys():
        ratios["cdcsync_copy_phase_vs_raw_copy_pipe_data_phase"] = (
            data_medians["raw_copy_pipe"] / data_medians["cdcsync"]
        )
    for name, value in medians.items():
        print(f"median {name:16s} {value:8.2f} s")
    for name, value in data_medians.items():
        print(f"median data phase {name:16s} {value:8.2f} s")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x (above 1: cdcsync is faster)")
    print(
        json.dumps(
            {
                "scale": args.scale,
                "jsonb_rows": args.jsonb_rows,
                "source_mb": round(mb),
                "workers": args.workers,
                "chunk_blocks": args.chunk_blocks,
                "repeat": args.repeat,
                "medians_s": medians,
                "data_phase_medians_s": data_medians,
                "ratios": ratios,
            }
        )
    )


if __name__ == "__main__":
    main()
