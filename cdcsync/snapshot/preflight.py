"""Everything the snapshot needs, checked before anything is changed.

:func:`gather` reads facts from both databases (read-only; it creates nothing, not
even the state schema); :func:`evaluate` turns facts into problems, each naming what
to fix. Keeping the judgement pure lets it be tested with facts read from a real
server and then altered (a ``wal_level`` the test cluster cannot have, for instance).

A table the plan renames is copied under its source name and renamed at the end of the
snapshot (:meth:`cdcsync.core.plan.TablePlan.ddl`), so its source name on the target is
checked as any other table's, and its destination must not exist there yet: the rename
would fail after the whole copy. A destination that exists is refused up front, named,
whether or not it holds rows (``--allow-nonempty-target`` empties the copied tables,
never a destination).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from cdcsync.core import plan as plan_mod
from cdcsync.core.events import TableId
from cdcsync.snapshot import catalog
from cdcsync.snapshot.catalog import TableInfo


@dataclass(frozen=True)
class Ownership:
    """What an interrupted run of this same migration left behind, and may reuse or undo."""

    slot: bool = False
    publication: bool = False
    target_tables: frozenset[str] = frozenset()  # tables it may have partly copied


@dataclass
class Facts:
    source_version: int = 0  # server_version_num
    pg_dump_major: int = 0
    wal_level: str = ""
    superuser: bool = False
    replication_role: bool = False
    replication_connect_error: str | None = None
    max_replication_slots: int = 0
    slots_used: int = 0
    max_wal_senders: int = 0
    senders_used: int = 0
    can_create_publication: bool = True
    tables: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    not_owned: list[str] = field(default_factory=list)
    no_replica_identity: list[str] = field(default_factory=list)
    unlogged: list[str] = field(default_factory=list)
    slot_exists: bool = False
    publication_exists: bool = False
    target_can_create: bool = True
    target_can_set_replica_role: bool = True
    target_present: list[str] = field(default_factory=list)
    target_missing: list[str] = field(default_factory=list)
    target_nonempty: list[str] = field(default_factory=list)
    target_missing_columns: dict[str, list[str]] = field(default_factory=dict)
    missing_extensions: dict[str, list[str]] = field(default_factory=dict)
    # Rename destinations that already exist on the target → the source table renamed there.
    rename_taken: dict[str, str] = field(default_factory=dict)
    rename_taken_nonempty: list[str] = field(default_factory=list)  # those holding rows


def evaluate(
    facts: Facts,
    *,
    slot: str,
    publication: str,
    allow_nonempty: bool,
    ours: Ownership = Ownership(),
) -> list[str]:
    """Problems that stop the snapshot, each with the fix; empty when it can go ahead."""
    p: list[str] = []
    if facts.wal_level != "logical":
        p.append(
            f"source wal_level is {facts.wal_level or 'unknown'}: run ALTER SYSTEM SET "
            "wal_level = logical; and restart the source server"
        )
    if facts.pg_dump_major and facts.source_version // 10000 > facts.pg_dump_major:
        p.append(
            f"the source runs PostgreSQL {facts.source_version // 10000} but pg_dump is "
            f"version {facts.pg_dump_major}: install the postgresql-client package of the "
            "source's version or newer"
        )
    if not (facts.superuser or facts.replication_role):
        p.append(
            "the source role lacks REPLICATION: ALTER ROLE <role> REPLICATION; "
            "(or connect as a superuser)"
        )
    elif facts.replication_connect_error:
        p.append(
            f"cannot open a replication connection to the source "
            f"({facts.replication_connect_error}): allow it in pg_hba.conf with a "
            "'host replication <role> <address> …' line (or 'all' databases) and reload"
        )
    if not facts.tables:
        p.append("no table to migrate: check CDCSYNC_SCHEMAS / CDCSYNC_TABLES")
    if facts.unreadable:
        p.extend(
            f"no SELECT privilege on source table {t}: GRANT SELECT ON {t} TO <role>;"
            for t in facts.unreadable
        )
    if not facts.can_create_publication and not ours.publication:
        p.append(
            "the source role cannot create a publication: GRANT CREATE ON DATABASE <db> "
            "TO <role>; (or connect as a superuser)"
        )
    if facts.not_owned and not ours.publication:
        shown = ", ".join(facts.not_owned[:10])
        p.append(
            f"the source role does not own {len(facts.not_owned)} table(s) ({shown}), and only "
            "an owner can add a table to a publication: connect as the owner or a superuser"
        )
    for t in facts.no_replica_identity:
        p.append(
            f"source table {t} has no primary key and no replica identity: once published, "
            f"its UPDATEs and DELETEs would fail on the source. Run ALTER TABLE {t} REPLICA "
            "IDENTITY FULL; (or add a primary key)"
        )
    for t in facts.unlogged:
        p.append(
            f"source table {t} is UNLOGGED, so its changes cannot be streamed: ALTER TABLE {t} "
            "SET LOGGED; or leave it out with CDCSYNC_TABLES"
        )
    if facts.slot_exists and not ours.slot:
        p.append(
            f"replication slot {slot} already exists on the source: choose another "
            f"CDCSYNC_MIGRATION_ID, or drop it if it is a leftover "
            f"(SELECT pg_drop_replication_slot('{slot}');)"
        )
    if facts.publication_exists and not ours.publication:
        p.append(
            f"publication {publication} already exists on the source: choose another "
            "CDCSYNC_MIGRATION_ID, or drop it if it is a leftover "
            f"(DROP PUBLICATION {publication};)"
        )
    if not ours.slot:
        if facts.slots_used >= facts.max_replication_slots:
            p.append(
                f"all {facts.max_replication_slots} replication slots of the source are in "
                "use: raise max_replication_slots (restart needed) or drop an unused slot"
            )
        if facts.senders_used >= facts.max_wal_senders:
            p.append(
                f"all {facts.max_wal_senders} WAL senders of the source are busy: raise "
                "max_wal_senders (restart needed)"
            )
    if facts.target_present and facts.target_missing:
        p.append(
            f"the target has {len(facts.target_present)} of the migrated tables but not "
            f"{len(facts.target_missing)} others ({', '.join(facts.target_missing[:5])}): "
            "create all of them, or none and let cdcsync copy the schema"
        )
    if facts.target_missing and not facts.target_can_create:
        p.append(
            "the target role cannot create schemas: GRANT CREATE ON DATABASE <db> TO <role>; "
            "or create the schema on the target beforehand"
        )
    if not facts.target_can_set_replica_role:
        p.append(
            "the target role cannot SET session_replication_role (needed to load rows before "
            "foreign keys and to pass the write fence): connect as a superuser, or "
            "GRANT SET ON PARAMETER session_replication_role TO <role>;"
        )
    for table, cols in facts.target_missing_columns.items():
        p.append(
            f"target table {table} lacks column(s) {', '.join(cols)} that the source has: "
            "add them on the target"
        )
    if not allow_nonempty:
        p.extend(
            f"target table {t} is not empty: empty it, or pass --allow-nonempty-target to "
            "have cdcsync empty (TRUNCATE) it before the copy"
            for t in facts.target_nonempty
            if t not in ours.target_tables
        )
    for dst, src in facts.rename_taken.items():
        held = "holds rows" if dst in facts.rename_taken_nonempty else "exists"
        p.append(
            f"target table {dst} already {held}, and the plan renames {src} to it "
            f"(tables.{src}.rename): the snapshot creates {dst} by renaming its copy of "
            f"{src} and would fail there after the copy. Move it out of the way on the "
            f"target (DROP TABLE {dst}; once its rows are safe), or rename {src} to another "
            "name in the plan"
        )
    for ext, cols in facts.missing_extensions.items():
        p.append(
            f"extension {ext} (used by {', '.join(cols[:5])}) is not available on the target: "
            "install its package on the target server"
        )
    return p


def pg_dump_major(pg_dump: str) -> int:
    done = subprocess.run([pg_dump, "--version"], capture_output=True, text=True, check=False)
    match = re.search(r"(\d+)(?:\.\d+)?", done.stdout)
    return int(match.group(1)) if match else 0


def _setting(conn: psycopg.Connection[Any], name: str) -> str:
    row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
    return str(row[0]) if row else ""


def gather(
    source: psycopg.Connection[Any],
    target: psycopg.Connection[Any],
    *,
    source_dsn: str,
    tables: Sequence[TableId],
    infos: Sequence[TableInfo],
    slot: str,
    publication: str,
    pg_dump: str,
    plan: plan_mod.Plan = plan_mod.EMPTY,
) -> Facts:
    """Read the facts :func:`evaluate` judges; changes nothing on either side.

    ``tables`` are the source's names; ``plan`` says where each lands on the target."""
    f = Facts()
    f.source_version = int(_setting(source, "server_version_num") or 0)
    f.pg_dump_major = pg_dump_major(pg_dump)
    f.wal_level = _setting(source, "wal_level")
    row = source.execute(
        "SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    f.superuser, f.replication_role = (bool(row[0]), bool(row[1])) if row else (False, False)
    f.max_replication_slots = int(_setting(source, "max_replication_slots") or 0)
    f.max_wal_senders = int(_setting(source, "max_wal_senders") or 0)
    used = source.execute(
        "SELECT (SELECT count(*) FROM pg_replication_slots), "
        "(SELECT count(*) FROM pg_stat_replication)"
    ).fetchone()
    if used:
        f.slots_used, f.senders_used = int(used[0]), int(used[1])
    can = source.execute("SELECT has_database_privilege(current_database(), 'CREATE')").fetchone()
    f.can_create_publication = f.superuser or bool(can and can[0])
    f.tables = [str(t) for t in tables]
    for info in infos:
        name = str(info.table)
        readable = source.execute(
            "SELECT has_table_privilege(%s, 'SELECT')", (catalog.qualified(info.table),)
        ).fetchone()
        if not readable or not readable[0]:
            f.unreadable.append(name)
        owned = source.execute(
            "SELECT pg_has_role(relowner, 'USAGE') FROM pg_class WHERE oid = to_regclass(%s)",
            (catalog.qualified(info.table),),
        ).fetchone()
        if not f.superuser and not (owned and owned[0]):
            f.not_owned.append(name)
        for leaf in info.leaves:
            if leaf.replica_identity == "n" or (
                leaf.replica_identity == "d" and not leaf.has_primary_key
            ):
                f.no_replica_identity.append(str(leaf.relation))
            if leaf.persistence == "u":
                f.unlogged.append(str(leaf.relation))
    f.slot_exists = bool(
        source.execute(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
    )
    f.publication_exists = bool(
        source.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)).fetchone()
    )
    if f.superuser or f.replication_role:
        f.replication_connect_error = _try_replication(source_dsn)

    # Target.
    trow = target.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    target_super = bool(trow and trow[0])
    can_create = target.execute(
        "SELECT has_database_privilege(current_database(), 'CREATE')"
    ).fetchone()
    f.target_can_create = target_super or bool(can_create and can_create[0])
    f.target_can_set_replica_role = target_super or can_set_replica_role(target)
    for info in infos:
        name = str(info.table)
        present = catalog.target_columns(target, info.table)
        if present is None:
            f.target_missing.append(name)
            continue
        f.target_present.append(name)
        missing = [c.name for c in info.columns if c.name not in present]
        if missing:
            f.target_missing_columns[name] = missing
        if catalog.has_rows(target, info.table):
            f.target_nonempty.append(name)
    for src, (dst, kind) in rename_destinations(target, plan, tables).items():
        f.rename_taken[str(dst)] = str(src)
        if kind in ("r", "p") and catalog.has_rows(target, dst):
            f.rename_taken_nonempty.append(str(dst))
    if f.target_missing:
        available = {str(r[0]) for r in target.execute("SELECT name FROM pg_available_extensions")}
        for ext, cols in catalog.extension_types_used(source, tables).items():
            if ext not in available:
                f.missing_extensions[ext] = cols
    source.rollback()
    target.rollback()
    return f


