"""The schema, from ``pg_dump --section=pre-data`` / ``post-data``, onto the target.

The pre-data section (schemas, types, enums, domains, functions, sequences, tables,
defaults) is restored in one transaction before the copy, so a failure leaves nothing
half-made. Extensions are created separately — only those the target can install —
because the dump names versions and schemas the target may not have. A schema the
operator created on the target beforehand is accepted as it is. Tablespaces are left
out (the target has its own storage layout), and so are views when only some tables
of a schema are migrated (they may name the others).

pg_dump gets the connection string without its password (which travels in
``PGPASSWORD``), so secrets never appear in a process list.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from cdcsync.core.events import TableId
from cdcsync.errors import PreconditionError
from cdcsync.snapshot import catalog

log = logging.getLogger("cdcsync.snapshot")


def pg_bin(name: str) -> str:
    """The newest PostgreSQL client program installed (pg_dump must be >= the server)."""
    found = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(re.sub(r"\D", "", p.split("/")[4]) or 0),
    )
    if found:
        return found[-1]
    path = shutil.which(name)
    if path:
        return path
    raise PreconditionError(f"{name} not found: install the PostgreSQL client programs")


def client_env(dsn: str) -> tuple[str, dict[str, str]]:
    """(conninfo without password, environment with PGPASSWORD) for a libpq program."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    password = info.pop("password", None)
    env = dict(os.environ)
    if password is not None:
        env["PGPASSWORD"] = str(password)
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in info.items()}), env


@dataclass(frozen=True)
class Selection:
    """What pg_dump selects: whole schemas, minus excluded tables and schemas."""

    schemas: tuple[str, ...] | None  # None: every schema
    exclude_tables: tuple[TableId, ...] = ()
    exclude_schemas: tuple[str, ...] = ()
    subset: bool = False  # only some tables of the schemas: views may name the others

    def keep(self, entry: Entry) -> bool:
        """Whether a dumped entry belongs on the target for this selection."""
        if not self.subset:
            return True
        views = ("VIEW", "MATERIALIZED VIEW", "MATERIALIZED VIEW DATA")
        if entry.type in views:
            return False
        return not (
            entry.type == "COMMENT" and entry.name.startswith(("VIEW ", "MATERIALIZED VIEW "))
        )

    def args(self) -> list[str]:
        out: list[str] = []
        for schema in self.schemas or ():
            out += ["-n", _pattern(schema)]
        for schema in self.exclude_schemas:
            out += ["-N", _pattern(schema)]
        for table in self.exclude_tables:
            out += ["-T", f"{_pattern(table.schema)}.{_pattern(table.name)}"]
        return out


def _pattern(name: str) -> str:
    # pg_dump patterns: inside double quotes, letters keep their case and wildcards
    # are literal; a double quote is written twice.
    return '"' + name.replace('"', '""') + '"'


def selection_for(
    conn: psycopg.Connection[Any],
    *,
    schemas: Sequence[str],
    tables: Sequence[str],
    infos: Sequence[catalog.TableInfo],
    state_schema: str,
) -> Selection:
    """The dump selection matching the migration's scope (settings ``schemas``/``tables``)."""
    if not schemas and not tables:
        return Selection(None, (), (state_schema,))
    wanted = {info.table for info in infos}
    for info in infos:
        if info.partitioned:  # every member of the tree, intermediate levels included
            members = conn.execute(
                "SELECT n.nspname, c.relname FROM pg_partition_tree(%s::regclass) p "
                "JOIN pg_class c ON c.oid = p.relid JOIN pg_namespace n ON n.oid = c.relnamespace",
                (catalog.qualified(info.table),),
            ).fetchall()
            wanted |= {TableId(str(s), str(n)) for s, n in members}
    in_scope = sorted({t.schema for t in wanted} | set(schemas))
    if not tables:
        conn.rollback()
        return Selection(tuple(in_scope), (), (state_schema,))
    rows = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p', 'f') AND n.nspname = ANY(%s)",
        (in_scope,),
    ).fetchall()
    conn.rollback()
    others = sorted(
        TableId(str(s), str(n)) for s, n in rows if TableId(str(s), str(n)) not in wanted
    )
    return Selection(tuple(in_scope), tuple(others), (state_schema,), subset=True)


def dump(source_dsn: str, section: str, selection: Selection) -> str:
    conninfo, env = client_env(source_dsn)
    argv = [
        pg_bin("pg_dump"),
        f"--section={section}",
        "--no-owner",
        "--no-privileges",
        "--no-publications",
        "--no-subscriptions",
        "--no-security-labels",
        "--no-tablespaces",
        *selection.args(),
        "-d",
        conninfo,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise PreconditionError(f"pg_dump --section={section} failed: {done.stderr.strip()[:2000]}")
    return done.stdout


@dataclass(frozen=True)
class Entry:
    """One object of a plain-format dump: its header, the session settings in force, its SQL."""

    name: str
    type: str
    schema: str
    settings: tuple[str, ...]
    body: str


@dataclass
class Script:
    preamble: list[str] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)


_HEADER = re.compile(r"^-- (?:Data for )?Name: (.*)$")
_SESSION = re.compile(r"^(SET \w+ = .*;|SELECT pg_catalog\.set_config\(.*\);)$")
_META = re.compile(r"^\\(un)?restrict \S+$")


