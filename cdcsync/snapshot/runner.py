"""``cdcsync snapshot``: preflight, pre-data schema, boundary, parallel COPY, post-data, fence.

Chunks are ctid ranges (every heap table has them, with or without a key; PostgreSQL
scans a TID range directly), copied in binary form by ``workers`` threads, each of
which imported the exported snapshot before the replication connection was released.
A chunk's completion is recorded in the same target transaction as its rows. A
crash loses the exported snapshot, so a re-run restarts cleanly: it drops the slot,
the publication and the partial copy, and begins again — never a duplicated row.
"""

from __future__ import annotations

import json
import logging
import queue
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from cdcsync.adapters import fence
from cdcsync.adapters.pg import connect
from cdcsync.adapters.state_store import ensure_schema
from cdcsync.config import Settings
from cdcsync.core.events import TableId
from cdcsync.errors import PreconditionError
from cdcsync.snapshot.boundary import create_publication, create_slot, import_snapshot

log = logging.getLogger("cdcsync.snapshot")

BLOCKS_PER_CHUNK = 4096  # 32 MiB of heap per chunk
_PG_BIN = "/usr/lib/postgresql/15/bin"


@dataclass
class Chunk:
    table: TableId
    number: int
    first_block: int
    end_block: int | None  # None: to the end of the table


