"""Facts for ``cdcsync assess``, read from both databases' catalogs; nothing is changed.

Each side is read in one READ ONLY transaction that is rolled back, so even a bug here
cannot write. Data audits (duplicates, orphaned foreign-key rows, odd dates, NULLs) scan
tables, so they run only on tables under ``audit_max_bytes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from cdcsync.adapters.pg import connect
from cdcsync.config import Settings
from cdcsync.core import plan as plan_mod
from cdcsync.core.events import TableId
from cdcsync.core.findings import (
    ColumnFacts,
    Facts,
    ForeignKeyFacts,
    LeafFacts,
    PlanCheck,
    SequenceFacts,
    ServerFacts,
    SlotFacts,
    TableFacts,
    TargetTableFacts,
    TriggerFacts,
)
from cdcsync.snapshot import catalog
from cdcsync.snapshot.preflight import can_set_replica_role, rename_destinations

DEFAULT_AUDIT_MAX_BYTES = 1024**3


def discover(settings: Settings, *, audit_max_bytes: int = DEFAULT_AUDIT_MAX_BYTES) -> Facts:
    """Read every fact :func:`cdcsync.core.findings.evaluate` judges."""
    settings.require("source_dsn", "target_dsn")
    source_dsn = settings.source_conninfo()
    with (
        connect(source_dsn, "source") as source,
        connect(settings.target_conninfo(), "target") as target,
    ):
        source.read_only = True
        target.read_only = True
        try:
            facts = Facts(audit_max_bytes=audit_max_bytes)
            facts.source = server_facts(source)
            if facts.source.superuser or facts.source.replication:
                facts.source.replication_connect_error = _try_replication(source_dsn)
            facts.target = server_facts(target)
            plan = plan_mod.load(settings.plan) if settings.plan else plan_mod.EMPTY
            tables = plan.included(catalog.list_tables(source, settings))
            in_scope = {str(t) for t in tables}
            facts.tables = [
                table_facts(source, t, in_scope, audit_max_bytes, superuser=facts.source.superuser)
                for t in tables
            ]
            taken = rename_taken(target, plan, tables)
            for tf in facts.tables:
                tf.target = target_table_facts(
                    target, source, tf, audit=tf.audited, on_target=taken.get(tf.name)
                )
            facts.sequences = sequence_facts(source, {t.schema for t in tables})
            facts.extension_columns = catalog.extension_types_used(source, tables)
            facts.plan_checks = plan_checks(source, plan, facts.tables, audit_max_bytes)
        finally:
            source.rollback()
            target.rollback()
    return facts


_Query = str | sql.SQL | sql.Composed


def plan_checks(
    conn: psycopg.Connection[Any],
    plan: plan_mod.Plan,
    tables: list[TableFacts],
    audit_max_bytes: int,
) -> list[PlanCheck]:
    """Try the plan's casts on every (filtered) source row, and count what filters keep.

    Each try runs in a savepoint of the read-only transaction, so a refused value is
    reported with PostgreSQL's own message and the next check goes on.
    """
    out: list[PlanCheck] = []
    sizes = {t.name: t.total_bytes for t in tables}
    for table, tp in plan.tables.items():
        name = f"{table.schema}.{table.name}"
        if not tp.include or name not in sizes:
            continue
        rel = sql.Identifier(table.schema, table.name)
        where = sql.SQL(" WHERE ({})").format(sql.SQL(tp.filter)) if tp.filter else sql.SQL("")
        audited = sizes[name] <= audit_max_bytes
        if tp.filter:
            check = PlanCheck(name, "filter", audited=audited)
            if audited:
                check.failure = _try(conn, sql.SQL("SELECT count(*) FROM {}{}").format(rel, where))
                if check.failure is None:
                    check.rows = int(
                        _one(conn, sql.SQL("SELECT count(*) FROM {}{}").format(rel, where)) or 0
                    )
                    check.total = int(
                        _one(conn, sql.SQL("SELECT count(*) FROM {}").format(rel)) or 0
                    )
            out.append(check)
        for col in tp.columns.values():
            if not col.cast or col.drop:
                continue
            check = PlanCheck(name, "cast", col.name, col.cast, audited=audited)
            if audited:
                check.failure = _try(
                    conn,
                    sql.SQL("SELECT count(({})::text::{}) FROM {}{}").format(
                        sql.Identifier(col.name), sql.SQL(col.cast), rel, where
                    ),
                )
            out.append(check)
    return out


def _try(conn: psycopg.Connection[Any], query: sql.Composed) -> str | None:
    """None if ``query`` runs, else the first line of PostgreSQL's error."""
    try:
        with conn.transaction():
            conn.execute(query)
    except psycopg.Error as exc:
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__
    return None


