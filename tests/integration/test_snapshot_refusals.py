"""Bad input: each refusal names what to fix, and nothing changes on either side."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdcsync.config import load_settings
from cdcsync.core.events import TableId
from cdcsync.snapshot import catalog, preflight, schema_copy
from cdcsync.stack.local import LocalStack

pytestmark = pytest.mark.stack


def env_for(source_dsn: str, target_dsn: str, migration: str, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CDCSYNC_")}
    return {
        **base,
        "CDCSYNC_SOURCE_DSN": source_dsn,
        "CDCSYNC_TARGET_DSN": target_dsn,
        "CDCSYNC_MIGRATION_ID": migration,
        "CDCSYNC_LOG_FORMAT": "json",
        **extra,
    }


def snapshot(env: dict[str, str], *args: str, timeout: float = 120) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "cdcsync", "snapshot", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def objects(dsn: str) -> dict[str, Any]:
    """What a failed snapshot must not have changed: schemas, tables, rows, slots, publications."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p', 'v', 'S') "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1"
        ).fetchall()
        rows = {}
        for (name,) in tables:
            schema, _, table = name.partition(".")
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)",
                    (catalog.qualified(TableId(schema, table)),),
                )
                kind = cur.fetchone()
            if kind and kind[0] in ("r", "p"):
                count = conn.execute(
                    psycopg.sql.SQL("SELECT count(*) FROM {}").format(
                        psycopg.sql.Identifier(schema, table)
                    )
                ).fetchone()
                rows[name] = count[0] if count else None
        return {
            "schemas": conn.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg_%' ORDER BY 1"
            ).fetchall(),
            "rows": rows,
            "slots": conn.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE database = current_database()"
            ).fetchall(),
            "publications": conn.execute("SELECT pubname FROM pg_publication").fetchall(),
            "triggers": conn.execute(
                "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal"
            ).fetchall(),
        }


@pytest.fixture
def simple(source_dsn: str, target_dsn: str) -> Iterator[tuple[str, str]]:
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text);"
            "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g;"
        )
    yield source_dsn, target_dsn


def refused(
    source_dsn: str, target_dsn: str, env: dict[str, str], *args: str, code: int = 3
) -> str:
    before = objects(source_dsn), objects(target_dsn)
    returncode, out = snapshot(env, *args)
    assert returncode == code, out
    assert "Traceback" not in out
    assert (objects(source_dsn), objects(target_dsn)) == before
    return out


def test_a_non_empty_target_is_refused_unless_allowed(
    simple: tuple[str, str], topic_prefix: str
) -> None:
    source_dsn, target_dsn = simple
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (0, 'old')")
    env = env_for(source_dsn, target_dsn, topic_prefix)
    out = refused(source_dsn, target_dsn, env)
    assert "target table public.t is not empty" in out
    assert "--allow-nonempty-target" in out
    returncode, out = snapshot(env, "--allow-nonempty-target")
    assert returncode == 0, out
    with psycopg.connect(target_dsn) as conn:
        assert conn.execute("SELECT count(*), min(id) FROM t").fetchone() == (100, 1)


def test_a_slot_or_publication_already_there_is_refused(
    simple: tuple[str, str], topic_prefix: str
) -> None:
    source_dsn, target_dsn = simple
    env = env_for(source_dsn, target_dsn, topic_prefix)
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (f"{topic_prefix}_slot",)
        )
        conn.execute(f"CREATE PUBLICATION {topic_prefix}_pub FOR TABLE t")
    out = refused(source_dsn, target_dsn, env)
    assert f"replication slot {topic_prefix}_slot already exists" in out
    assert f"publication {topic_prefix}_pub already exists" in out
    assert "CDCSYNC_MIGRATION_ID" in out


def test_missing_privileges_are_listed_with_the_grants(
    simple: tuple[str, str], topic_prefix: str
) -> None:
    source_dsn, target_dsn = simple
    role = f"r_{topic_prefix}"
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    try:
        limited = psycopg.conninfo.make_conninfo(source_dsn, user=role, password="pw")
        out = refused(source_dsn, target_dsn, env_for(limited, target_dsn, topic_prefix))
        assert "the source role lacks REPLICATION: ALTER ROLE <role> REPLICATION" in out
        assert "no SELECT privilege on source table public.t: GRANT SELECT ON public.t" in out
        assert "does not own 1 table(s) (public.t)" in out
        assert "pw" not in out.replace("password=***", "")  # the secret is never shown
    finally:
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


def test_tables_whose_updates_a_publication_would_break_are_refused(
    source_dsn: str, target_dsn: str, topic_prefix: str
) -> None:
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE keyless (v text); INSERT INTO keyless VALUES ('a');"
            "CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY)"
        )
    out = refused(source_dsn, target_dsn, env_for(source_dsn, target_dsn, topic_prefix))
    assert "ALTER TABLE public.keyless REPLICA IDENTITY FULL" in out
    assert "public.scratch is UNLOGGED" in out
    # No publication was created, so the application's UPDATE still works.
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute("UPDATE keyless SET v = 'b'")


