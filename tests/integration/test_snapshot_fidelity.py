"""Every value PostgreSQL users keep arrives equal, as PostgreSQL compares it.

Both sides compute, independently, an order-independent digest of each table's rows
in their text output form (canonical for every type: a lost digit, sign, microsecond
or array bound changes it), so equal digests mean equal tables.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import sql

from cdcsync.config import load_settings
from cdcsync.snapshot.progress import Progress
from cdcsync.snapshot.runner import run_snapshot
from tests.integration.workload import table_digests

pytestmark = pytest.mark.stack

SCHEMA = r"""
CREATE EXTENSION citext;
CREATE EXTENSION hstore;
CREATE SCHEMA other;
CREATE SCHEMA "Sales Dept";
CREATE SCHEMA "select";
CREATE TYPE other.mood AS ENUM ('sad', 'ok', 'happy', 'ünï cödé');
CREATE TYPE other.pair AS (a int, b text);
CREATE TYPE other.floatrange AS RANGE (subtype = float8);
CREATE DOMAIN other.posint AS int CHECK (VALUE > 0);
CREATE DOMAIN other.email AS text CHECK (VALUE LIKE '%@%');
CREATE FUNCTION other.default_note() RETURNS text IMMUTABLE LANGUAGE sql AS $$ SELECT 'n/a' $$;

CREATE TABLE other.types (
    id int PRIMARY KEY,
    n numeric, n_fixed numeric(40,20), m money, r real, d double precision,
    i2 smallint, i8 bigint, ts timestamp, tstz timestamptz, dt date, tm time, tmtz timetz,
    iv interval, b bytea, u uuid, j json, jb jsonb, x xml, e other.mood, pr other.pair,
    fr other.floatrange, dom other.posint, em other.email,
    ir int4range, nr numrange, tr tstzrange, dmr datemultirange,
    ip inet, net cidr, mac macaddr, mac8 macaddr8, bits bit(12), vbits varbit,
    pt point, ln line, ls lseg, bx box, pa path, pg polygon, ci circle,
    tsv tsvector, tsq tsquery,
    ai int[], a2 int[][], a0 int[], at text[], ae other.mood[], ad other.posint[], ajb jsonb[],
    txt text, vc varchar(20), ch char(5), bo boolean, cit citext, hs hstore,
    lsn pg_lsn, o oid, note text DEFAULT other.default_note()
);

CREATE TABLE "Sales Dept"."Orders" (
    "Order ID" bigint, "Region" text COLLATE "C", placed date NOT NULL,
    qty int NOT NULL, price numeric(12,2) NOT NULL,
    total numeric GENERATED ALWAYS AS (qty * price) STORED,
    PRIMARY KEY ("Order ID", "Region", placed)
) PARTITION BY RANGE (placed);
CREATE TABLE "Sales Dept"."Orders 2023" PARTITION OF "Sales Dept"."Orders"
    FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
CREATE TABLE "Sales Dept".orders_2024 PARTITION OF "Sales Dept"."Orders"
    FOR VALUES FROM ('2024-01-01') TO ('2025-01-01') PARTITION BY LIST ("Region");
CREATE TABLE "Sales Dept".orders_2024_eu PARTITION OF "Sales Dept".orders_2024
    FOR VALUES IN ('eu');
CREATE TABLE "Sales Dept".orders_2024_rest PARTITION OF "Sales Dept".orders_2024 DEFAULT;
CREATE TABLE "Sales Dept".orders_default PARTITION OF "Sales Dept"."Orders" DEFAULT;

CREATE TABLE other.uuid_keyed (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), v int);
CREATE TABLE other.events_nokey (kind text, amount int, note text);
ALTER TABLE other.events_nokey REPLICA IDENTITY FULL;

CREATE TABLE "select"."Table ""With"" Quotes.and dots" (
    "from" int PRIMARY KEY, "Mixed Case" text, "space col" int, "user" text
);
CREATE TABLE other."Ünïcödé" ("ключ" text PRIMARY KEY, "值" text);

