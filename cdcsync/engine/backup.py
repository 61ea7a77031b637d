"""A verified backup of the source: ``pg_dump`` in directory format, restored and compared.

Why the check is sound while the source keeps changing (streaming goes on): one
REPEATABLE READ READ ONLY transaction on the source exports a snapshot and stays open
for the whole backup. ``pg_dump --snapshot`` dumps under that snapshot (its parallel
workers import it too), the dump is restored into a scratch database on the target
server (``pg_restore --jobs``), and the migrated tables are then checksummed with
verify's own machinery — the source side's connections importing the *same* snapshot,
the scratch side read as restored. Both sides therefore describe one instant, and any
difference is the dump's fault, not a later write. ``verify_tables`` opens its own
snapshot, so the source side is built here from :mod:`cdcsync.engine.verify`'s
``_Side``/``_Checker`` (same queries, same session settings); the held transaction
costs only that vacuum keeps rows younger than it until the check ends.

The files' sha256 sums are taken right after the dump and checked again after the
restore, so a file changed in between is named too. Connections get the DSN's parts
as ``PG*`` variables and a passfile (mode 0600, removed afterwards): no password on a
command line. The scratch database is always dropped; the outcome — location, size,
per-file sha256, the comparison — is recorded in ``data.backup`` and an audit row.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import secrets
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from cdcsync.adapters.pg import connect
from cdcsync.core.events import TableId
from cdcsync.engine import verify as vf
from cdcsync.errors import ConfigError, PreconditionError

if TYPE_CHECKING:
    from cdcsync.config import Settings

log = logging.getLogger("cdcsync.backup")

PG_BIN = Path("/usr/lib/postgresql/15/bin")

#: libpq connection parameters and the environment variables libpq reads them from.
_ENV_OF = {
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "dbname": "PGDATABASE",
    "user": "PGUSER",
    "passfile": "PGPASSFILE",
    "options": "PGOPTIONS",
    "application_name": "PGAPPNAME",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "sslmode": "PGSSLMODE",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcrl": "PGSSLCRL",
    "sslnegotiation": "PGSSLNEGOTIATION",
    "requirepeer": "PGREQUIREPEER",
    "gssencmode": "PGGSSENCMODE",
    "krbsrvname": "PGKRBSRVNAME",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "channel_binding": "PGCHANNELBINDING",
    "service": "PGSERVICE",
}


@dataclass
class BackupResult:
    location: str
    at: float
    snapshot: str = ""
    source_phase: str | None = None
    size_bytes: int = 0
    files: dict[str, str] = field(default_factory=dict)
    tables: int = 0
    verification: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def verified(self) -> bool:
        return not self.problems and bool(self.verification.get("ok"))

    def as_dict(self) -> dict[str, Any]:
        return {
            "location": self.location,
            "at": self.at,
            "snapshot": self.snapshot,
            "source_phase": self.source_phase,
            "size_bytes": self.size_bytes,
            "files": self.files,
            "tables": self.tables,
            "verified": self.verified,
            "verification": self.verification,
            "error": "; ".join(self.problems) or None,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


def libpq_env(conninfo: str, secret_dir: Path) -> dict[str, str]:
    """Environment for a libpq program: the DSN's parts as PG* variables, the password in a
    passfile under ``secret_dir`` (so neither ``ps`` nor the environment shows it)."""
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    password = params.pop("password", None)
    for key, value in params.items():
        var = _ENV_OF.get(key)
        if var is None:
            raise ConfigError(
                f"connection parameter {key!r} cannot be passed to pg_dump/pg_restore"
            )
        env[var] = str(value)
    if password is not None:
        passfile = secret_dir / f"pgpass-{secrets.token_hex(4)}"
        escaped = str(password).replace("\\", "\\\\").replace(":", "\\:")
        fd = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(f"*:*:*:*:{escaped}\n")
        env["PGPASSFILE"] = str(passfile)
    return env


def sha256_files(root: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under ``root``."""
    sums: dict[str, str] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        sums[str(path.relative_to(root))] = digest.hexdigest()
    return sums