@dataclass
class SnapshotResult:
    tables: list[TableId]
    consistent_point: str
    rows: int = 0
    bytes: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def list_tables(conn: psycopg.Connection[Any], settings: Settings) -> list[TableId]:
    """Migrated tables: every ordinary or partitioned root table in scope."""
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND n.nspname NOT LIKE 'pg_toast%%' AND n.nspname NOT LIKE 'pg_temp%%'
          AND n.nspname <> %s
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
        ORDER BY 1, 2
        """,
        (settings.state_schema,),
    ).fetchall()
    tables = [TableId(str(s), str(t)) for s, t in rows]
    if settings.schemas:
        tables = [t for t in tables if t.schema in settings.schemas]
    if settings.tables:
        wanted = set(settings.tables)
        tables = [t for t in tables if str(t) in wanted]
    return tables


def preflight(
    source: psycopg.Connection[Any],
    target: psycopg.Connection[Any],
    settings: Settings,
    tables: list[TableId],
    *,
    allow_nonempty: bool,
) -> None:
    """Check everything first; change nothing when any check fails."""
    problems: list[str] = []
    level = source.execute("SHOW wal_level").fetchone()
    if not level or level[0] != "logical":
        problems.append(
            f"source wal_level is {level[0] if level else '?'}: run ALTER SYSTEM SET "
            "wal_level = logical; and restart the source"
        )
    role = source.execute(
        "SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    if not role or not role[0]:
        problems.append(
            "the source role lacks REPLICATION: ALTER ROLE <role> REPLICATION; (or use a superuser)"
        )
    for table in tables:
        ok = source.execute(
            "SELECT has_table_privilege(format('%%I.%%I', %s::text, %s::text), 'SELECT')",
            (table.schema, table.name),
        ).fetchone()
        if not ok or not ok[0]:
            problems.append(f"no SELECT privilege on source table {table}")
    if source.execute(
        "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (settings.slot_name,)
    ).fetchone():
        problems.append(
            f"replication slot {settings.slot_name} already exists on the source: choose another "
            "CDCSYNC_MIGRATION_ID, or drop it if it is a leftover"
        )
    if source.execute(
        "SELECT 1 FROM pg_publication WHERE pubname = %s", (settings.publication_name,)
    ).fetchone():
        problems.append(f"publication {settings.publication_name} already exists on the source")
    if not tables:
        problems.append("no table to migrate in the chosen schemas/tables")
    if not allow_nonempty:
        for table in tables:
            if _exists(target, table.schema, table.name):
                has_rows = target.execute(
                    sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(
                        sql.Identifier(table.schema, table.name)
                    )
                ).fetchone()
                if has_rows and has_rows[0]:
                    problems.append(
                        f"target table {table} is not empty (pass --allow-nonempty-target to "
                        "overwrite it)"
                    )
    source.rollback()
    target.rollback()
    if problems:
        raise PreconditionError("snapshot preflight failed:\n  - " + "\n  - ".join(problems))


def _dump_section(source_dsn: str, section: str, tables: list[TableId]) -> str:
    argv = [
        f"{_PG_BIN}/pg_dump",
        "--section",
        section,
        "--no-owner",
        "--no-privileges",
        "--no-publications",
        "--no-subscriptions",
        "-d",
        source_dsn,
    ]
    with psycopg.connect(source_dsn) as conn:
        everything = [leaf for t in tables for leaf in {t, *_leaves(conn, t)}]
    for table in sorted(everything):
        argv += ["-t", _dump_pattern(table)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise PreconditionError(f"pg_dump --section={section} failed: {done.stderr.strip()[:2000]}")
    return done.stdout


def _dump_pattern(table: TableId) -> str:
    # pg_dump patterns: double quotes make names literal (and case-sensitive).
    def q(name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    return f"{q(table.schema)}.{q(table.name)}"


def _run_sql_script(dsn: str, script: str, what: str) -> None:
    done = subprocess.run(
        [f"{_PG_BIN}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn],
        input=script,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise PreconditionError(f"{what} failed on the target: {done.stderr.strip()[:2000]}")


def _pre_data(
    source_dsn: str, target_dsn: str, tables: list[TableId], target: psycopg.Connection[Any]
) -> None:
    """Types, sequences and tables, unless the operator created the schema already."""
    missing = []
    for table in tables:
        if not _exists(target, table.schema, table.name):
            missing.append(table)
    target.rollback()
    if not missing:
        return
    if len(missing) != len(tables):
        raise PreconditionError(
            "the target has some migrated tables but not others "
            f"({', '.join(map(str, missing[:5]))} missing): create all or none"
        )
    # pg_dump -t with schemas that do not exist on the target: create the schemas first.
    script = _dump_section(source_dsn, "pre-data", tables)
    schemas = sorted({t.schema for t in tables})
    header = "".join(
        f'CREATE SCHEMA IF NOT EXISTS "{s.replace(chr(34), chr(34) * 2)}";\n' for s in schemas
    )
    types = _dump_types(source_dsn, schemas)
    _run_sql_script(target_dsn, header + types + script, "pre-data schema")


def _dump_types(source_dsn: str, schemas: list[str]) -> str:
    """Enums, domains and other types the tables use (pg_dump -t leaves them out)."""
    argv = [
        f"{_PG_BIN}/pg_dump",
        "--section",
        "pre-data",
        "--no-owner",
        "--no-privileges",
        "-d",
        source_dsn,
        "--exclude-table=*.*",
    ]
    for schema in schemas:
        argv += ["-n", '"' + schema.replace('"', '""') + '"']
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise PreconditionError(f"pg_dump of types failed: {done.stderr.strip()[:2000]}")
    keep = []
    for stmt in done.stdout.split(";\n"):
        body = "\n".join(
            line for line in stmt.splitlines() if line.strip() and not line.startswith("--")
        )
        if body.startswith(("CREATE TYPE", "CREATE DOMAIN", "ALTER DOMAIN")):
            keep.append(body + ";\n")
        if body.startswith("CREATE EXTENSION"):
            keep.append(body.replace("CREATE EXTENSION", "CREATE EXTENSION IF NOT EXISTS") + ";\n")
    return "".join(keep)


def _exists(conn: psycopg.Connection[Any], schema: str, name: str) -> bool:
    row = conn.execute(
        "SELECT to_regclass(format('%%I.%%I', %s::text, %s::text)) IS NOT NULL", (schema, name)
    ).fetchone()
    return bool(row and row[0])


def _columns(conn: psycopg.Connection[Any], table: TableId) -> list[str]:
    rows = conn.execute(
        "SELECT a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s "
        "AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum",
        (table.schema, table.name),
    ).fetchall()
    return [str(r[0]) for r in rows]


def _leaves(conn: psycopg.Connection[Any], table: TableId) -> list[TableId]:
    """A partitioned table's leaf partitions (COPY reads heaps), or the table itself."""
    rows = conn.execute(
        "SELECT n.nspname, c.relname "
        "FROM pg_partition_tree(format('%%I.%%I', %s::text, %s::text)) p "
        "JOIN pg_class c ON c.oid = p.relid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE p.isleaf",
        (table.schema, table.name),
    ).fetchall()
    return [TableId(str(s), str(t)) for s, t in rows] or [table]


def plan_chunks(
    conn: psycopg.Connection[Any], tables: list[TableId], blocks_per_chunk: int = BLOCKS_PER_CHUNK
) -> list[Chunk]:
    """Split each heap into block ranges; the last range of a table is open-ended."""
    chunks: list[Chunk] = []
    for table in tables:
        for leaf in _leaves(conn, table):
            row = conn.execute(
                "SELECT pg_relation_size(format('%%I.%%I', %s::text, %s::text)) / "
                "current_setting('block_size')::int",
                (leaf.schema, leaf.name),
            ).fetchone()
            blocks = int(row[0]) if row else 0
            starts = list(range(0, max(blocks, 1), blocks_per_chunk))
            for i, start in enumerate(starts):
                end = starts[i + 1] if i + 1 < len(starts) else None
                chunks.append(Chunk(leaf, i, start, end))
    return chunks


