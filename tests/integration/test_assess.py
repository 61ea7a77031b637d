"""``cdcsync assess`` against real PostgreSQL: each finding from a purpose-built schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import psycopg
import pytest

from cdcsync.adapters.discovery import discover
from cdcsync.config import load_settings
from cdcsync.core import findings as fnd
from cdcsync.core.findings import Finding, Severity

pytestmark = pytest.mark.stack


def assess(source_dsn: str, target_dsn: str) -> list[Finding]:
    settings = load_settings(source_dsn=source_dsn, target_dsn=target_dsn)
    return fnd.evaluate(discover(settings))


def run_cli(source_dsn: str, target_dsn: str, *args: str, **env: str) -> tuple[int, str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CDCSYNC_")}
    done = subprocess.run(
        [sys.executable, "-m", "cdcsync", "assess", *args],
        env={
            **base,
            "CDCSYNC_SOURCE_DSN": source_dsn,
            "CDCSYNC_TARGET_DSN": target_dsn,
            "COLUMNS": "200",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


def at(found: list[Finding], code: str, location: str) -> Finding:
    hits = [f for f in found if f.code == code and f.location == location]
    assert len(hits) == 1, [(f.code, f.location) for f in found]
    return hits[0]


def state(dsn: str) -> dict[str, Any]:
    """What assess must leave as it was: objects, identities, rows, slots, settings, stats."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_force_next_flush()")
        return {
            "classes": conn.execute(
                "SELECT c.oid, c.relname, c.relkind, c.relreplident, c.relpersistence "
                "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"
            ).fetchall(),
            "writes": conn.execute(
                "SELECT relname, n_tup_ins, n_tup_upd, n_tup_del "
                "FROM pg_stat_user_tables ORDER BY 1"
            ).fetchall(),
            "slots": conn.execute("SELECT slot_name FROM pg_replication_slots").fetchall(),
            "publications": conn.execute("SELECT pubname FROM pg_publication").fetchall(),
            "triggers": conn.execute("SELECT oid, tgenabled FROM pg_trigger").fetchall(),
            "roles": conn.execute("SELECT rolname, rolreplication FROM pg_roles").fetchall(),
            "settings": conn.execute(
                "SELECT name, setting FROM pg_settings WHERE source NOT IN ('default', "
                "'client', 'session') ORDER BY 1"
            ).fetchall(),
        }


def slot_of(dsn: str) -> str:
    return "idle_" + str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])


@pytest.fixture
def risky(source_dsn: str, target_dsn: str) -> tuple[str, str]:
    """A source with one of each risk the cluster can have."""
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(
            """
            CREATE SCHEMA "Odd Schema";
            CREATE TABLE "Odd Schema"."Keyless Log" (msg text, at timestamptz);
            INSERT INTO "Odd Schema"."Keyless Log" VALUES ('a', '2024-01-01'), ('a', '2024-01-01'),
                ('b', '2024-01-02');
            CREATE TABLE typed (id int PRIMARY KEY, tz timetz, vb varbit, ok numeric,
                                d date, arr int[][]);
            INSERT INTO typed VALUES (1, '12:00+02', B'0011', 1.5, 'infinity', '{{1,2},{3,4}}');
            CREATE TABLE parent (id int PRIMARY KEY);
            INSERT INTO parent VALUES (1);
            CREATE TABLE child (id int PRIMARY KEY, parent_id int);
            INSERT INTO child VALUES (1, 1), (2, 99), (3, NULL);
            ALTER TABLE child ADD CONSTRAINT child_parent_fkey FOREIGN KEY (parent_id)
                REFERENCES parent NOT VALID;
            CREATE FUNCTION noop() RETURNS trigger LANGUAGE plpgsql AS
                'BEGIN RETURN NEW; END';
            CREATE TRIGGER always_audit BEFORE INSERT ON parent FOR EACH ROW
                EXECUTE FUNCTION noop();
            ALTER TABLE parent ENABLE ALWAYS TRIGGER always_audit;
            CREATE TABLE gen (id int PRIMARY KEY, a int, b int GENERATED ALWAYS AS (a * 2) STORED);
            CREATE TABLE parts (id int, v text) PARTITION BY RANGE (id);
            CREATE TABLE parts_1 PARTITION OF parts FOR VALUES FROM (0) TO (10);
            CREATE TABLE parts_2 PARTITION OF parts FOR VALUES FROM (10) TO (20);
            ALTER TABLE parts_1 REPLICA IDENTITY FULL;
            CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY);
            """
        )
        # A slot nobody reads, then some WAL for it to hold on to.
        conn.execute(
            "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot_of(source_dsn),)
        )
        conn.execute("INSERT INTO parent SELECT g FROM generate_series(1000, 2000) g")
    return source_dsn, target_dsn