def test_unreachable_databases_are_named(simple: tuple[str, str], topic_prefix: str) -> None:
    source_dsn, target_dsn = simple
    nowhere = "host=127.0.0.1 port=1 dbname=x user=x password=s3cret connect_timeout=2"
    out = refused(source_dsn, target_dsn, env_for(nowhere, target_dsn, topic_prefix))
    assert "cannot connect to the source database" in out and "port=1" in out
    assert "s3cret" not in out
    out = refused(source_dsn, target_dsn, env_for(source_dsn, nowhere, topic_prefix))
    assert "cannot connect to the target database" in out


def test_a_target_table_without_a_source_column_is_refused(
    simple: tuple[str, str], topic_prefix: str
) -> None:
    source_dsn, target_dsn = simple
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    out = refused(source_dsn, target_dsn, env_for(source_dsn, target_dsn, topic_prefix))
    assert "target table public.t lacks column(s) v" in out


def test_unknown_names_in_the_scope_are_configuration_errors(
    simple: tuple[str, str], topic_prefix: str
) -> None:
    source_dsn, target_dsn = simple
    env = env_for(source_dsn, target_dsn, topic_prefix, CDCSYNC_TABLES="public.t,public.nope")
    out = refused(source_dsn, target_dsn, env, code=2)
    assert "table(s) public.nope not found on the source" in out
    env = env_for(source_dsn, target_dsn, topic_prefix, CDCSYNC_SCHEMAS="nope")
    out = refused(source_dsn, target_dsn, env, code=2)
    assert "schema(s) nope not found on the source" in out


def test_resuming_with_another_scope_is_refused(simple: tuple[str, str], topic_prefix: str) -> None:
    source_dsn, target_dsn = simple
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO t SELECT g, repeat('x', 500) FROM generate_series(101, 20000) g")
    env = env_for(source_dsn, target_dsn, topic_prefix, CDCSYNC_SNAPSHOT_CHUNK_BLOCKS="8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cdcsync", "snapshot", "--max-rate", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        with psycopg.connect(target_dsn, autocommit=True) as conn:
            exists = conn.execute("SELECT to_regclass('cdcsync.snapshot_chunk')").fetchone()
            row = (
                exists
                and exists[0]
                and conn.execute("SELECT EXISTS (SELECT 1 FROM cdcsync.snapshot_chunk)").fetchone()
            )
        if row and row[0]:
            break
        assert time.monotonic() < deadline, "no chunk was copied"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    out = refused(
        source_dsn,
        target_dsn,
        env_for(source_dsn, target_dsn, topic_prefix, CDCSYNC_SCHEMAS="public"),
        code=2,
    )
    assert (
        f"migration {topic_prefix} was started with other settings (schemas: [] → ['public'])"
        in out
    )


def test_wal_level_judged_on_real_server_facts(simple: tuple[str, str], topic_prefix: str) -> None:
    """The judgement, fed the facts of the real test server with wal_level altered."""
    source_dsn, target_dsn = simple
    settings = load_settings(
        source_dsn=source_dsn, target_dsn=target_dsn, migration_id=topic_prefix
    )
    with psycopg.connect(source_dsn) as source, psycopg.connect(target_dsn) as target:
        tables = catalog.list_tables(source, settings)
        facts = preflight.gather(
            source,
            target,
            source_dsn=source_dsn,
            tables=tables,
            infos=catalog.describe(source, tables),
            slot=settings.slot_name,
            publication=settings.publication_name,
            pg_dump=schema_copy.pg_bin("pg_dump"),
        )
    kwargs: dict[str, Any] = {
        "slot": settings.slot_name,
        "publication": settings.publication_name,
        "allow_nonempty": False,
    }
    assert facts.wal_level == "logical" and facts.replication_connect_error is None
    assert preflight.evaluate(facts, **kwargs) == []
    facts.wal_level = "replica"
    assert preflight.evaluate(facts, **kwargs) == [
        "source wal_level is replica: run ALTER SYSTEM SET wal_level = logical; and restart "
        "the source server"
    ]


def test_wal_level_not_logical_on_a_real_server_is_refused(
    target_dsn: str, topic_prefix: str
) -> None:
    """The whole command against a second cluster that really runs wal_level=replica."""
    root = Path(tempfile.mkdtemp(prefix=f"cdcsync-wal-{secrets.token_hex(3)}-"))
    os.chmod(root, 0o755)
    stack = LocalStack(root)
    try:
        stack.up(("source",))
        stack.down()
        (root / "source" / "data" / "cdcsync.conf").write_text("wal_level = replica\n")
        stack.up(("source",))
        dsn = stack.dsn("source")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        out = refused(dsn, target_dsn, env_for(dsn, target_dsn, topic_prefix))
        assert "source wal_level is replica" in out
        assert "ALTER SYSTEM SET wal_level = logical" in out
    finally:
        stack.down()
        shutil.rmtree(root, ignore_errors=True)
