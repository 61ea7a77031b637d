"""``verify`` against real PostgreSQL: equal pairs are clean, each kind of drift is found.

Both databases get the same schema and rows; each test then damages the target in one
way and checks the level that must see it, the key it names, and the level that cannot.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import psycopg
import pytest

from cdcsync import metrics
from cdcsync.adapters import fence
from cdcsync.core.events import TableId
from cdcsync.engine.verify import LEVELS, VerifyReport, verify_tables

pytestmark = pytest.mark.stack

ACCOUNTS = TableId("public", "accounts")
EVENTS = TableId("public", "events")
ODD = TableId("Mixed Case", "Odd Table")
BIG = TableId("public", "big")
MEASURE = TableId("public", "measure")
TABLES = [ACCOUNTS, EVENTS, ODD, BIG, MEASURE]

SCHEMA = """
CREATE TABLE accounts (
    id int PRIMARY KEY, owner text NOT NULL, balance numeric(14, 2), note text,
    doubled int GENERATED ALWAYS AS (id * 2) STORED, opened timestamptz, ratio float8);
INSERT INTO accounts (id, owner, balance, note, opened, ratio)
    SELECT g, 'owner ' || g, g * 1.25, CASE WHEN g % 7 = 0 THEN NULL ELSE 'n' || g END,
           '2024-01-01 00:00+02'::timestamptz + g * interval '1 minute', g / 3.0
    FROM generate_series(1, 5000) g;
CREATE TABLE events (kind text, amount int);
INSERT INTO events VALUES ('a', 1), ('a', 1), ('b', 2), ('c', NULL), ('', 3);
CREATE SCHEMA "Mixed Case";
CREATE TABLE "Mixed Case"."Odd Table" ("Key Col" text PRIMARY KEY, "Value" int);
INSERT INTO "Mixed Case"."Odd Table" VALUES ('a', 1), ('b', 2), ('C,"x"', 3);
CREATE TABLE big (id bigint PRIMARY KEY, pad text);
INSERT INTO big SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, 40000) g;
CREATE TABLE measure (id int, region int, val float8, PRIMARY KEY (id, region))
    PARTITION BY LIST (region);