def test_each_risk_is_found_with_its_fix(risky: tuple[str, str]) -> None:
    source_dsn, target_dsn = risky
    found = assess(source_dsn, target_dsn)

    ri = at(found, "replica-identity", "source:Odd Schema.Keyless Log")
    assert ri.severity is Severity.error
    assert ri.fix == 'ALTER TABLE "Odd Schema"."Keyless Log" REPLICA IDENTITY FULL;'
    assert at(found, "keyless-duplicates", "source:Odd Schema.Keyless Log").message.startswith(
        "2 row(s)"
    )
    for column in ("tz", "vb", "d", "arr"):
        f = at(found, "lossy-type", f"source:public.typed.{column}")
        assert f.severity is Severity.warning  # keyed: read back by key
    assert not [f for f in found if f.location == "source:public.typed.ok"]
    orphans = at(found, "fk-orphans", "source:public.child (child_parent_fkey)")
    assert orphans.severity is Severity.warning and orphans.message.startswith("1 row(s)")
    assert orphans.fix is not None
    with psycopg.connect(source_dsn) as conn:
        assert conn.execute(orphans.fix.rstrip(";")).fetchall() == [(2, 99)]
    assert at(found, "replica-trigger", "source:public.parent (trigger always_audit)")
    assert at(found, "generated-column", "source:public.gen.b").severity is Severity.info
    assert at(found, "partitioned", "source:public.parts").severity is Severity.info
    # Only the leaf without a key or FULL identity is named.
    assert at(found, "replica-identity", "source:public.parts_2")
    assert not [f for f in found if f.location == "source:public.parts_1"]
    unlogged = at(found, "unlogged", "source:public.scratch")
    assert unlogged.fix is not None
    assert unlogged.fix.startswith('ALTER TABLE "public"."scratch" SET LOGGED;')
    idle = at(found, "inactive-slot", f"source:slot {slot_of(source_dsn)}")
    assert (
        idle.fix == f"SELECT pg_drop_replication_slot('{slot_of(source_dsn)}');  -- if it is unused"
    )
    assert fnd.exit_code(found) == fnd.EXIT_BLOCKED


def test_the_fix_makes_the_finding_disappear(risky: tuple[str, str]) -> None:
    source_dsn, target_dsn = risky
    fixes = [
        f.fix
        for f in assess(source_dsn, target_dsn)
        if f.code == "replica-identity" and f.fix is not None
    ]
    assert len(fixes) == 2
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        for fix in fixes:
            conn.execute(fix)
    assert not [f for f in assess(source_dsn, target_dsn) if f.code == "replica-identity"]


def test_keyless_lossy_columns_are_errors(source_dsn: str, target_dsn: str) -> None:
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE k (tz timetz, vb bit varying(8)) ; ALTER TABLE k REPLICA IDENTITY FULL"
        )
    found = assess(source_dsn, target_dsn)
    assert at(found, "lossy-type", "source:public.k.tz").severity is Severity.error
    assert at(found, "lossy-type", "source:public.k.vb").severity is Severity.error
    assert not [f for f in found if f.code == "replica-identity"]


def test_target_tables_already_there(source_dsn: str, target_dsn: str) -> None:
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text, w int, n text);"
            "INSERT INTO t VALUES (1, 'a', 1, NULL);"
            "CREATE TABLE u (id int PRIMARY KEY)"
        )
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE t (id int PRIMARY KEY, w bigint, n text NOT NULL);"
            "INSERT INTO t VALUES (7, 7, 'x')"
        )
    found = assess(source_dsn, target_dsn)
    nonempty = at(found, "target-not-empty", "target:public.t")
    assert nonempty.severity is Severity.error and nonempty.fix is not None
    assert nonempty.fix.startswith('TRUNCATE "public"."t";')
    assert at(found, "target-missing-column", "target:public.t.v").fix == (
        'ALTER TABLE "public"."t" ADD COLUMN "v" text;'
    )
    assert at(found, "target-type-differs", "target:public.t.w").severity is Severity.warning
    assert at(found, "target-not-null", "target:public.t.n").message.endswith(
        "1 source row(s) hold NULL there"
    )
    assert at(found, "target-partial-schema", "target").severity is Severity.error
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE t")
    assert not [f for f in assess(source_dsn, target_dsn) if f.code == "target-not-empty"]