def _copy_chunk(
    src: psycopg.Connection[Any],
    tgt: psycopg.Connection[Any],
    chunk: Chunk,
    migration_id: str,
    schema: str,
) -> tuple[int, int]:
    columns = _columns(src, chunk.table)
    cols = sql.SQL(", ").join(map(sql.Identifier, columns))
    where = sql.SQL("ctid >= {}::tid").format(sql.Literal(f"({chunk.first_block},0)"))
    if chunk.end_block is not None:
        where = sql.SQL("{} AND ctid < {}::tid").format(
            where, sql.Literal(f"({chunk.end_block},0)")
        )
    out_sql = sql.SQL("COPY (SELECT {} FROM ONLY {} WHERE {}) TO STDOUT (FORMAT binary)").format(
        cols, sql.Identifier(chunk.table.schema, chunk.table.name), where
    )
    in_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(
        sql.Identifier(chunk.table.schema, chunk.table.name), cols
    )
    size = 0
    with tgt.transaction():
        tcur = tgt.cursor()
        with src.cursor().copy(out_sql) as reader, tcur.copy(in_sql) as writer:
            for data in reader:
                size += len(data)
                writer.write(data)
        count = max(tcur.rowcount, 0)
        tgt.execute(
            sql.SQL(
                "INSERT INTO {}.snapshot_chunk (migration_id, table_schema, table_name, chunk_no, "
                "rows_copied, bytes_copied) VALUES (%s, %s, %s, %s, %s, %s)"
            ).format(sql.Identifier(schema)),
            (migration_id, chunk.table.schema, chunk.table.name, chunk.number, count, size),
        )
    return count, size


def _copy_sequences(src: psycopg.Connection[Any], tgt: psycopg.Connection[Any]) -> int:
    rows = src.execute(
        "SELECT schemaname, sequencename, last_value FROM pg_sequences WHERE last_value IS NOT NULL"
    ).fetchall()
    with tgt.transaction():
        for schema, name, value in rows:
            if _exists(tgt, schema, name):
                tgt.execute(
                    "SELECT setval(format('%%I.%%I', %s::text, %s::text), %s, true)",
                    (schema, name, value),
                )
    return len(rows)


def _cleanup_previous(
    source: psycopg.Connection[Any],
    target: psycopg.Connection[Any],
    settings: Settings,
    tables: list[TableId],
) -> None:
    """Undo an interrupted snapshot: its exported snapshot died with its process."""
    state = migration_state(target, settings)
    if state is None or state[0] != "snapshotting":
        return
    log.warning("previous snapshot was interrupted: restarting it cleanly")
    source.autocommit = True
    source.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
        "WHERE slot_name = %s AND NOT active",
        (settings.slot_name,),
    )
    source.execute(
        sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(settings.publication_name))
    )
    source.autocommit = False
    with target.transaction():
        for table in tables:
            if _exists(target, table.schema, table.name):
                target.execute(
                    sql.SQL("TRUNCATE {}").format(sql.Identifier(table.schema, table.name))
                )
        target.execute(
            sql.SQL("DELETE FROM {}.snapshot_chunk WHERE migration_id = %s").format(
                sql.Identifier(settings.state_schema)
            ),
            (settings.migration_id,),
        )


def _set_phase(
    target: psycopg.Connection[Any], settings: Settings, phase: str, **data: Any
) -> None:
    s = sql.Identifier(settings.state_schema)
    with target.transaction():
        target.execute(
            sql.SQL(
                "INSERT INTO {}.migration (migration_id, phase, slot_name, publication_name, data) "
                "VALUES (%s, %s, %s, %s, %s::jsonb) ON CONFLICT (migration_id) DO UPDATE SET "
                "phase = EXCLUDED.phase, data = {}.migration.data || EXCLUDED.data, "
                "updated_at = now()"
            ).format(s, s),
            (
                settings.migration_id,
                phase,
                settings.slot_name,
                settings.publication_name,
                json.dumps(data),
            ),
        )
        if "consistent_point" in data:
            target.execute(
                sql.SQL(
                    "UPDATE {}.migration SET consistent_point = %s::pg_lsn, snapshot_name = %s "
                    "WHERE migration_id = %s"
                ).format(s),
                (data["consistent_point"], data.get("snapshot_name"), settings.migration_id),
            )


