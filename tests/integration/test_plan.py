"""A plan with a rename, casts, transforms, a drop, a new required column and a row filter.

The plan goes through the snapshot and the streaming apply while a writer inserts,
updates (moving rows into and out of the filter) and deletes. The target is then
compared with the source as the plan maps it, by SQL written here by hand (not by the
plan module): the filtered rows, lower-cased and trimmed e-mails under their new name,
mapped statuses, amounts cast to numeric(12,2), the new column's default, no dropped
column, no excluded table. A plan changed after the snapshot is refused.

``cdcsync verify`` then compares the same way, through the plan: equal after streaming,
a damaged mapped row and a damaged unmapped row named by key, a repair that re-copies
mapped values; a cutover verifies under the freeze through the plan, and a row written
on the new primary reaches the old source under the source's column names.
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tests.integration import workload
from tests.integration.cutover_helpers import cdcsync, drain_direction, settings_for
from tests.integration.test_e2e_stream import Daemon, wait_streaming

pytestmark = pytest.mark.stack

SOURCE_DDL = """
CREATE TABLE public.customers (
    id bigint PRIMARY KEY,
    email text NOT NULL,
    status text,
    amount integer NOT NULL,
    legacy text,
    deleted boolean NOT NULL DEFAULT false
);
ALTER TABLE public.customers REPLICA IDENTITY FULL;
CREATE TABLE public.audit (id bigint PRIMARY KEY, note text);
CREATE TABLE public.plain (id integer PRIMARY KEY, v text);
"""

PLAN = {
    "version": 1,
    "tables": {
        "public.customers": {
            "filter": "NOT deleted",
            "columns": {
                "email": {"rename": "email_address", "transform": ["trim", "lower"]},
                "status": {
                    "transform": [
                        {"map": {"A": "active", "I": "inactive"}},
                        {"default_if_null": "unknown"},
                    ]
                },
                "amount": {"cast": "numeric(12,2)"},
                "legacy": {"drop": True},
            },
            "add": {"region": {"type": "text", "default": "'eu'"}},
        },
        "public.audit": {"include": False},
    },
}

EXPECTED = """
SELECT id, lower(btrim(email)),
       coalesce(CASE status WHEN 'A' THEN 'active' WHEN 'I' THEN 'inactive' ELSE status END,
                'unknown'),
       amount::numeric(12,2)::text, 'eu'