def test_a_clean_database_exits_zero_in_every_format(source_dsn: str, target_dsn: str) -> None:
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE accounts (id bigserial PRIMARY KEY, name text NOT NULL, "
            "balance numeric(12, 2), opened date);"
            "INSERT INTO accounts (name, balance, opened) "
            "SELECT 'n' || g, g, date '2020-01-01' + g FROM generate_series(1, 500) g"
        )
    before = state(source_dsn), state(target_dsn)
    code, out, err = run_cli(source_dsn, target_dsn)
    assert code == 0, out + err
    assert "public.accounts" in out and "Traceback" not in err
    code, md, err = run_cli(source_dsn, target_dsn, "--output", "md")
    assert code == 0, err
    assert md.startswith("# cdcsync assess") and "| public.accounts |" in md
    code, text, err = run_cli(source_dsn, target_dsn, "--output", "json")
    assert code == 0, err
    doc = json.loads(text)
    assert doc["exit_code"] == 0
    assert {f["severity"] for f in doc["findings"]} <= {"info"}
    assert [t["name"] for t in doc["facts"]["tables"]] == ["public.accounts"]
    assert doc["facts"]["source"]["wal_level"] == "logical"
    # Strict mode fails on warnings only; this database has none.
    assert run_cli(source_dsn, target_dsn, "--strict")[0] == 0
    assert (state(source_dsn), state(target_dsn)) == before


def test_the_cli_reports_errors_in_every_format_and_changes_nothing(
    risky: tuple[str, str],
) -> None:
    source_dsn, target_dsn = risky
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE parent (id int PRIMARY KEY); INSERT INTO parent VALUES (1)")
    before = state(source_dsn), state(target_dsn)
    # A read-only session proves assess writes nothing: any write would fail.
    read_only = {"PGOPTIONS": "-c default_transaction_read_only=on"}
    code, out, err = run_cli(source_dsn, target_dsn, **read_only)
    assert code == 3, out + err
    assert "REPLICA IDENTITY FULL" in out and "errors (" in out
    assert "assess found" in err and "Traceback" not in err
    code, md, _ = run_cli(source_dsn, target_dsn, "-o", "md", **read_only)
    assert code == 3
    assert "## Errors (" in md and "### target-not-empty · ` target:public.parent `" in md
    code, text, _ = run_cli(source_dsn, target_dsn, "-o", "json", **read_only)
    assert code == 3
    doc = json.loads(text)
    assert doc["exit_code"] == 3
    codes = {f["code"] for f in doc["findings"]}
    assert {"replica-identity", "lossy-type", "fk-orphans", "target-not-empty"} <= codes
    assert (state(source_dsn), state(target_dsn)) == before


def test_privileges_of_a_plain_role(source_dsn: str, target_dsn: str) -> None:
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    role = "assess_" + os.urandom(4).hex()
    dsns = []
    for dsn in (source_dsn, target_dsn):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
        dsns.append(psycopg.conninfo.make_conninfo(dsn, user=role, password="pw"))
    try:
        found = assess(dsns[0], dsns[1])
        assert at(found, "source-replication-privilege", "source").fix == (
            f'ALTER ROLE "{role}" REPLICATION;'
        )
        assert at(found, "no-select", "source:public.t").fix == (
            f'GRANT SELECT ON "public"."t" TO "{role}";'
        )
        assert at(found, "not-owner", "source:public.t").severity is Severity.error
        replica = at(found, "target-replica-role", "target")
        assert replica.fix is not None and "session_replication_role" in replica.fix
    finally:
        for dsn in (source_dsn, target_dsn):
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


def test_plan_aware_audits(source_dsn: str, target_dsn: str, tmp_path: Any) -> None:
    """A planned cast that a value refuses is an error naming the value; a filter's share."""
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE public.orders (id int PRIMARY KEY, qty text, price text, gone bool)"
        )
        conn.execute("ALTER TABLE public.orders REPLICA IDENTITY FULL")
        conn.execute(
            "INSERT INTO public.orders SELECT g, g::text, (g * 1.5)::text, g % 4 = 0 "
            "FROM generate_series(1, 40) g"
        )
        conn.execute("UPDATE public.orders SET qty = 'twelve' WHERE id = 7")
        conn.execute("CREATE TABLE public.skip_me (id int PRIMARY KEY)")
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "tables:\n"
        "  public.orders:\n"
        "    filter: NOT gone\n"
        "    columns:\n"
        "      qty: {cast: integer}\n"
        "      price: {cast: 'numeric(10,2)'}\n"
        "  public.skip_me: {include: false}\n"
    )
    settings = load_settings(source_dsn=source_dsn, target_dsn=target_dsn, plan=plan)
    found = fnd.evaluate(discover(settings))
    bad = at(found, "plan-cast-fails", "source:public.orders.qty")
    assert bad.severity is Severity.error and '"twelve"' in bad.message, bad
    assert not [f for f in found if f.location == "source:public.orders.price"], found
    kept = at(found, "plan-filter", "source:public.orders")
    assert "30 of 40" in kept.message, kept
    assert not [f for f in found if "skip_me" in f.location], "an excluded table is not assessed"
    # Without the failing row the cast passes: the finding goes.
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute("UPDATE public.orders SET qty = '12' WHERE id = 7")
    again = fnd.evaluate(discover(settings))
    assert not [f for f in again if f.code == "plan-cast-fails"], again
