"""pgbouncer's admin console: PAUSE, repoint, RELOAD, RESUME.

During a freeze, ``PAUSE <db>`` waits for running transactions to finish and then
holds new queries, so applications see latency instead of fence errors. The switch
rewrites the ``[databases]`` entry of the application's database in a file cdcsync owns
(included from pgbouncer.ini with ``%include``), reloads, and resumes: queries held
during the pause then run on the new primary.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from cdcsync.errors import PreconditionError

_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.\-/:]+$")


@dataclass(frozen=True)
class Backend:
    """Where pgbouncer sends one database alias."""

    host: str
    port: int
    dbname: str

    def ini_value(self) -> str:
        for part in (self.host, self.dbname):
            if not _SAFE_VALUE.match(part):
                raise PreconditionError(f"pgbouncer: unsupported characters in {part!r}")
        return f"host={self.host} port={self.port} dbname={self.dbname}"


def backend_of(dsn: str) -> Backend:
    """The host, port and database a libpq DSN points at."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    return Backend(
        host=str(info.get("host") or "127.0.0.1"),
        port=int(info.get("port") or 5432),
        dbname=str(info.get("dbname") or "postgres"),
    )


def render_databases(entries: dict[str, Backend]) -> str:
    """The include file: one line per alias cdcsync manages."""
    lines = ["[databases]", "; managed by cdcsync: rewritten at cutover and rollback"]
    for alias in sorted(entries):
        if not _SAFE_VALUE.match(alias):
            raise PreconditionError(f"pgbouncer: unsupported database alias {alias!r}")
        lines.append(f"{alias} = {entries[alias].ini_value()}")
    return "\n".join(lines) + "\n"


def write_databases(path: Path, entries: dict[str, Backend]) -> None:
    """Replace the include file atomically, keeping its owner and mode."""
    text = render_databases(entries)
    st = path.stat() if path.exists() else None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".cdcsync-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        if st is not None:
            os.chmod(tmp, st.st_mode & 0o777)
            os.chown(tmp, st.st_uid, st.st_gid)
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class PgbouncerAdmin:
    """A connection to the admin console (simple statements only)."""

    def __init__(self, admin_dsn: str) -> None:
        try:
            self.conn: psycopg.Connection[Any] = psycopg.connect(
                admin_dsn, autocommit=True, prepare_threshold=None
            )
        except psycopg.Error as exc:
            raise PreconditionError(f"pgbouncer admin console unreachable: {exc}") from exc

    def close(self) -> None:
        self.conn.close()

    def _admin(self, command: str, alias: str | None = None) -> None:
        if alias is not None and not _SAFE_VALUE.match(alias):
            raise PreconditionError(f"pgbouncer: unsupported database alias {alias!r}")
        statement = command if alias is None else f"{command} {alias}"
        try:
            self.conn.execute(statement.encode())
        except psycopg.Error as exc:
            raise PreconditionError(f"pgbouncer {statement} failed: {exc}") from exc

    def pause(self, alias: str) -> None:
        """Wait for running transactions on ``alias`` to end, then hold new ones."""
        self._admin("PAUSE", alias)

    def resume(self, alias: str) -> None:
        self._admin("RESUME", alias)

    def reload(self) -> None:
        self._admin("RELOAD")

    def databases(self) -> dict[str, tuple[str, int, str]]:
        """Alias → (host, port, database) as pgbouncer currently routes it."""
        cur = self.conn.execute(b"SHOW DATABASES")
        names = [d.name for d in cur.description or []]
        out: dict[str, tuple[str, int, str]] = {}
        for row in cur.fetchall():
            rec = dict(zip(names, row, strict=False))
            out[str(rec["name"])] = (str(rec["host"]), int(rec["port"]), str(rec["database"]))
        return out

    def switch(self, alias: str, databases_file: Path, new: Backend) -> None:
        """Point ``alias`` at ``new``: rewrite, RELOAD, verify; the caller RESUMEs."""
        current = _read_entries(databases_file)
        current[alias] = new
        write_databases(databases_file, current)
        self.reload()
        routed = self.databases().get(alias)
        if routed is None or (routed[0], routed[1], routed[2]) != (new.host, new.port, new.dbname):
            raise PreconditionError(
                f"pgbouncer still routes {alias} to {routed} after RELOAD "
                f"(expected {new.host}:{new.port}/{new.dbname}); is {databases_file} included?"
            )


_LINE = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*=\s*host=(\S+)\s+port=(\d+)\s+dbname=(\S+)\s*$")


def _read_entries(path: Path) -> dict[str, Backend]:
    entries: dict[str, Backend] = {}
    if not path.exists():
        return entries
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _LINE.match(line)
        if match:
            alias, host, port, dbname = match.groups()
            entries[alias] = Backend(host, int(port), dbname)
    return entries