FROM public.customers WHERE NOT deleted ORDER BY id
"""
ACTUAL = "SELECT id, email_address, status, amount::text, region FROM public.customers ORDER BY id"


def _row(rng: random.Random, key: int) -> tuple[object, ...]:
    email = rng.choice(["  Ann@Example.COM ", "bob@example.com", " Ça@Ünï.org", "x@y.z  "])
    return (
        key,
        f"{key}{email}",
        rng.choice(["A", "I", None, "Z"]),
        rng.randint(-1000, 100000),
        "old",
        rng.random() < 0.3,
    )


class Writer(workload.Writer):
    """Inserts, updates (into and out of the filter) and deletes for a while."""

    seed = 3

    def write(self, conn: psycopg.Connection[Any], rng: random.Random, end: float) -> None:
        key = 1000
        while time.monotonic() < end:
            key += 1
            conn.execute(
                "INSERT INTO public.customers VALUES (%s, %s, %s, %s, %s, %s)",
                _row(rng, key),
            )
            target = rng.randint(1, key)
            choice = rng.random()
            if choice < 0.4:
                conn.execute(
                    "UPDATE public.customers SET deleted = NOT deleted, "
                    "amount = amount + 1 WHERE id = %s",
                    (target,),
                )
            elif choice < 0.7:
                conn.execute(
                    "UPDATE public.customers SET email = %s, status = %s WHERE id = %s",
                    (f" NEW{target}@Mail.COM ", rng.choice(["A", "I", None]), target),
                )
            elif choice < 0.8:
                conn.execute("DELETE FROM public.customers WHERE id = %s", (target,))
            conn.execute(
                "INSERT INTO public.plain VALUES (%s, 'p') ON CONFLICT (id) DO UPDATE "
                "SET v = public.plain.v || '+'",
                (key % 50,),
            )
            conn.execute("INSERT INTO public.audit VALUES (%s, 'n')", (key,))
            time.sleep(0.005)


def test_plan_through_snapshot_and_streaming(
    source_dsn: str,
    target_dsn: str,
    migration_env: dict[str, str],
    daemon: Daemon,
    tmp_path: Path,
) -> None:
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(SOURCE_DDL)
        rng = random.Random(1)
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO public.customers VALUES (%s, %s, %s, %s, %s, %s)",
                [_row(rng, k) for k in range(1, 1001)],
            )
        conn.execute("INSERT INTO public.plain SELECT g, 'v' FROM generate_series(1, 20) g")
        conn.execute("INSERT INTO public.audit SELECT g, 'a' FROM generate_series(1, 20) g")

    # The generated plan lists every table and passes its own check.
    written = tmp_path / "generated.yaml"
    gen = cdcsync(migration_env, "plan", "--output", str(written))
    assert gen.returncode == 0, gen.stderr
    generated = yaml.safe_load(written.read_text())
    assert set(generated["tables"]) == {"public.customers", "public.audit", "public.plain"}
    assert cdcsync(migration_env, "plan", "--check", str(written)).returncode == 0

    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(PLAN))
    checked = cdcsync(migration_env, "plan", "--check", str(plan_file))
    assert checked.returncode == 0, checked.stderr

    # A filter on a table without REPLICA IDENTITY FULL is refused, naming the fix.
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"tables": {"public.plain": {"filter": "id > 3"}}}))
    refused = cdcsync(migration_env, "plan", "--check", str(bad))
    assert refused.returncode == 3 and "REPLICA IDENTITY FULL" in refused.stderr, refused.stderr

    daemon.env = {**daemon.env, "CDCSYNC_PLAN": str(plan_file)}
    env = {**migration_env, "CDCSYNC_PLAN": str(plan_file)}
    writer = Writer(source_dsn, seconds=12)
    writer.start()  # the snapshot runs under the writer too
    daemon.start()
    wait_streaming(env, daemon)
    writer.wait()
    assert not writer.errors, writer.errors
    drain_direction(env, "forward", timeout=180)

    with (
        psycopg.connect(source_dsn, autocommit=True) as src,
        psycopg.connect(target_dsn, autocommit=True) as tgt,
    ):
        expected = src.execute(EXPECTED).fetchall()
        actual = tgt.execute(ACTUAL).fetchall()
        assert len(expected) > 500, len(expected)
        missing = sorted(set(expected) - set(actual))[:5]
        extra = sorted(set(actual) - set(expected))[:5]
        assert actual == expected, f"missing {missing} extra {extra}\n{daemon.tail()}"
        columns = {
            r[0]
            for r in tgt.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = 'public.customers'::regclass "
                "AND attnum > 0 AND NOT attisdropped"
            )
        }
        assert "legacy" not in columns and "email" not in columns, columns
        kind = tgt.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = 'public.customers'::regclass AND attname = 'amount'"
        ).fetchone()
        assert kind == ("numeric(12,2)",), kind
        assert tgt.execute("SELECT to_regclass('public.audit')").fetchone() == (None,)
        assert (
            src.execute("SELECT id, v FROM public.plain ORDER BY id").fetchall()
            == tgt.execute("SELECT id, v FROM public.plain ORDER BY id").fetchall()
        )

    # The plan changes after the snapshot: the daemon refuses to stream under it.
    daemon.kill(signal.SIGTERM)
    changed = json.loads(json.dumps(PLAN))
    changed["tables"]["public.customers"]["filter"] = "NOT deleted AND id > 10"
    plan_file.write_text(yaml.safe_dump(changed))
    again = cdcsync(env, "run", timeout=120)
    assert again.returncode == 2, again.stderr[-2000:]
    assert "snapshotted under plan" in again.stderr, again.stderr[-2000:]


def _verify(env: dict[str, str], level: str, *args: str) -> tuple[int, dict[str, Any]]:
    done = cdcsync(env, "verify", "--level", level, "--output", "json", *args)
    assert done.returncode in (0, 3), done.stderr[-3000:]
    doc: dict[str, Any] = json.loads(done.stdout)
    return done.returncode, doc


def _table(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(t for t in doc["tables"] if t["table"] == name)
    return found


def _reconciliation(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(r for r in doc["reconciliation"] if r["table"] == name)
    return found


#: The plan of the cutover test: the same one. On the way back a cast column is staged
#: in the plan's type and cast to the source's (numeric(12,2) 12.00 → integer 12).
CUTOVER_PLAN: dict[str, Any] = json.loads(json.dumps(PLAN))


def test_verify_and_cutover_follow_the_plan(
    source_dsn: str,
    target_dsn: str,
    migration_env: dict[str, str],
    daemon: Daemon,
    connectors: list[str],
    tmp_path: Path,
) -> None:
    connectors.append(settings_for(migration_env).reverse_connector_name)
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(SOURCE_DDL)
        rng = random.Random(5)
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO public.customers VALUES (%s, %s, %s, %s, %s, %s)",
                [_row(rng, k) for k in range(1, 1001)],
            )
        conn.execute("INSERT INTO public.plain SELECT g, 'v' FROM generate_series(1, 20) g")
        conn.execute("INSERT INTO public.audit SELECT g, 'a' FROM generate_series(1, 20) g")
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(CUTOVER_PLAN))
    daemon.env = {**daemon.env, "CDCSYNC_PLAN": str(plan_file)}
    env = {**migration_env, "CDCSYNC_PLAN": str(plan_file)}
    writer = Writer(source_dsn, seconds=6)
    writer.start()
    daemon.start()
    wait_streaming(env, daemon)
    writer.wait()
    assert not writer.errors, writer.errors
    drain_direction(env, "forward", timeout=180)

    # Equal as the plan maps the source: filtered rows, transformed and cast values.
    started = time.monotonic()
    code, doc = _verify(env, "checksum")
    print("VERIFY-CHECKSUM-SECONDS", round(time.monotonic() - started, 2))
    assert code == 0 and doc["ok"], json.dumps(doc["tables"])[:3000]
    customers = _table(doc, "public.customers")
    with psycopg.connect(source_dsn, autocommit=True) as src:
        kept = src.execute("SELECT count(*) FROM public.customers WHERE NOT deleted").fetchone()
        total = src.execute("SELECT count(*) FROM public.customers").fetchone()
        amounts = src.execute(
            "SELECT sum(amount::numeric(12,2))::text FROM public.customers WHERE NOT deleted"
        ).fetchone()
    assert kept is not None and total is not None and amounts is not None
    assert kept[0] < total[0]  # the filter leaves rows out
    assert customers["source_rows"] == customers["target_rows"] == kept[0], customers
    assert any("legacy: dropped" in n for n in customers["notes"]), customers["notes"]
    assert any("region: added" in n and "0 row(s) differ" in n for n in customers["notes"])
    assert "public.audit" not in {t["table"] for t in doc["tables"]}  # excluded: not recorded
    rec = _reconciliation(doc, "public.customers")
    assert rec["ok"] and rec["source_sums"]["amount"] == amounts[0], rec  # the cast values

    # Counts: count(*) with the filter on the source.
    code, counted = _verify(env, "counts")
    assert code == 0, counted["tables"]
    assert _table(counted, "public.customers")["source_rows"] == kept[0]

    # A damaged mapped row (a transformed column), a damaged amount, an unmapped row.
    with psycopg.connect(target_dsn, autocommit=True) as tgt:
        ids = [r[0] for r in tgt.execute("SELECT id FROM public.customers ORDER BY id LIMIT 2")]
        # Past the target's fence, the way nothing but a bug or an operator could.
        tgt.execute("SET session_replication_role = replica")
        tgt.execute(
            "UPDATE public.customers SET email_address = 'Damaged' WHERE id = %s", (ids[0],)
        )
        tgt.execute("UPDATE public.customers SET amount = amount + 1 WHERE id = %s", (ids[1],))
        tgt.execute("UPDATE public.plain SET v = 'damaged' WHERE id = 3")
    code, rows = _verify(env, "rows")
    assert code == 3 and not rows["ok"]
    changed = _table(rows, "public.customers")["changed"]
    assert sorted(changed, key=lambda k: int(k["id"])) == [{"id": str(i)} for i in ids], changed
    assert _table(rows, "public.plain")["changed"] == [{"id": "3"}]
    assert _reconciliation(rows, "public.customers")["differing_columns"] == ["amount"]

    # The repair re-copies mapped values (the target is still fenced), then it is equal.
    code, repaired = _verify(env, "rows", "--repair")
    assert code == 0, json.dumps(repaired.get("repair"))[:3000]
    assert repaired["repair"]["ok"] and repaired["repair"]["rows_copied"] >= 3
    code, doc = _verify(env, "checksum")
    assert code == 0, json.dumps(doc["tables"])[:3000]

    # Cutover under the plan, verified through it under the freeze.
    cut = cdcsync(env, "cutover", "--yes", "--output", "json", "--verify", "checksum")
    assert cut.returncode == 0, cut.stderr[-3000:] + daemon.tail()
    report = json.loads(cut.stdout)
    assert report["result"] == "done"
    assert report["verification"]["level"] == "checksum"
    assert report["verification"]["mismatches"] == {}, report["verification"]

    # The target is the primary: its writes flow back, renamed back to the source's names.
    with psycopg.connect(target_dsn, autocommit=True) as tgt:
        tgt.execute(
            "INSERT INTO public.customers (id, email_address, status, amount, deleted, region) "
            "VALUES (900001, 'new@target.example', 'active', 12, false, 'us')"
        )
        tgt.execute(
            "UPDATE public.customers SET email_address = 'moved@target.example' WHERE id = %s",
            (ids[0],),
        )
        tgt.execute("UPDATE public.plain SET v = 'from target' WHERE id = 4")
    drain_direction(env, "reverse", timeout=180)
    with psycopg.connect(source_dsn, autocommit=True) as src:
        back = src.execute(
            "SELECT email, status, amount, legacy, deleted FROM public.customers WHERE id = 900001"
        ).fetchone()
        moved = src.execute("SELECT email FROM public.customers WHERE id = %s", (ids[0],))
        plain = src.execute("SELECT v FROM public.plain WHERE id = 4").fetchone()
        assert back == ("new@target.example", "active", 12, None, False), back
        assert moved.fetchone() == ("moved@target.example",)
        assert plain == ("from target",)

    # Equal again, compared in reverse mode (the target has been the primary).
    code, doc = _verify(env, "checksum")
    assert code == 0, json.dumps(doc["tables"])[:3000]
    customers = _table(doc, "public.customers")
    assert any("filtered by the plan on both sides" in n for n in customers["notes"])
    assert customers["source_rows"] == customers["target_rows"]
    assert daemon.alive(), daemon.tail()
    daemon.kill(signal.SIGTERM)