CREATE TABLE measure_1 PARTITION OF measure FOR VALUES IN (1);
CREATE TABLE measure_2 PARTITION OF measure FOR VALUES IN (2);
INSERT INTO measure SELECT g, 1 + g % 2, g * 0.1 FROM generate_series(1, 300) g;
ANALYZE;
"""


@pytest.fixture
def pair(source_dsn: str, target_dsn: str) -> Iterator[tuple[str, str]]:
    for dsn in (source_dsn, target_dsn):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)
    yield source_dsn, target_dsn


def on(dsn: str, statement: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement)


def run(pair: tuple[str, str], level: str, tables: list[TableId] | None = None) -> VerifyReport:
    return verify_tables(pair[0], pair[1], tables or TABLES, level)  # type: ignore[arg-type]


def result(report: VerifyReport, table: TableId) -> dict[str, object]:
    doc = report.to_dict()
    found: dict[str, object] = next(t for t in doc["tables"] if t["table"] == str(table))
    return found


def test_equal_tables_verify_clean_at_every_level(pair: tuple[str, str]) -> None:
    for level in LEVELS:
        report = run(pair, level)
        assert report.ok, report.to_dict()
        assert report.mismatches == dict.fromkeys(TABLES, 0)
        rows = {r.table: r.source_rows for r in report.tables}
        assert rows == {ACCOUNTS: 5000, EVENTS: 5, ODD: 3, BIG: 40000, MEASURE: 300}
        assert all(r.source_rows == r.target_rows for r in report.tables)
    report = run(pair, "checksum")
    by_table = {r.table: r for r in report.tables}
    assert by_table[BIG].ranges > 1  # the large table really is cut into key ranges
    rec = report.reconciliation[ACCOUNTS]
    assert rec.ok
    assert rec.source_sums["balance"] == f"{sum(g * 125 for g in range(1, 5001)) / 100:.2f}"
    assert set(rec.source_sums) == {"id", "balance", "doubled", "ratio"}  # generated included
    assert metrics.VERIFICATION_MISMATCHES.labels(str(ACCOUNTS))._value.get() == 0


def test_changed_value_found_by_checksum_and_rows_not_by_counts(pair: tuple[str, str]) -> None:
    on(pair[1], "UPDATE accounts SET balance = balance + 0.01 WHERE id = 1234")
    counts = run(pair, "counts", [ACCOUNTS])
    assert counts.ok  # a count cannot see a changed value
    checksum = run(pair, "checksum", [ACCOUNTS])
    assert not checksum.ok
    assert checksum.mismatches[ACCOUNTS] == 1
    assert checksum.tables[0].differing_ranges
    assert checksum.reconciliation[ACCOUNTS].differing_columns == ["balance"]
    rows = run(pair, "rows", [ACCOUNTS])
    r = result(rows, ACCOUNTS)
    assert r["changed"] == [{"id": "1234"}]
    assert r["source_only"] == [] and r["target_only"] == []
    assert rows.mismatches[ACCOUNTS] == 1
    assert metrics.VERIFICATION_MISMATCHES.labels(str(ACCOUNTS))._value.get() == 1


def test_missing_row_found_by_counts_and_named_by_rows(pair: tuple[str, str]) -> None:
    on(pair[1], "DELETE FROM accounts WHERE id = 77")
    counts = run(pair, "counts", [ACCOUNTS])
    assert not counts.ok
    assert (counts.tables[0].source_rows, counts.tables[0].target_rows) == (5000, 4999)
    assert counts.mismatches[ACCOUNTS] == 1
    r = result(run(pair, "rows", [ACCOUNTS]), ACCOUNTS)
    assert r["source_only"] == [{"id": "77"}]
    assert r["target_only"] == [] and r["changed"] == []


def test_extra_row_named_by_rows(pair: tuple[str, str]) -> None:
    on(pair[1], "INSERT INTO accounts (id, owner) VALUES (999999, 'intruder')")
    assert not run(pair, "counts", [ACCOUNTS]).ok
    r = result(run(pair, "rows", [ACCOUNTS]), ACCOUNTS)
    assert r["target_only"] == [{"id": "999999"}]
    assert r["source_only"] == [] and r["changed"] == []


def test_null_versus_empty_string(pair: tuple[str, str]) -> None:
    on(pair[1], "UPDATE accounts SET note = '' WHERE id = 14")  # NULL on the source
    assert run(pair, "counts", [ACCOUNTS]).ok
    assert not run(pair, "checksum", [ACCOUNTS]).ok
    r = result(run(pair, "rows", [ACCOUNTS]), ACCOUNTS)
    assert r["changed"] == [{"id": "14"}]


def test_keyless_table_with_one_duplicate_more(pair: tuple[str, str]) -> None:
    on(pair[1], "INSERT INTO events VALUES ('a', 1)")
    counts = run(pair, "counts", [EVENTS])
    assert (counts.tables[0].source_rows, counts.tables[0].target_rows) == (5, 6)
    checksum = run(pair, "checksum", [EVENTS])
    assert not checksum.ok and checksum.tables[0].method == "row-digest buckets"
    r = result(run(pair, "rows", [EVENTS]), EVENTS)
    assert r["target_only"] == [{"row": "(a,1)", "copies": "1"}]
    assert r["source_only"] == []
    assert r["differing_rows"] == 1


def test_keyless_table_same_rows_in_another_order(pair: tuple[str, str]) -> None:
    """Enough rows that each digest bucket holds many, written in the opposite order."""
    log = TableId("public", "log")
    on(
        pair[0],
        "CREATE TABLE log (v int, w text); INSERT INTO log "
        "SELECT g % 1000, 'w' || g FROM generate_series(1, 5000) g",
    )
    on(
        pair[1],
        "CREATE TABLE log (v int, w text); INSERT INTO log "
        "SELECT g % 1000, 'w' || g FROM generate_series(5000, 1, -1) g",
    )
    assert run(pair, "rows", [log, EVENTS]).ok
    on(pair[1], "UPDATE log SET v = v + 1 WHERE w = 'w4321'")
    r = result(run(pair, "rows", [log]), log)
    assert r["source_only"] == [{"row": "(321,w4321)", "copies": "1"}]
    assert r["target_only"] == [{"row": "(322,w4321)", "copies": "1"}]


def test_keyless_null_versus_empty_string(pair: tuple[str, str]) -> None:
    on(pair[1], "UPDATE events SET kind = NULL WHERE kind = ''")
    r = result(run(pair, "rows", [EVENTS]), EVENTS)
    assert r["source_only"] == [{"row": '("",3)', "copies": "1"}]
    assert r["target_only"] == [{"row": "(,3)", "copies": "1"}]


def test_mixed_case_quoted_identifiers(pair: tuple[str, str]) -> None:
    on(pair[1], 'UPDATE "Mixed Case"."Odd Table" SET "Value" = 20 WHERE "Key Col" = \'C,"x"\'')
    assert run(pair, "counts", [ODD]).ok
    r = result(run(pair, "rows", [ODD]), ODD)
    assert r["changed"] == [{"Key Col": 'C,"x"'}]


def test_large_table_drills_down_to_the_key(pair: tuple[str, str]) -> None:
    on(pair[1], "UPDATE big SET pad = pad || 'x' WHERE id = 23456; DELETE FROM big WHERE id = 3")
    checksum = run(pair, "checksum", [BIG])
    big = checksum.tables[0]
    assert big.ranges > 1
    assert 1 <= len(big.differing_ranges) <= 2
    for d in big.differing_ranges:  # each differing range holds one of the damaged keys
        lower = int(d.lower[0]) if d.lower else 0
        upper = int(d.upper[0]) if d.upper else 10**9
        assert any(lower <= k < upper for k in (3, 23456))
    r = result(run(pair, "rows", [BIG]), BIG)
    assert r["changed"] == [{"id": "23456"}]
    assert r["source_only"] == [{"id": "3"}]
    assert r["differing_rows"] == 2


def test_partitioned_table_is_verified_through_its_root(pair: tuple[str, str]) -> None:
    on(pair[1], "UPDATE measure_2 SET val = val + 1 WHERE id = 11")  # odd ids: region 2
    r = result(run(pair, "rows", [MEASURE]), MEASURE)
    assert r["changed"] == [{"id": "11", "region": "2"}]
    assert r["key"] == ["id", "region"]


def test_fenced_target_verifies(pair: tuple[str, str]) -> None:
    with psycopg.connect(pair[1], autocommit=True) as conn:
        fence.install(conn, TABLES, "verify-test")
        with pytest.raises(psycopg.Error):
            conn.execute("DELETE FROM accounts WHERE id = 1")
    for level in LEVELS:
        assert run(pair, level).ok


def test_missing_target_table_and_column_are_mismatches(pair: tuple[str, str]) -> None:
    on(pair[1], "DROP TABLE events; ALTER TABLE accounts DROP COLUMN ratio")
    report = run(pair, "checksum", [ACCOUNTS, EVENTS])
    assert not report.ok
    by_table = {r.table: r for r in report.tables}
    assert by_table[EVENTS].error == "table missing on the target"
    assert "ratio" in (by_table[ACCOUNTS].error or "")


def cli(pair: tuple[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDCSYNC_")}
    env.update(CDCSYNC_SOURCE_DSN=pair[0], CDCSYNC_TARGET_DSN=pair[1], CDCSYNC_WORKERS="2")
    return subprocess.run(
        [sys.executable, "-m", "cdcsync", "verify", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_exit_codes_and_outputs(pair: tuple[str, str]) -> None:
    clean = cli(pair, "--output", "json")  # default tables: every table in scope
    assert clean.returncode == 0, clean.stderr
    doc = json.loads(clean.stdout)
    assert doc["ok"] is True
    assert sorted(doc["mismatches"]) == sorted(str(t) for t in TABLES)
    on(pair[1], "DELETE FROM accounts WHERE id = 77")
    text = cli(pair, "--level", "rows", "--tables", "public.accounts,Mixed Case.Odd Table")
    assert text.returncode == 3, text.stdout + text.stderr
    assert "missing on target: id=77" in text.stdout
    assert "differ in 1 table(s): public.accounts" in text.stderr
    bad = cli(pair, "--level", "everything")
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr


TYPED = TableId("public", "typed")
TYPED_SCHEMA = """
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE typed (id int PRIMARY KEY, d posint, m mood, iv interval, j jsonb, f float8,
    n numeric, a int[], t text, b bytea, u uuid, ts timestamptz, dt date);