def parse(text: str) -> Script:
    """Split a plain dump into its preamble and entries (by pg_dump's ``-- Name:`` headers).

    pg_dump writes session SETs (tablespace, access method) just before an entry's
    header; each entry carries the ones in force when it starts, so it can run on any
    connection. Bodies are kept verbatim (function sources and string literals may
    hold anything); only psql's ``\\restrict`` meta-commands are dropped.
    """
    lines = [line for line in text.splitlines() if not _META.match(line)]
    headers = [
        i
        for i in range(1, len(lines) - 1)
        if lines[i - 1] == "--" and lines[i + 1] == "--" and _HEADER.match(lines[i])
    ]
    script = Script()
    session: dict[str, str] = {}

    def trailing_session(segment: list[str]) -> list[str]:
        """Strip and return the session lines at the end of a segment."""
        found: list[str] = []
        while segment and (not segment[-1].strip() or _SESSION.match(segment[-1])):
            line = segment.pop()
            if line.strip():
                found.insert(0, line)
        return found

    def remember(settings: list[str]) -> None:
        for line in settings:
            key = line.split("=")[0] if line.startswith("SET ") else line.split(",")[0]
            session[key] = line

    first = headers[0] - 1 if headers else len(lines)
    preamble = [line for line in lines[:first] if _SESSION.match(line)]
    script.preamble = preamble
    remember(preamble)
    for n, at in enumerate(headers):
        match = _HEADER.match(lines[at])
        assert match is not None
        name, type_, schema = _split_header(match.group(1))
        end = headers[n + 1] - 1 if n + 1 < len(headers) else len(lines)
        segment = lines[at + 2 : end]
        following = trailing_session(segment)
        body = "\n".join(segment).strip()
        if body:
            script.entries.append(Entry(name, type_, schema, tuple(session.values()), body + "\n"))
        remember(following)
    return script


def _split_header(header: str) -> tuple[str, str, str]:
    rest, _, _owner = header.rpartition("; Owner: ")
    rest, _, schema = rest.rpartition("; Schema: ")
    name, _, type_ = rest.rpartition("; Type: ")
    return name, type_, schema


def render(preamble: Sequence[str], entries: Sequence[Entry]) -> str:
    parts = ["\n".join(preamble), ""]
    for entry in entries:
        parts.extend(entry.settings)
        parts.append(entry.body)
    return "\n".join(parts) + "\n"


def run_psql(target_dsn: str, script: str, what: str) -> None:
    """Run a script on the target in one transaction, stopping at the first error."""
    conninfo, env = client_env(target_dsn)
    done = subprocess.run(
        [pg_bin("psql"), "-X", "-q", "-1", "-v", "ON_ERROR_STOP=1", "-d", conninfo],
        input=script,
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if done.returncode != 0:
        raise PreconditionError(f"{what} failed on the target: {done.stderr.strip()[:2000]}")


def extension_statements(
    source: psycopg.Connection[Any], target: psycopg.Connection[Any]
) -> list[str]:
    """CREATE EXTENSION for source extensions the target lacks but can install."""
    wanted = catalog.extensions(source)
    have = catalog.extensions(target)
    available = {str(r[0]) for r in target.execute("SELECT name FROM pg_available_extensions")}
    out: list[str] = []
    for name, (schema, _version) in sorted(wanted.items()):
        if name in have:
            continue
        if name not in available:
            log.warning("extension %s is not available on the target: not created", name)
            continue
        out.append(
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {};")
            .format(sql.Identifier(schema))
            .as_string(None)
        )
        out.append(
            sql.SQL("CREATE EXTENSION IF NOT EXISTS {} WITH SCHEMA {} CASCADE;")
            .format(sql.Identifier(name), sql.Identifier(schema))
            .as_string(None)
        )
    source.rollback()
    target.rollback()
    return out


def copy_pre_data(
    source: psycopg.Connection[Any],
    target: psycopg.Connection[Any],
    *,
    source_dsn: str,
    target_dsn: str,
    selection: Selection,
) -> int:
    """Restore the pre-data section on the target in one transaction; returns entries."""
    script = parse(dump(source_dsn, "pre-data", selection))
    existing = {str(r[0]) for r in target.execute("SELECT nspname FROM pg_namespace")}
    target.rollback()
    schemas: list[Entry] = []
    rest: list[Entry] = []
    dropped = [e for e in script.entries if not selection.keep(e)]
    if dropped:
        log.warning(
            "not creating %d view(s) on the target: with a table subset they may name tables "
            "that are not migrated (%s)",
            len(dropped),
            ", ".join(f"{e.schema}.{e.name}" for e in dropped[:5]),
        )
    for entry in script.entries:
        if not selection.keep(entry):
            continue
        if entry.type == "EXTENSION" or (
            entry.type == "COMMENT" and entry.name.startswith("EXTENSION ")
        ):
            continue  # created below, only when the target can
        if entry.type == "SCHEMA":
            if entry.name not in existing:
                schemas.append(entry)
            continue
        if entry.type == "COMMENT" and entry.name.startswith("SCHEMA "):
            if entry.name[len("SCHEMA ") :] not in existing:
                schemas.append(entry)
            continue
        rest.append(entry)
    extensions = extension_statements(source, target)
    text = (
        render(script.preamble, schemas)
        + "\n".join(extensions)
        + "\n"
        + "SELECT pg_catalog.set_config('search_path', '', false);\n"
        + render([], rest)
    )
    run_psql(target_dsn, text, "restoring the pre-data schema")
    return len(schemas) + len(rest)