def rename_destinations(
    target: psycopg.Connection[Any], plan: plan_mod.Plan, tables: Sequence[TableId]
) -> dict[TableId, tuple[TableId, str]]:
    """Source table → (its rename destination, the ``relkind`` there), for the ``tables``
    whose destination name the target already uses (by a table or any other relation)."""
    wanted = {t: d for t, d in plan.renames.items() if t in set(tables)}
    if not wanted:
        return {}
    rows = target.execute(
        "SELECT d, c.relkind FROM unnest(%s::text[]) d JOIN pg_class c ON c.oid = to_regclass(d)",
        ([catalog.qualified(d) for d in wanted.values()],),
    ).fetchall()
    kinds = {str(d): str(kind) for d, kind in rows}
    return {
        t: (d, kinds[catalog.qualified(d)])
        for t, d in wanted.items()
        if catalog.qualified(d) in kinds
    }


def _try_replication(dsn: str) -> str | None:
    try:
        with psycopg.connect(
            psycopg.conninfo.make_conninfo(dsn, replication="database"), autocommit=True
        ) as conn:
            conn.execute("IDENTIFY_SYSTEM")
    except psycopg.Error as exc:
        text = str(exc).strip()
        return text.splitlines()[-1] if text else type(exc).__name__
    return None


def can_set_replica_role(conn: psycopg.Connection[Any]) -> bool:
    """Whether SET session_replication_role is allowed (tried in a savepoint, undone)."""
    try:
        with conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")
            raise _Rollback
    except _Rollback:
        return True
    except psycopg.errors.InsufficientPrivilege:
        return False


class _Rollback(Exception):
    pass
