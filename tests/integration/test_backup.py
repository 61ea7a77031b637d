"""``cdcsync backup`` against real PostgreSQL: dump, restore into scratch, compare, record.

The source is written to throughout the passing backup, so only a comparison made under
the dump's own snapshot can pass; the corrupted dumps must fail the check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from cdcsync.adapters.state_store import ensure_schema
from cdcsync.config import load_settings
from cdcsync.engine.backup import libpq_env, run_backup, sha256_files

pytestmark = pytest.mark.stack


def _prepare(source_dsn: str, target_dsn: str, migration_id: str) -> dict[str, str]:
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE public.acct (id int PRIMARY KEY, balance numeric NOT NULL, note text)"
        )
        conn.execute(
            "INSERT INTO public.acct SELECT g, g * 10, md5(g::text) "
            "FROM generate_series(1, 20000) g"
        )
        conn.execute("CREATE TABLE public.keyless (v int, t text)")
        conn.execute("INSERT INTO public.keyless SELECT g % 10, 'k' FROM generate_series(1, 500) g")
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        ensure_schema(conn)
        conn.execute(
            "INSERT INTO cdcsync.migration (migration_id, phase, data) "
            "VALUES (%s, 'snapshotted', %s)",
            (migration_id, Jsonb({"tables": [["public", "acct"], ["public", "keyless"]]})),
        )
    return {
        "CDCSYNC_SOURCE_DSN": source_dsn,
        "CDCSYNC_TARGET_DSN": target_dsn,
        "CDCSYNC_MIGRATION_ID": migration_id,
        "CDCSYNC_WORKERS": "2",
    }


def _state(target_dsn: str, migration_id: str) -> tuple[dict[str, Any], list[tuple[Any, ...]]]:
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT data FROM cdcsync.migration WHERE migration_id = %s", (migration_id,)
        ).fetchone()
        audits = conn.execute(
            "SELECT command, result, detail FROM cdcsync.audit WHERE migration_id = %s",
            (migration_id,),
        ).fetchall()
    assert row is not None
    return dict(row[0]), [tuple(a) for a in audits]


def _scratch_left(target_dsn: str) -> list[str]:
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'cdcsync_backup_check_%'"
        ).fetchall()
    return [str(r[0]) for r in rows]


class Writer:
    """Keeps changing the source while the backup runs."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.writes = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            i = 0
            while not self.stop.is_set():
                i += 1
                conn.execute(
                    "UPDATE public.acct SET balance = balance + 1 WHERE id = %s", (i % 20000 + 1,)
                )
                conn.execute("INSERT INTO public.keyless VALUES (%s, 'w')", (i,))
                self.writes += 1


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cdcsync", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def test_backup_under_writes_restores_and_verifies(
    source_dsn: str, target_dsn: str, topic_prefix: str, tmp_path: Path
) -> None:
    env = _prepare(source_dsn, target_dsn, topic_prefix)
    writer = Writer(source_dsn)
    writer.thread.start()
    try:
        done = _cli(env, "backup", "--dir", str(tmp_path), "--jobs", "2", "--output", "json")
    finally:
        writer.stop.set()
        writer.thread.join(timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert writer.writes > 20, writer.writes  # the source really changed meanwhile
    doc = json.loads(done.stdout)
    assert doc["verified"] is True and doc["error"] is None, doc
    assert doc["verification"]["mismatches"] == {"public.acct": 0, "public.keyless": 0}
    assert doc["verification"]["rows"] >= 20500
    location = Path(doc["location"])
    assert location.parent == tmp_path.resolve() and (location / "toc.dat").is_file()
    assert doc["files"] == sha256_files(location) and "toc.dat" in doc["files"]
    assert doc["size_bytes"] == sum(p.stat().st_size for p in location.rglob("*") if p.is_file())
    data, audits = _state(target_dsn, topic_prefix)
    assert data["backup"]["verified"] is True and data["backup"]["files"] == doc["files"]
    assert [(c, r) for c, r, _ in audits] == [("backup", "done")]
    assert _scratch_left(target_dsn) == []


def _flip_in_largest(location: Path) -> None:
    data_files = sorted(
        (p for p in location.iterdir() if p.name != "toc.dat"), key=lambda p: p.stat().st_size
    )
    victim = data_files[-1]
    raw = bytearray(victim.read_bytes())
    mid = len(raw) // 2
    for i in range(mid, mid + 16):
        raw[i] ^= 0xFF
    victim.write_bytes(bytes(raw))


def test_corrupted_compressed_dump_fails_the_check(
    source_dsn: str, target_dsn: str, topic_prefix: str, tmp_path: Path
) -> None:
    env = _prepare(source_dsn, target_dsn, topic_prefix)
    settings = load_settings(
        None, source_dsn=source_dsn, target_dsn=target_dsn, migration_id=topic_prefix, workers=2
    )
    result = run_backup(
        settings, tmp_path, jobs=2, actor="test", argv={}, after_dump=_flip_in_largest
    )
    assert not result.verified
    assert any("files changed since the dump" in p for p in result.problems), result.problems
    assert any("pg_restore" in p or "differs" in p for p in result.problems), result.problems
    data, audits = _state(target_dsn, topic_prefix)
    assert data["backup"]["verified"] is False and data["backup"]["error"]
    assert [(c, r) for c, r, _ in audits] == [("backup", "failed")]
    assert _scratch_left(target_dsn) == []
    del env


def test_a_changed_value_in_a_plain_dump_is_caught_by_the_checksums(
    source_dsn: str, target_dsn: str, topic_prefix: str, tmp_path: Path
) -> None:
    _prepare(source_dsn, target_dsn, topic_prefix)
    settings = load_settings(
        None, source_dsn=source_dsn, target_dsn=target_dsn, migration_id=topic_prefix, workers=2
    )

    def change_a_balance(location: Path) -> None:
        # Uncompressed: the data file is COPY text; change one balance, keep it parseable.
        for path in location.glob("*.dat"):
            if path.name == "toc.dat":
                continue
            raw = path.read_bytes()
            if raw.startswith(b"1\t10\t"):  # acct's COPY data: row id=1, balance 10
                path.write_bytes(raw.replace(b"\n5\t50\t", b"\n5\t51\t", 1))
                return
        raise AssertionError("acct's data file not found")

    result = run_backup(
        settings, tmp_path, jobs=2, actor="test", argv={}, compress=0, after_dump=change_a_balance
    )
    assert not result.verified
    assert any("differs" in p and "public.acct" in p for p in result.problems), result.problems
    assert result.verification["mismatches"]["public.acct"] >= 1
    assert result.verification["mismatches"]["public.keyless"] == 0


def test_cli_refuses_without_migration_state(
    source_dsn: str, target_dsn: str, topic_prefix: str, tmp_path: Path
) -> None:
    env = {
        "CDCSYNC_SOURCE_DSN": source_dsn,
        "CDCSYNC_TARGET_DSN": target_dsn,
        "CDCSYNC_MIGRATION_ID": topic_prefix,
    }
    done = _cli(env, "backup", "--dir", str(tmp_path))
    assert done.returncode == 3 and "cdcsync snapshot" in done.stderr, done.stderr
    assert not any(tmp_path.iterdir())


def test_password_goes_to_a_passfile_not_the_environment(tmp_path: Path) -> None:
    dsn = psycopg.conninfo.make_conninfo("host=db port=5 user=u dbname=d", password="s3:cr\\et")
    env = libpq_env(dsn, tmp_path)
    assert "s3:cr" not in " ".join(env.values())
    assert env["PGHOST"] == "db" and env["PGDATABASE"] == "d" and "PGPASSWORD" not in env
    passfile = Path(env["PGPASSFILE"])
    assert passfile.read_text() == "*:*:*:*:s3\\:cr\\\\et\n"
    assert passfile.stat().st_mode & 0o077 == 0
