"""What the source holds: migrated tables, their columns, keys, partitions and sequences.

Read from the system catalogs, never from ``information_schema`` (which hides what the
role cannot see instead of saying so). Names are returned unquoted; SQL built from them
always goes through :mod:`psycopg.sql`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from cdcsync.config import Settings
from cdcsync.core.events import TableId
from cdcsync.errors import ConfigError
from cdcsync.snapshot.chunking import Bound

#: First OID handed to user objects: below it, types are built in and have the same
#: OID (and binary format) in every cluster of the same major version.
FIRST_NORMAL_OID = 16384

SYSTEM_SCHEMAS = ("pg_catalog", "information_schema")


@dataclass(frozen=True)
class Column:
    name: str
    type_name: str  # format_type(), for messages and for comparing with the target
    binary_ok: bool  # binary COPY carries this type's values between clusters unchanged


@dataclass(frozen=True)
class Leaf:
    """A heap the copy reads: the table itself, or one leaf partition of it."""

    relation: TableId
    blocks: int
    bytes: int
    rows: int  # planner estimate, for progress only
    replica_identity: str  # pg_class.relreplident: d(efault), n(othing), f(ull), i(ndex)
    has_primary_key: bool
    persistence: str  # p(ermanent), u(nlogged), t(emporary)
    filenode: int


@dataclass(frozen=True)
class TableInfo:
    table: TableId
    partitioned: bool
    columns: tuple[Column, ...]  # copied columns: not dropped, not generated
    primary_key: tuple[str, ...]
    leaves: tuple[Leaf, ...]

    @property
    def blocks(self) -> int:
        return sum(leaf.blocks for leaf in self.leaves)

    @property
    def bytes(self) -> int:
        return sum(leaf.bytes for leaf in self.leaves)

    @property
    def rows(self) -> int:
        return sum(leaf.rows for leaf in self.leaves)

    @property
    def binary(self) -> bool:
        return all(c.binary_ok for c in self.columns)


def qualified(table: TableId) -> str:
    """``schema.name`` as a regclass literal would need it (for ``to_regclass`` and friends)."""
    return sql.Identifier(table.schema, table.name).as_string(None)


def list_tables(conn: psycopg.Connection[Any], settings: Settings) -> list[TableId]:
    """Migrated tables: every ordinary or partitioned root table in scope.

    The default scope is every table of every non-system schema; ``schemas`` and
    ``tables`` narrow it, and each name given there must exist.
    """
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND c.relpersistence <> 't'
          AND n.nspname <> ALL(%s) AND n.nspname NOT LIKE 'pg\\_%%'
          AND n.nspname <> %s
          AND NOT EXISTS (SELECT 1 FROM pg_depend d
                          WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                            AND d.deptype = 'e')
        ORDER BY 1, 2
        """,
        (list(SYSTEM_SCHEMAS), settings.state_schema),
    ).fetchall()
    tables = [TableId(str(s), str(t)) for s, t in rows]
    if settings.schemas:
        schemas = {
            str(r[0])
            for r in conn.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s)", (settings.schemas,)
            )
        }
        missing = [s for s in settings.schemas if s not in schemas]
        if missing:
            raise ConfigError(
                f"schema(s) {', '.join(missing)} not found on the source (CDCSYNC_SCHEMAS)"
            )
        tables = [t for t in tables if t.schema in settings.schemas]
    if settings.tables:
        by_name = {str(t): t for t in tables}
        missing = [name for name in settings.tables if name not in by_name]
        if missing:
            raise ConfigError(
                f"table(s) {', '.join(missing)} not found on the source among ordinary and "
                "partitioned root tables in scope (CDCSYNC_TABLES takes schema.table, unquoted)"
            )
        tables = sorted(by_name[name] for name in set(settings.tables))
    return tables