def _one(conn: psycopg.Connection[Any], query: _Query, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


def server_facts(conn: psycopg.Connection[Any]) -> ServerFacts:
    s = ServerFacts()
    s.version = str(_one(conn, "SHOW server_version"))
    s.version_num = int(_one(conn, "SHOW server_version_num"))
    s.wal_level = str(_one(conn, "SHOW wal_level"))
    user = str(_one(conn, "SELECT current_user"))
    s.role = sql.Identifier(user).as_string(conn)
    row = conn.execute(
        "SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    s.superuser, s.replication = (bool(row[0]), bool(row[1])) if row else (False, False)
    s.can_set_replica_role = s.superuser or can_set_replica_role(conn)
    s.max_replication_slots = int(_one(conn, "SHOW max_replication_slots"))
    s.max_wal_senders = int(_one(conn, "SHOW max_wal_senders"))
    s.slots_used = int(_one(conn, "SELECT count(*) FROM pg_replication_slots"))
    s.senders_used = int(_one(conn, "SELECT count(*) FROM pg_stat_replication"))
    # In MB whatever the unit it was set in; -1 stays -1.
    s.max_slot_wal_keep_size_mb = int(
        _one(conn, "SELECT setting::bigint FROM pg_settings WHERE name = 'max_slot_wal_keep_size'")
    )
    for name, plugin, active, retained, status in conn.execute(
        "SELECT slot_name, coalesce(plugin, ''), active, "
        "coalesce(pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() "
        "ELSE pg_current_wal_lsn() END, restart_lsn), 0)::bigint, coalesce(wal_status, '') "
        "FROM pg_replication_slots ORDER BY 1"
    ).fetchall():
        s.slots.append(
            SlotFacts(
                str(name),
                sql.Literal(str(name)).as_string(conn),
                str(plugin),
                bool(active),
                int(retained),
                str(status),
            )
        )
    s.extensions = {
        str(n): str(v)
        for n, v in conn.execute(
            "SELECT extname, extversion FROM pg_extension WHERE extname <> 'plpgsql'"
        ).fetchall()
    }
    s.available_extensions = sorted(
        str(r[0]) for r in conn.execute("SELECT name FROM pg_available_extensions")
    )
    return s


def _try_replication(dsn: str) -> str | None:
    """Why a replication connection is refused (pg_hba.conf), or None."""
    try:
        with psycopg.connect(
            psycopg.conninfo.make_conninfo(dsn, replication="database"), autocommit=True
        ) as conn:
            conn.execute("IDENTIFY_SYSTEM")
    except psycopg.Error as exc:
        text = str(exc).strip()
        return text.splitlines()[-1] if text else type(exc).__name__
    return None


def table_facts(
    conn: psycopg.Connection[Any],
    table: TableId,
    in_scope: set[str],
    audit_max_bytes: int,
    *,
    superuser: bool = False,
) -> TableFacts:
    oid = int(_one(conn, "SELECT to_regclass(%s)::oid", (catalog.qualified(table),)))
    ident = sql.Identifier(table.schema, table.name)
    row = conn.execute(
        """
        SELECT c.relkind = 'p', has_table_privilege(c.oid, 'SELECT'),
               pg_has_role(c.relowner, 'USAGE')
        FROM pg_class c WHERE c.oid = %s
        """,
        (oid,),
    ).fetchone()
    assert row is not None
    partitioned, readable, owned = bool(row[0]), bool(row[1]), bool(row[2]) or superuser
    leaves: list[LeafFacts] = []
    total = toast = rows = 0
    for schema, name, ident_, pk, persistence, t_bytes, toast_bytes, tuples in conn.execute(
        """
        SELECT n.nspname, c.relname, c.relreplident,
               EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
               c.relpersistence, pg_total_relation_size(c.oid),
               CASE WHEN c.reltoastrelid = 0 THEN 0
                    ELSE pg_total_relation_size(c.reltoastrelid) END,
               greatest(c.reltuples, 0)::bigint
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'r' AND c.oid IN (
            SELECT relid FROM pg_partition_tree(%s::oid::regclass) WHERE isleaf
            UNION ALL SELECT %s::oid)
        ORDER BY 1, 2
        """,
        (oid, oid),
    ).fetchall():
        leaves.append(
            LeafFacts(
                f"{schema}.{name}",
                sql.Identifier(str(schema), str(name)).as_string(conn),
                str(ident_),
                bool(pk),
                str(persistence),
            )
        )
        total += int(t_bytes)
        toast += int(toast_bytes)
        rows += int(tuples)
    pk_cols = [
        str(r[0])
        for r in conn.execute(
            "SELECT a.attname FROM pg_index i "
            "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
            "WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.ord",
            (oid,),
        )
    ]
    audited = readable and total <= audit_max_bytes
    tf = TableFacts(
        name=str(table),
        ident=ident.as_string(conn),
        partitioned=partitioned,
        total_bytes=total,
        toast_bytes=toast,
        rows_estimate=rows,
        primary_key=pk_cols,
        leaves=leaves,
        columns=_columns(conn, oid),
        readable=readable,
        owned=owned,
        audited=audited,
    )
    tf.foreign_keys = _foreign_keys(conn, oid, ident, in_scope, audit=audited)
    tf.triggers = _triggers(conn, oid)
    if audited:
        for col in tf.columns:
            if col.base_type == "date" and not col.is_array:
                c = sql.Identifier(col.name)
                col.odd_dates = int(
                    _one(
                        conn,
                        sql.SQL(
                            "SELECT count(*) FROM {} WHERE {} IN ('infinity', '-infinity') "
                            "OR {} < '0001-01-01'"
                        ).format(ident, c, c),
                    )
                )
        if not tf.keyed:
            tf.duplicate_rows = int(
                _one(
                    conn,
                    sql.SQL(
                        "SELECT coalesce(sum(n), 0) FROM (SELECT count(*) AS n FROM {} AS r "
                        "GROUP BY r::text HAVING count(*) > 1) d"
                    ).format(ident),
                )
            )
    return tf


def _columns(conn: psycopg.Connection[Any], oid: int) -> list[ColumnFacts]:
    out = []
    for name, type_name, base, elem, typtype, is_array, generated, not_null in conn.execute(
        """
        WITH RECURSIVE dom(attnum, oid, depth) AS (
            SELECT a.attnum, a.atttypid, 0 FROM pg_attribute a
            WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
            UNION ALL
            SELECT dom.attnum, t.typbasetype, dom.depth + 1 FROM dom
            JOIN pg_type t ON t.oid = dom.oid WHERE t.typtype = 'd'
        ), base AS (
            SELECT DISTINCT ON (attnum) attnum, oid FROM dom ORDER BY attnum, depth DESC
        )
        SELECT a.attname, format_type(a.atttypid, a.atttypmod), bt.typname,
               coalesce(et.typname, ''), coalesce(et.typtype, bt.typtype),
               bt.typcategory = 'A' AND bt.typelem <> 0, a.attgenerated <> '', a.attnotnull
        FROM pg_attribute a
        JOIN base ON base.attnum = a.attnum
        JOIN pg_type bt ON bt.oid = base.oid
        LEFT JOIN pg_type et ON et.oid = bt.typelem AND bt.typcategory = 'A'
        WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
        """,
        (oid, oid),
    ).fetchall():
        out.append(
            ColumnFacts(
                name=str(name),
                ident=sql.Identifier(str(name)).as_string(conn),
                type=str(type_name),
                base_type=str(base),
                element_type=str(elem),
                typtype=str(typtype),
                is_array=bool(is_array),
                generated=bool(generated),
                not_null=bool(not_null),
            )
        )
    return out


def _foreign_keys(
    conn: psycopg.Connection[Any],
    oid: int,
    ident: sql.Identifier,
    in_scope: set[str],
    *,
    audit: bool,
) -> list[ForeignKeyFacts]:
    out = []
    for name, cols, ref_schema, ref_name, ref_cols, validated in conn.execute(
        """
        SELECT con.conname,
               array(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(n, o)
                     JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n
                     ORDER BY k.o),
               rn.nspname, rc.relname,
               array(SELECT a.attname FROM unnest(con.confkey) WITH ORDINALITY k(n, o)
                     JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n
                     ORDER BY k.o),
               con.convalidated
        FROM pg_constraint con
        JOIN pg_class rc ON rc.oid = con.confrelid
        JOIN pg_namespace rn ON rn.oid = rc.relnamespace
        WHERE con.conrelid = %s AND con.contype = 'f' AND con.conparentid = 0
        ORDER BY 1
        """,
        (oid,),
    ).fetchall():
        cols_l, ref_l = [str(c) for c in cols], [str(c) for c in ref_cols]
        ref = sql.Identifier(str(ref_schema), str(ref_name))
        # MATCH SIMPLE: a row with any NULL in the key references nothing.
        query = sql.SQL(
            "SELECT c.* FROM {} AS c WHERE {} AND NOT EXISTS (SELECT 1 FROM {} AS p WHERE {})"
        ).format(
            ident,
            sql.SQL(" AND ").join(
                sql.SQL("{} IS NOT NULL").format(sql.Identifier("c", c)) for c in cols_l
            ),
            ref,
            sql.SQL(" AND ").join(
                sql.SQL("{} = {}").format(sql.Identifier("p", r), sql.Identifier("c", c))
                for c, r in zip(cols_l, ref_l, strict=True)
            ),
        )
        fk = ForeignKeyFacts(
            name=str(name),
            ident=sql.Identifier(str(name)).as_string(conn),
            columns=cols_l,
            references=f"{ref_schema}.{ref_name}",
            ref_columns=ref_l,
            ref_in_scope=f"{ref_schema}.{ref_name}" in in_scope,
            validated=bool(validated),
            orphan_query=query.as_string(conn) + ";",
        )
        readable = bool(_one(conn, "SELECT has_table_privilege(%s::oid, 'SELECT')", (oid,)))
        ref_readable = bool(
            _one(conn, "SELECT has_table_privilege(%s, 'SELECT')", (ref.as_string(conn),))
        )
        if audit and readable and ref_readable:
            fk.orphans = int(_one(conn, sql.SQL("SELECT count(*) FROM ({}) o").format(query)))
        out.append(fk)
    return out


def _triggers(conn: psycopg.Connection[Any], oid: int) -> list[TriggerFacts]:
    return [
        TriggerFacts(str(n), str(e))
        for n, e in conn.execute(
            "SELECT tgname, tgenabled FROM pg_trigger WHERE tgrelid = %s AND NOT tgisinternal "
            "ORDER BY 1",
            (oid,),
        )
    ]


def rename_taken(
    target: psycopg.Connection[Any], plan: plan_mod.Plan, tables: Sequence[TableId]
) -> dict[str, TableId]:
    """``schema.name`` of each source table whose rename destination is already a table on
    the target → that destination: the snapshot would fail renaming its copy onto it, so
    it is the target table to judge (its rows, above all)."""
    return {
        f"{src.schema}.{src.name}": dst
        for src, (dst, kind) in rename_destinations(target, plan, tables).items()
        if kind in ("r", "p")
    }


def target_table_facts(
    target: psycopg.Connection[Any],
    source: psycopg.Connection[Any],
    tf: TableFacts,
    *,
    audit: bool,
    on_target: TableId | None = None,
) -> TargetTableFacts | None:
    """The pre-created target table, or None when the target does not have it.

    ``on_target``: the name to read it under on the target, when not the source's (a
    rename destination that already exists, see :func:`rename_taken`)."""
    source_table = TableId(*tf.name.split(".", 1))
    table = on_target or source_table
    columns = catalog.target_columns(target, table)
    if columns is None:
        return None
    oid = int(_one(target, "SELECT to_regclass(%s)::oid", (catalog.qualified(table),)))
    source_cols = {c.name for c in tf.columns}
    not_null, required = [], []
    for name, has_default, generated, identity in target.execute(
        "SELECT a.attname, a.atthasdef, a.attgenerated <> '', a.attidentity <> '' "
        "FROM pg_attribute a WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped "
        "AND a.attnotnull ORDER BY a.attnum",
        (oid,),
    ).fetchall():
        not_null.append(str(name))
        if str(name) not in source_cols and not (has_default or generated or identity):
            required.append(str(name))
    tt = TargetTableFacts(
        rows=catalog.has_rows(target, table),
        columns=columns,
        not_null=not_null,
        required_extra=required,
        triggers=_triggers(target, oid),
    )
    if audit:
        ident = sql.Identifier(source_table.schema, source_table.name)
        for col in tf.columns:
            if col.name in not_null and not col.not_null:
                col.nulls = int(
                    _one(
                        source,
                        sql.SQL("SELECT count(*) FROM {} WHERE {} IS NULL").format(
                            ident, sql.Identifier(col.name)
                        ),
                    )
                )
    return tt


def sequence_facts(
    conn: psycopg.Connection[Any], schemas: Sequence[str] | set[str]
) -> list[SequenceFacts]:
    rows = conn.execute(
        """
        SELECT n.nspname || '.' || c.relname,
               (SELECT tn.nspname || '.' || tc.relname || '.' || a.attname
                FROM pg_depend d
                JOIN pg_class tc ON tc.oid = d.refobjid
                JOIN pg_namespace tn ON tn.oid = tc.relnamespace
                JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                  AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
                LIMIT 1)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'S' AND n.nspname = ANY(%s) ORDER BY 1
        """,
        (sorted(schemas),),
    ).fetchall()
    return [SequenceFacts(str(n), None if o is None else str(o)) for n, o in rows]