def migration_state(
    target: psycopg.Connection[Any], settings: Settings
) -> tuple[str, dict[str, Any]] | None:
    ensure_schema(target, settings.state_schema)
    row = target.execute(
        sql.SQL("SELECT phase, data FROM {}.migration WHERE migration_id = %s").format(
            sql.Identifier(settings.state_schema)
        ),
        (settings.migration_id,),
    ).fetchone()
    target.rollback()
    return (str(row[0]), dict(row[1])) if row else None


def run_snapshot(
    settings: Settings,
    *,
    allow_nonempty: bool = False,
    on_boundary: Callable[[str], None] | None = None,
) -> SnapshotResult:
    """The whole snapshot phase; returns what it copied and how long each step took."""
    settings.require("source_dsn", "target_dsn")
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    source = connect(settings.source_conninfo(), "source")
    target = connect(settings.target_conninfo(), "target")
    try:
        ensure_schema(target, settings.state_schema)
        target.commit()
        tables = list_tables(source, settings)
        source.rollback()
        _cleanup_previous(source, target, settings, tables)
        preflight(source, target, settings, tables, allow_nonempty=allow_nonempty)
        _pre_data(settings.source_conninfo(), settings.target_conninfo(), tables, target)
        timings["pre_data"] = time.monotonic() - t0
        _set_phase(target, settings, "snapshotting", tables=[[t.schema, t.name] for t in tables])

        source.autocommit = True
        create_publication(source, settings.publication_name, tables)
        t1 = time.monotonic()
        boundary = create_slot(settings.source_conninfo(), settings.slot_name)
        workers = max(1, settings.workers)
        sources = [psycopg.connect(settings.source_conninfo()) for _ in range(workers)]
        for conn in sources:
            import_snapshot(conn, boundary.snapshot_name)
        if on_boundary is not None:
            on_boundary(boundary.snapshot_name)  # verification hook: import it too
        boundary.release()  # every worker holds the snapshot now
        _set_phase(
            target,
            settings,
            "snapshotting",
            consistent_point=boundary.consistent_point,
            snapshot_name=boundary.snapshot_name,
        )
        timings["boundary"] = time.monotonic() - t1

        t2 = time.monotonic()
        # Sized outside the snapshot transactions: those hold a lock on every table they
        # touch until they end, and a lock on all of them would deadlock a concurrent
        # TRUNCATE queued behind it with the workers queued behind that.
        with psycopg.connect(settings.source_conninfo(), autocommit=True) as sizing:
            chunks = plan_chunks(sizing, tables, settings.snapshot_chunk_blocks)
        todo: queue.Queue[Chunk] = queue.Queue()
        for chunk in sorted(chunks, key=lambda c: -(c.end_block or 10**9)):
            todo.put(chunk)
        totals = {"rows": 0, "bytes": 0}
        errors: list[BaseException] = []
        lock = threading.Lock()

        def work(src: psycopg.Connection[Any]) -> None:
            tgt = psycopg.connect(settings.target_conninfo())
            tgt.execute("SET session_replication_role = replica")
            tgt.commit()
            try:
                while not errors:
                    try:
                        chunk = todo.get_nowait()
                    except queue.Empty:
                        # Done: end the snapshot transaction now so its table locks do not
                        # hold up a writer (and the workers queued behind that writer).
                        src.commit()
                        return
                    rows, size = _copy_chunk(
                        src, tgt, chunk, settings.migration_id, settings.state_schema
                    )
                    with lock:
                        totals["rows"] += rows
                        totals["bytes"] += size
                    log.info("copied %s chunk %d: %d rows", chunk.table, chunk.number, rows)
            except BaseException as exc:  # surfaced below, after every worker stops
                errors.append(exc)
            finally:
                tgt.close()

        threads = [threading.Thread(target=work, args=(src,)) for src in sources]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        with psycopg.connect(settings.source_conninfo()) as seq_conn:
            seqs = _copy_sequences(seq_conn, target)
        for conn in sources:
            conn.close()
        timings["copy"] = time.monotonic() - t2

        t3 = time.monotonic()
        post = _dump_section(settings.source_conninfo(), "post-data", tables)
        if post.strip():
            _run_sql_script(settings.target_conninfo(), post, "post-data (indexes, constraints)")
        timings["post_data"] = time.monotonic() - t3
        fence.install(target, tables, settings.migration_id, schema=settings.state_schema)
        _set_phase(
            target,
            settings,
            "snapshotted",
            rows=totals["rows"],
            bytes=totals["bytes"],
            sequences=seqs,
            timings=timings,
        )
        timings["total"] = time.monotonic() - t0
        return SnapshotResult(
            tables, boundary.consistent_point, totals["rows"], totals["bytes"], timings
        )
    finally:
        source.close()
        target.close()