def _run(argv: list[str], env: dict[str, str], what: str) -> str | None:
    """Run a client program; its error text (tail) when it fails."""
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode == 0:
        return None
    tail = done.stderr.strip()[-1500:] or f"exit {done.returncode}"
    return f"{what} failed: {tail}"


def run_backup(
    settings: Settings,
    directory: Path,
    *,
    jobs: int,
    actor: str,
    argv: dict[str, Any],
    compress: int | None = None,
    after_dump: Callable[[Path], None] | None = None,
) -> BackupResult:
    """Dump the source, restore and compare it, record the outcome; the result says if it
    verified (the caller turns a failure into a non-zero exit). ``after_dump`` runs between
    the dump and the restore (tests corrupt the dump there)."""
    from cdcsync.engine.switch import audit
    from cdcsync.snapshot.catalog import list_tables

    settings.require("source_dsn", "target_dsn")
    source_dsn, target_dsn = settings.source_conninfo(), settings.target_conninfo()
    with connect(target_dsn, "target", autocommit=True) as state:
        phase, recorded = _migration(state, settings)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    location = directory / f"{settings.migration_id}-{stamp}"
    if location.exists():
        raise PreconditionError(f"{location} exists already: wait a second or choose --dir")
    result = BackupResult(str(location), time.time(), source_phase=phase)
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="cdcsync-backup-") as secret_dir,
        connect(source_dsn, "source", autocommit=True) as holder,
    ):
        holder.execute("SET application_name = 'cdcsync-backup'")
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        row = holder.execute("SELECT pg_export_snapshot()").fetchone()
        assert row is not None
        result.snapshot = str(row[0])
        tables = recorded or list_tables(holder, settings)
        result.tables = len(tables)
        src_env = libpq_env(source_dsn, Path(secret_dir))
        t = time.monotonic()
        dump = [
            str(PG_BIN / "pg_dump"),
            "--format=directory",
            f"--jobs={jobs}",
            f"--snapshot={result.snapshot}",
            f"--file={location}",
            "--no-password",
        ]
        if compress is not None:
            dump.append(f"--compress={compress}")
        failed = _run(dump, src_env, "pg_dump")
        result.seconds["dump"] = time.monotonic() - t
        if failed:
            result.problems.append(failed)
        else:
            result.files = sha256_files(location)
            result.size_bytes = sum(p.stat().st_size for p in location.rglob("*") if p.is_file())
            if after_dump is not None:
                after_dump(location)
            _check(result, location, tables, settings, target_dsn, Path(secret_dir), jobs)
        holder.execute("ROLLBACK")
    result.seconds["total"] = time.monotonic() - started
    _record(settings, target_dsn, result, actor, argv, audit)
    return result


def _migration(conn: psycopg.Connection[Any], settings: Settings) -> tuple[str, list[TableId]]:
    """The migration's phase and recorded tables; a backup is recorded in its state."""
    present = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL",
        (sql.Identifier(settings.state_schema, "migration").as_string(conn),),
    ).fetchone()
    row = None
    if present and present[0]:
        row = conn.execute(
            sql.SQL("SELECT phase, data FROM {} WHERE migration_id = %s").format(
                sql.Identifier(settings.state_schema, "migration")
            ),
            (settings.migration_id,),
        ).fetchone()
    if row is None:
        raise PreconditionError(
            f"migration {settings.migration_id} has no state on the target to record the "
            "backup in: run cdcsync snapshot first"
        )
    data = dict(row[1] or {})
    return str(row[0]), [TableId(str(s), str(n)) for s, n in data.get("tables") or []]