CREATE TABLE other.idents (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text);
CREATE TABLE other.serials (id serial PRIMARY KEY, v text);
CREATE TABLE other.fk_child (id int PRIMARY KEY, parent_id int REFERENCES other.serials (id));
CREATE INDEX fk_child_parent ON other.fk_child (parent_id);

CREATE TABLE other.parent (id int PRIMARY KEY, v text);
CREATE TABLE other.child (extra int) INHERITS (other.parent);
ALTER TABLE other.child REPLICA IDENTITY FULL;  -- a child does not inherit the key

CREATE TABLE other.empty_keyed (id int PRIMARY KEY);
CREATE TABLE other.empty_nokey (v text);
ALTER TABLE other.empty_nokey REPLICA IDENTITY FULL;
CREATE TABLE other.parted_empty (id int PRIMARY KEY) PARTITION BY HASH (id);

CREATE VIEW other.order_totals AS
    SELECT "Region", sum(total) AS total FROM "Sales Dept"."Orders" GROUP BY 1;
"""

ROWS = r"""
INSERT INTO other.types VALUES (
    1,
    '123456789012345678901234567890.123456789012345678901234567890',
    '-0.00000000000000000001', '-92233720368547758.08', '3.4028235e38',
    '1.7976931348623157e308', -32768, -9223372036854775808,
    '4713-01-01 00:00:00 BC', '294276-12-31 23:59:59.999999+00', '5874897-12-31',
    '24:00:00', '23:59:59.999999-15:59', '-178000000 years -1 mon 00:00:00.000001',
    (SELECT decode(string_agg(lpad(to_hex(g), 2, '0'), ''), 'hex') FROM generate_series(0, 255) g),
    'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
    '{"a":1, "a":2,   "b" : [1.0e10, null]}',
    '{"n": 1.000000000000000000001, "s": "\u00e9\ud83d\ude00", "k": {"": []}}',
    '<a x="1"><![CDATA[<b>&]]> ünï</a>',
    'ünï cödé', ROW(1, 'x, "y"')::other.pair, '[-1.5,2.25)', 7, 'a@b.c',
    'empty', '(,)', '["2024-01-01 00:00+00",infinity)',
    '{[2024-01-01,2024-02-01), [2024-03-01,2024-04-01)}',
    '::ffff:1.2.3.4/128', '10.0.0.0/8', '08:00:2b:01:02:03', '08:00:2b:01:02:03:04:05',
    '101010101010', '1',
    '(1.5,-2.25)', '{1,-1,0}', '[(0,0),(1,1)]', '((1,1),(0,0))', '[(0,0),(1,1),(2,0)]',
    '((0,0),(1,1),(2,0))', '<(0,0),1.5>',
    $$'fat':1A 'cat':2B,3 'a:b'$$, 'fat & (rat | !cat)',
    '{1,NULL,3}', '{{1,2},{3,NULL}}', '[0:2]={1,2,3}', '{"a b","c,d",NULL,"","\"q\""}',
    '{happy,NULL,"ünï cödé"}', '{1,2}', ARRAY['{"a":1}'::jsonb, NULL],
    'unicode ✓ Ωmega 😀 עברית é', 'short', 'ab', true, 'MiXeD', '"a"=>"1", "b"=>NULL',
    '16/B374D848', 4294967295, DEFAULT
), (
    2, '-Infinity', 'NaN', '0', 'NaN', '-0', 0, 0, 'infinity', '-infinity', 'infinity',
    '00:00:00', '00:00:00+00', '0', '\x', '00000000-0000-0000-0000-000000000000',
    '[]', '{}', '<empty/>', 'sad', ROW(NULL, NULL)::other.pair, 'empty', 1, 'x@y',
    '[1,10)', '[-1.5,1e-20]', '(,)', '{}', '::1', '::/0', 'ff:ff:ff:ff:ff:ff',
    '00:00:00:00:00:00:00:00', '000000000001', '', '(0,0)', '{0,1,0}', '[(0,0),(0,0)]',
    '((1,1),(1,1))', '[(0,0)]', '((0,0))', '<(0,0),0>', '', '!a', '{}', '{}', '{}',
    '{}', '{}', '{}', '{}', '', '', '', false, '', '', '0/0', 0, NULL
), (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
    NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
    NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
    NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
INSERT INTO other.types (id, txt, b, jb)
    SELECT 4, string_agg(md5(g::text) || 'é', ' '),
           decode(string_agg(md5(g::text), ''), 'hex'),
           jsonb_build_object('big', string_agg(md5(g::text), ''))
    FROM generate_series(1, 50000) g;  -- 1.7 MB of text, 800 kB of bytea: TOASTed

INSERT INTO "Sales Dept"."Orders" ("Order ID", "Region", placed, qty, price)
    SELECT g, (ARRAY['eu', 'us', 'Asia', 'ZZ', 'aa'])[1 + g % 5],
           date '2023-03-01' + (g % 700), g % 13, (g % 1000) / 7.0
    FROM generate_series(1, 30000) g;
INSERT INTO other.uuid_keyed (v) SELECT g FROM generate_series(1, 20000) g;
INSERT INTO other.events_nokey
    SELECT (ARRAY['a', 'b'])[1 + g % 2], g % 3, CASE WHEN g % 4 = 0 THEN NULL ELSE 'x' END
    FROM generate_series(1, 20000) g;  -- many identical rows, no key
INSERT INTO "select"."Table ""With"" Quotes.and dots"
    VALUES (1, 'a', NULL, 'current_user'), (2, '', 0, NULL);
INSERT INTO other."Ünïcödé" VALUES ('ключ', '值'), ('', NULL);
INSERT INTO other.idents (v) SELECT 'v' || g FROM generate_series(1, 42) g;
INSERT INTO other.serials (v) SELECT 'v' || g FROM generate_series(1, 17) g;
INSERT INTO other.fk_child SELECT g, 1 + g % 17 FROM generate_series(1, 100) g;
INSERT INTO other.parent VALUES (1, 'parent row');
INSERT INTO other.child VALUES (2, 'child row', 7);
"""


def sequence_values(dsn: str) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT schemaname || '.' || sequencename, last_value FROM pg_sequences "
            "WHERE schemaname <> 'cdcsync'"
        ).fetchall()
    return dict(rows)


def test_every_type_and_shape_arrives_equal(
    source_dsn: str, target_dsn: str, topic_prefix: str
) -> None:
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute(ROWS)
    settings = load_settings(
        source_dsn=source_dsn,
        target_dsn=target_dsn,
        migration_id=topic_prefix,
        snapshot_chunk_blocks=4,  # 32 kB chunks: key, block and whole-table chunks all occur
        workers=3,
    )
    result = run_snapshot(settings, progress=Progress("quiet"))
    source, target = table_digests(source_dsn), table_digests(target_dsn)
    assert source == target
    assert len(source) == 14
    assert source["other.types"][0] == 4
    assert source["Sales Dept.Orders"][0] == 30000
    assert source["other.events_nokey"][0] == 20000
    assert source["other.parted_empty"] == (0, "")
    assert result.rows == 30000 + 20000 + 20000 + 4 + 2 + 2 + 42 + 17 + 100 + 1 + 1
    assert sequence_values(source_dsn) == sequence_values(target_dsn)
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        kinds: dict[str, int] = dict(
            conn.execute("SELECT kind, count(*) FROM cdcsync.snapshot_plan GROUP BY 1").fetchall()
        )
        assert kinds.keys() == {"key", "ctid", "whole"}
        # Random keys are scattered over the heap: that table goes by block ranges.
        by_table: dict[str, list[str]] = dict(
            conn.execute(
                "SELECT table_name, array_agg(DISTINCT kind) FROM cdcsync.snapshot_plan "
                "WHERE table_name IN ('uuid_keyed', 'Orders') GROUP BY 1"
            ).fetchall()
        )
        assert by_table == {"uuid_keyed": ["ctid"], "Orders": ["key"]}
        # Generated columns were computed by the target, and the view and function came along.
        row = conn.execute('SELECT sum(total) FROM "Sales Dept"."Orders"').fetchone()
        assert row is not None and row[0] is not None
        assert conn.execute("SELECT count(*) FROM other.order_totals").fetchone() == (5,)
        # The inheritance child's row is not doubled into its parent.
        assert conn.execute("SELECT count(*) FROM ONLY other.parent").fetchone() == (1,)
        assert conn.execute(
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'fk_child_parent'"
        ).fetchone() == (1,)


def test_an_operator_created_schema_and_a_table_subset(
    source_dsn: str, target_dsn: str, topic_prefix: str
) -> None:
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute(ROWS)
    # The operator's own target schema: other column order, an extra column, own key name.
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE SCHEMA other;"
            "CREATE TABLE other.serials (v text, added int DEFAULT 5, id int NOT NULL,"
            "  CONSTRAINT my_key PRIMARY KEY (id));"
            "CREATE TABLE other.fk_child (parent_id int, id int PRIMARY KEY);"
        )
    settings = load_settings(
        source_dsn=source_dsn,
        target_dsn=target_dsn,
        migration_id=topic_prefix,
        tables=["other.serials", "other.fk_child"],
    )
    result = run_snapshot(settings, progress=Progress("quiet"))
    assert sorted(map(str, result.tables)) == ["other.fk_child", "other.serials"]
    assert result.rows == 17 + 100
    # The operator's keys were kept; the foreign key and the index came from the source.
    assert set(result.kept_objects) == {
        "constraint other.fk_child fk_child_pkey",
        "constraint other.serials serials_pkey",
    }
    with psycopg.connect(source_dsn) as src, psycopg.connect(target_dsn) as tgt:
        for table, cols in (("serials", ["id", "v"]), ("fk_child", ["id", "parent_id"])):
            query = sql.SQL("SELECT {} FROM other.{} ORDER BY 1").format(
                sql.SQL(", ").join(map(sql.Identifier, cols)), sql.Identifier(table)
            )
            assert src.execute(query).fetchall() == tgt.execute(query).fetchall()
        assert tgt.execute("SELECT DISTINCT added FROM other.serials").fetchall() == [(5,)]
        assert tgt.execute(
            "SELECT count(*) FROM pg_constraint WHERE conname = 'fk_child_parent_id_fkey'"
        ).fetchone() == (1,)
        # Nothing outside the subset was created.
        assert tgt.execute("SELECT to_regclass('other.types')").fetchone() == (None,)
        published = src.execute(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables "
            "WHERE pubname = %s ORDER BY 1",
            (settings.publication_name,),
        ).fetchall()
        assert published == [("other.fk_child",), ("other.serials",)]


def test_a_table_subset_gets_its_schema_without_what_it_cannot_have(
    source_dsn: str, target_dsn: str, topic_prefix: str
) -> None:
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute(ROWS)
    settings = load_settings(
        source_dsn=source_dsn,
        target_dsn=target_dsn,
        migration_id=topic_prefix,
        tables=["other.fk_child", "Sales Dept.Orders"],
        snapshot_chunk_blocks=4,
    )
    result = run_snapshot(settings, progress=Progress("quiet"))
    # Its foreign key names other.serials, which is not migrated: reported, not fatal.
    assert result.skipped_objects == ["fk constraint other.fk_child fk_child_parent_id_fkey"]
    source, target = table_digests(source_dsn), table_digests(target_dsn)
    assert set(target) == {"other.fk_child", "Sales Dept.Orders"}
    assert {k: source[k] for k in target} == target
    with psycopg.connect(target_dsn) as conn:
        # The whole partition tree, intermediate level included; no view over other tables.
        assert conn.execute(
            'SELECT count(*) FROM pg_partition_tree(\'"Sales Dept"."Orders"\')'
        ).fetchone() == (6,)
        assert conn.execute("SELECT to_regclass('other.order_totals')").fetchone() == (None,)