def describe(conn: psycopg.Connection[Any], tables: Sequence[TableId]) -> list[TableInfo]:
    """Columns, primary key and heaps of each table, in the order given."""
    out: list[TableInfo] = []
    for table in tables:
        row = conn.execute(
            "SELECT c.oid, c.relkind FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
            (table.schema, table.name),
        ).fetchone()
        if row is None:
            raise ConfigError(f"table {table} no longer exists on the source")
        oid, relkind = int(row[0]), str(row[1])
        cols = conn.execute(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid "
            "FROM pg_attribute a WHERE a.attrelid = %s AND a.attnum > 0 "
            "AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum",
            (oid,),
        ).fetchall()
        safe = binary_safe_types(conn, {int(c[2]) for c in cols})
        pk = conn.execute(
            "SELECT a.attname FROM pg_index i "
            "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
            "WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.ord",
            (oid,),
        ).fetchall()
        leaves = conn.execute(
            """
            SELECT n.nspname, c.relname,
                   CASE WHEN c.relkind = 'r'
                        THEN pg_relation_size(c.oid) / current_setting('block_size')::int
                        ELSE 0 END,
                   CASE WHEN c.relkind = 'r' THEN pg_table_size(c.oid) ELSE 0 END,
                   greatest(c.reltuples, 0)::bigint, c.relreplident,
                   EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
                   c.relpersistence, pg_relation_filenode(c.oid)
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind = 'r' AND c.oid IN (
                SELECT relid FROM pg_partition_tree(%s::oid::regclass) WHERE isleaf
                UNION ALL SELECT %s::oid)
            ORDER BY 1, 2
            """,
            (oid, oid),
        ).fetchall()
        out.append(
            TableInfo(
                table=table,
                partitioned=relkind == "p",
                columns=tuple(Column(str(n), str(t), safe[int(o)]) for n, t, o in cols),
                primary_key=tuple(str(r[0]) for r in pk),
                leaves=tuple(
                    Leaf(
                        TableId(str(r[0]), str(r[1])),
                        int(r[2]),
                        int(r[3]),
                        int(r[4]),
                        str(r[5]),
                        bool(r[6]),
                        str(r[7]),
                        int(r[8] or 0),
                    )
                    for r in leaves
                ),
            )
        )
    conn.rollback()
    return out


@dataclass(frozen=True)
class TypeFacts:
    oid: int
    typtype: str  # b(ase), c(omposite), d(omain), e(num), p(seudo), r(ange), m(ultirange)
    base: int  # domain's base type
    element: int  # array's element type
    subtype: int  # range's subtype
    is_array: bool
    has_binary_io: bool


def is_binary_safe(oid: int, types: Mapping[int, TypeFacts]) -> bool:
    """Whether binary COPY output of this type is valid binary input on another cluster.

    Built-in types are (same OIDs, same formats). Enums travel as their label. Domains
    and ranges are as safe as what they are built on. Arrays, composites and
    multiranges of user types embed the element's OID, which differs between clusters,
    and extension types' binary formats are theirs to define: those go as text.
    """
    facts = types.get(oid)
    if facts is None or not facts.has_binary_io:
        return False
    if oid < FIRST_NORMAL_OID:
        return True
    if facts.typtype == "e":
        return True
    if facts.typtype == "d":
        return is_binary_safe(facts.base, types)
    if facts.typtype == "r":
        return is_binary_safe(facts.subtype, types)
    return False


def binary_safe_types(conn: psycopg.Connection[Any], oids: Iterable[int]) -> dict[int, bool]:
    """:func:`is_binary_safe` for each OID, reading the types it depends on."""
    wanted = sorted(set(oids))
    rows = conn.execute(
        """
        WITH RECURSIVE t(oid) AS (
            SELECT unnest(%s::oid[])
            UNION
            SELECT v.dep FROM t JOIN pg_type p ON p.oid = t.oid
            LEFT JOIN pg_range r ON r.rngtypid = p.oid
            CROSS JOIN LATERAL (VALUES (p.typbasetype), (p.typelem), (r.rngsubtype)) AS v(dep)
            WHERE v.dep IS NOT NULL AND v.dep <> 0
        )
        SELECT p.oid, p.typtype, p.typbasetype, p.typelem, coalesce(r.rngsubtype, 0),
               p.typcategory = 'A', p.typsend <> 0 AND p.typreceive <> 0
        FROM t JOIN pg_type p ON p.oid = t.oid LEFT JOIN pg_range r ON r.rngtypid = p.oid
        """,
        (wanted,),
    ).fetchall()
    types = {
        int(r[0]): TypeFacts(
            int(r[0]), str(r[1]), int(r[2]), int(r[3]), int(r[4]), bool(r[5]), bool(r[6])
        )
        for r in rows
    }
    return {oid: is_binary_safe(oid, types) for oid in wanted}


@dataclass(frozen=True)
class KeySample:
    keys: list[Bound]  # sampled key values as text, in key order
    blocks: list[int]  # the heap block each of them was found in, same order