INSERT INTO typed SELECT g, g, (ARRAY['sad', 'ok', 'happy'])[1 + g % 3]::mood,
    g * interval '1 hour', jsonb_build_object('g', g, 'x', 1.5), g / 7.0, g * 1.10,
    ARRAY[g, g + 1], 'text ' || g, decode(md5(g::text), 'hex'), md5(g::text)::uuid,
    '2024-01-01 00:00+00'::timestamptz + g * interval '1 minute', date '2024-01-01' + g
    FROM generate_series(1, 500) g;
"""


@pytest.mark.parametrize(
    "damage",
    [
        "UPDATE typed SET n = 11.000 WHERE id = 10",  # 11.00 on the source: equal value, scale
        "UPDATE typed SET f = '-0' WHERE id = 42",  # f = 6 on the source; then -0 against 0
        "UPDATE typed SET iv = interval '1 day' WHERE id = 24",  # '24:00:00' on the source
        """UPDATE typed SET j = '{"g": 77, "x": 1.50}' WHERE id = 77""",  # 1.5 on the source
        "UPDATE typed SET m = 'happy' WHERE id = 3",
        "UPDATE typed SET a = ARRAY[8, 9, 10] WHERE id = 8",
        "UPDATE typed SET d = 100 WHERE id = 99",
        "UPDATE typed SET ts = ts + interval '1 microsecond' WHERE id = 5",
        "UPDATE typed SET b = NULL WHERE id = 6",
    ],
)
def test_value_differences_that_compare_equal_or_hash_alike_are_found(
    source_dsn: str, target_dsn: str, damage: str
) -> None:
    """Row hashes must see what the text form shows, not only what ``=`` sees."""
    for dsn in (source_dsn, target_dsn):
        on(dsn, TYPED_SCHEMA)
    if "'-0'" in damage:
        on(source_dsn, "UPDATE typed SET f = 0 WHERE id = 42")
        on(target_dsn, "UPDATE typed SET f = 0 WHERE id = 42")
    assert verify_tables(source_dsn, target_dsn, [TYPED], "checksum").ok
    key = damage.split("WHERE id = ")[1].strip()
    on(target_dsn, damage)
    report = verify_tables(source_dsn, target_dsn, [TYPED], "rows")
    assert result(report, TYPED)["changed"] == [{"id": key}], report.to_dict()