def _check(
    result: BackupResult,
    location: Path,
    tables: Sequence[TableId],
    settings: Settings,
    target_dsn: str,
    secret_dir: Path,
    jobs: int,
) -> None:
    """Restore into a scratch database, compare under the held snapshot, drop it."""
    scratch = f"cdcsync_backup_check_{secrets.token_hex(6)}"
    with connect(target_dsn, "target", autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(scratch))
        )
    try:
        env = libpq_env(psycopg.conninfo.make_conninfo(target_dsn, dbname=scratch), secret_dir)
        t = time.monotonic()
        failed = _run(
            [
                str(PG_BIN / "pg_restore"),
                f"--jobs={jobs}",
                f"--dbname={scratch}",
                "--no-owner",
                "--no-privileges",
                "--no-publications",
                "--no-subscriptions",
                "--exit-on-error",
                "--no-password",
                str(location),
            ],
            env,
            "pg_restore into the scratch database",
        )
        result.seconds["restore"] = time.monotonic() - t
        if failed:
            result.problems.append(failed)
        else:
            t = time.monotonic()
            report = _compare(
                settings.source_conninfo(),
                result.snapshot,
                psycopg.conninfo.make_conninfo(target_dsn, dbname=scratch),
                tables,
                max(1, settings.workers),
            )
            result.seconds["verify"] = time.monotonic() - t
            doc = report.to_dict()
            result.verification = {
                "level": "checksum",
                "ok": report.ok,
                "tables": len(doc["tables"]),
                "mismatches": doc["mismatches"],
                "rows": sum(int(x["source_rows"] or 0) for x in doc["tables"]),
            }
            if not report.ok:
                bad = [t for t, n in doc["mismatches"].items() if n]
                result.problems.append(
                    "the restored copy differs from the source at the dump's snapshot in "
                    + ", ".join(bad or ["the reconciliation totals"])
                )
        now = sha256_files(location)
        changed = sorted(
            name for name in set(now) | set(result.files) if now.get(name) != result.files.get(name)
        )
        if changed:
            result.problems.append("files changed since the dump: " + ", ".join(changed))
    finally:
        with connect(target_dsn, "target", autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(scratch))
            )


class _SnapshotSide(vf._Side):
    """verify's source side, every connection reading under the backup's exported snapshot."""

    def __init__(self, dsn: str, workers: int, snapshot: str) -> None:
        self.name = "source"
        self._conns: list[psycopg.Connection[Any]] = []
        self._idle: queue.Queue[psycopg.Connection[Any]] = queue.Queue()
        settings = sql.SQL("").join(
            sql.SQL("SET {} = {}; ").format(sql.Identifier(k), sql.Literal(v))
            for k, v in vf.SESSION_SETTINGS.items()
        )
        try:
            for _ in range(workers):
                conn = connect(dsn, "source", autocommit=True, application_name="cdcsync-backup")
                self._conns.append(conn)
                conn.execute(settings)
                conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
                self._idle.put(conn)
        except BaseException:
            self.close()
            raise
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="backup-verify")


def _compare(
    source_dsn: str, snapshot: str, scratch_dsn: str, tables: Sequence[TableId], workers: int
) -> vf.VerifyReport:
    """Checksum-level comparison of the source at ``snapshot`` with the restored copy."""
    started = time.monotonic()
    source = _SnapshotSide(source_dsn, workers, snapshot)
    try:
        target = vf._Side("target", scratch_dsn, workers)
    except BaseException:
        source.close()
        raise
    try:
        results = vf._Checker(source, target, "checksum", workers, vf.DEFAULT_MAX_KEYS).run(
            list(dict.fromkeys(tables))
        )
    finally:
        source.close()
        target.close()
    return vf.VerifyReport(
        level="checksum",
        tables=[r for r, _ in results],
        reconciliation={r.table: rec for r, rec in results},
        timings={"total_seconds": time.monotonic() - started},
    )


def _record(
    settings: Settings,
    target_dsn: str,
    result: BackupResult,
    actor: str,
    argv: dict[str, Any],
    audit: Callable[..., None],
) -> None:
    record = result.as_dict()
    with connect(target_dsn, "target") as conn:
        with conn.transaction():
            conn.execute(
                sql.SQL(
                    "UPDATE {} SET data = data || jsonb_build_object('backup', %s::jsonb), "
                    "updated_at = now() WHERE migration_id = %s"
                ).format(sql.Identifier(settings.state_schema, "migration")),
                (Jsonb(record), settings.migration_id),
            )
        audit(
            conn, settings, actor, "backup", argv, "done" if result.verified else "failed", record
        )
    log.info("backup %s: %s", result.location, "verified" if result.verified else "FAILED")