def sample_keys(
    conn: psycopg.Connection[Any], leaf: Leaf, key: Sequence[str], pieces: int
) -> KeySample:
    """A sample of a heap's keys in key order, with where each sits in the heap.

    TABLESAMPLE SYSTEM reads whole blocks, so a block is the unit of the sample: about
    25·pieces² of them put each boundary within ~10% of a piece of its ideal place,
    capped at 5,000 blocks (40 MB) for large tables, whose many chunks balance the
    workers anyway. Sorted by the database, so its ordering and collations decide.
    """
    if pieces <= 1 or leaf.blocks == 0:
        return KeySample([], [])
    blocks = min(leaf.blocks, 25 * pieces * pieces, max(5_000, 64 * pieces))
    percent = min(100.0, 100.0 * blocks / leaf.blocks)
    keys = sql.SQL(", ").join(map(sql.Identifier, key))
    # Ordered by the sampled columns themselves (qualified: a bare name would mean the
    # text output column, and '10' sorts before '9').
    in_order = sql.SQL(", ").join(sql.Identifier("s", k) for k in key)
    as_text = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier("s", k)) for k in key)
    rows = conn.execute(
        sql.SQL(
            "SELECT (s.ctid::text::point)[0]::bigint, {} FROM (SELECT ctid, {} FROM ONLY {} "
            "TABLESAMPLE SYSTEM ({}) REPEATABLE (7)) s ORDER BY {}"
        ).format(
            as_text,
            keys,
            sql.Identifier(leaf.relation.schema, leaf.relation.name),
            sql.Literal(percent),
            in_order,
        )
    ).fetchall()
    return KeySample([tuple(str(v) for v in r[1:]) for r in rows], [int(r[0]) for r in rows])


def target_columns(conn: psycopg.Connection[Any], table: TableId) -> dict[str, str] | None:
    """Column name → type of a target table (generated columns excluded), or None if absent."""
    row = conn.execute("SELECT to_regclass(%s)::oid", (qualified(table),)).fetchone()
    if row is None or row[0] is None:
        return None
    cols = conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod), attgenerated <> '' "
        "FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped",
        (row[0],),
    ).fetchall()
    return {str(n): (str(t) if not g else "generated") for n, t, g in cols}


def exists(conn: psycopg.Connection[Any], table: TableId) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (qualified(table),)).fetchone()
    return bool(row and row[0])


def has_rows(conn: psycopg.Connection[Any], table: TableId) -> bool:
    row = conn.execute(
        sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(table.schema, table.name))
    ).fetchone()
    return bool(row and row[0])


def sequences(conn: psycopg.Connection[Any], schemas: Iterable[str]) -> list[TableId]:
    """Sequences of the migrated schemas (identity and serial ones included)."""
    rows = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE c.relkind = 'S' AND n.nspname = ANY(%s) ORDER BY 1, 2",
        (sorted(set(schemas)),),
    ).fetchall()
    return [TableId(str(s), str(n)) for s, n in rows]


def extensions(conn: psycopg.Connection[Any]) -> dict[str, tuple[str, str]]:
    """Installed extensions: name → (schema, version); plpgsql is always there."""
    rows = conn.execute(
        "SELECT e.extname, n.nspname, e.extversion FROM pg_extension e "
        "JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname <> 'plpgsql'"
    ).fetchall()
    return {str(r[0]): (str(r[1]), str(r[2])) for r in rows}


def extension_types_used(
    conn: psycopg.Connection[Any], tables: Sequence[TableId]
) -> dict[str, list[str]]:
    """Extension name → ``table.column`` of migrated columns whose type it provides."""
    out: dict[str, list[str]] = {}
    for table in tables:
        rows = conn.execute(
            """
            SELECT DISTINCT e.extname, a.attname
            FROM pg_attribute a
            JOIN pg_type t ON t.oid = a.atttypid
            JOIN pg_depend d ON d.classid = 'pg_type'::regclass
                 AND d.objid IN (t.oid, t.typelem, t.typbasetype) AND d.deptype = 'e'
            JOIN pg_extension e ON e.oid = d.refobjid
            WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
            """,
            (qualified(table),),
        ).fetchall()
        for ext, col in rows:
            out.setdefault(str(ext), []).append(f"{table}.{col}")
    return out
