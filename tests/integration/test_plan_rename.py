"""Tables the plan renames: through the snapshot, the streaming apply, the fence and verify.

Three tables land under other names — one into another schema with a column renamed
too (its serial sequence follows it), one in its schema, one without a primary key —
next to one that keeps its name, while a writer inserts, updates, deletes and, once
streaming, truncates a renamed table. The target is compared by SQL written here by
hand (source table against the renamed one), nothing is left under the old names, the
renamed tables carry the write fence, and ``cdcsync verify`` reports both sides equal
at every level, names the key of a row damaged in a renamed table, and is equal again
once it is put back. Plans that rename two tables onto one name, or onto a migrated
table, are refused naming the plan's entry.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from cdcsync.adapters import fence
from cdcsync.core.events import TableId
from tests.integration import workload
from tests.integration.cutover_helpers import cdcsync, drain_direction
from tests.integration.test_e2e_stream import Daemon, wait_streaming

pytestmark = pytest.mark.stack

SOURCE_DDL = """
CREATE TABLE public.orders (id bigserial PRIMARY KEY, customer text NOT NULL, amount integer);
CREATE TABLE public.notes (id integer PRIMARY KEY, body text);
CREATE TABLE public.tags (tag text, weight integer);
ALTER TABLE public.tags REPLICA IDENTITY FULL;
CREATE TABLE public.plain (id integer PRIMARY KEY, v text);
"""

PLAN: dict[str, Any] = {
    "version": 1,
    "tables": {
        "public.orders": {
            "rename": "sales.orders_v2",
            "columns": {"customer": {"rename": "customer_name"}},
        },
        "public.notes": {"rename": "notes_v2"},
        "public.tags": {"rename": "public.tag_list"},
    },
}

#: source query → target query, each giving the same rows when the target is right.
PAIRS = [
    (
        "SELECT id, customer, amount FROM public.orders ORDER BY id",
        "SELECT id, customer_name, amount FROM sales.orders_v2 ORDER BY id",
    ),
    (
        "SELECT id, body FROM public.notes ORDER BY id",
        "SELECT id, body FROM public.notes_v2 ORDER BY id",
    ),
    (
        'SELECT tag, weight FROM public.tags ORDER BY tag COLLATE "C", weight',
        'SELECT tag, weight FROM public.tag_list ORDER BY tag COLLATE "C", weight',
    ),
    ("SELECT id, v FROM public.plain ORDER BY id", "SELECT id, v FROM public.plain ORDER BY id"),
]

SOURCE_NAMES = [TableId("public", n) for n in ("orders", "notes", "tags", "plain")]


class Writer(workload.Writer):
    """Writes to every table for ``seconds`` at least, and on until it has emptied the
    notes once (when ``truncate`` is set) and written two seconds more."""

    seed = 11
    grace = 240.0

    def __init__(self, dsn: str, seconds: float) -> None:
        super().__init__(dsn, seconds)
        self.truncate = threading.Event()
        self.truncated = threading.Event()

    def write(self, conn: psycopg.Connection[Any], rng: random.Random, end: float) -> None:
        cap = end + 180
        n = 0
        while time.monotonic() < cap and (time.monotonic() < end or not self.truncated.is_set()):
            n += 1
            conn.execute(
                "INSERT INTO public.orders (customer, amount) VALUES (%s, %s)",
                (f"c{n}", rng.randint(1, 500)),
            )
            pick = rng.randint(1, 200 + n)
            conn.execute(
                "UPDATE public.orders SET amount = amount + 1, customer = customer || '+' "
                "WHERE id = %s",
                (pick,),
            )
            if rng.random() < 0.2:
                conn.execute("DELETE FROM public.orders WHERE id = %s", (pick + 1,))
            conn.execute(
                "INSERT INTO public.notes VALUES (%s, %s) ON CONFLICT (id) DO UPDATE "
                "SET body = public.notes.body || '.'",
                (n % 80, f"note {n}"),
            )
            conn.execute(
                "INSERT INTO public.tags VALUES (%s, %s)", (f"t{n % 7}", rng.randint(0, 9))
            )
            if rng.random() < 0.3:
                conn.execute(
                    "UPDATE public.tags SET weight = weight + 1 WHERE ctid = "
                    "(SELECT ctid FROM public.tags WHERE tag = %s LIMIT 1)",
                    (f"t{n % 7}",),
                )
            conn.execute(
                "INSERT INTO public.plain VALUES (%s, 'p') ON CONFLICT (id) DO UPDATE "
                "SET v = public.plain.v || '+'",
                (n % 30,),
            )
            if self.truncate.is_set() and not self.truncated.is_set():
                conn.execute("TRUNCATE public.notes")
                self.truncated.set()
                end = max(end, time.monotonic() + 2)
            time.sleep(0.005)


def _verify(env: dict[str, str], level: str) -> tuple[int, dict[str, Any]]:
    done = cdcsync(env, "verify", "--level", level, "--output", "json")
    assert done.returncode in (0, 3), done.stderr[-3000:]
    doc: dict[str, Any] = json.loads(done.stdout)
    return done.returncode, doc


def _table(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(t for t in doc["tables"] if t["table"] == name)
    return found


def test_renamed_tables_through_snapshot_streaming_fence_and_verify(
    source_dsn: str,
    target_dsn: str,
    migration_env: dict[str, str],
    daemon: Daemon,
    tmp_path: Path,
) -> None:
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(SOURCE_DDL)
        conn.execute(
            "INSERT INTO public.orders (customer, amount) "
            "SELECT 'c' || g, g FROM generate_series(1, 300) g"
        )
        conn.execute("INSERT INTO public.notes SELECT g, 'n' || g FROM generate_series(1, 50) g")
        conn.execute(
            "INSERT INTO public.tags SELECT 't' || (g % 5), g FROM generate_series(1, 40) g"
        )
        conn.execute("INSERT INTO public.tags VALUES ('dup', 1), ('dup', 1)")  # keyless twins
        conn.execute("INSERT INTO public.plain SELECT g, 'v' FROM generate_series(1, 20) g")

    # Refused before anything runs, naming the plan's entry.
    for bad, needle in (
        (
            {"public.orders": {"rename": "x"}, "public.notes": {"rename": "public.x"}},
            "tables.public.orders.rename: public.notes is renamed onto public.x too",
        ),
        ({"public.notes": {"rename": "plain"}}, "tables.public.notes.rename: public.plain is a"),
    ):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({"tables": bad}))
        refused = cdcsync(migration_env, "plan", "--check", str(path))
        assert refused.returncode in (2, 3) and needle in refused.stderr, refused.stderr

    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(PLAN))
    checked = cdcsync(migration_env, "plan", "--check", str(plan_file))
    assert checked.returncode == 0, checked.stderr

    daemon.env = {**daemon.env, "CDCSYNC_PLAN": str(plan_file)}
    env = {**migration_env, "CDCSYNC_PLAN": str(plan_file)}
    writer = Writer(source_dsn, seconds=10)
    writer.start()  # the snapshot runs under the writer
    daemon.start()
    wait_streaming(env, daemon)
    writer.truncate.set()  # a truncate of a renamed table, streamed
    writer.wait()
    assert not writer.errors, writer.errors
    assert writer.truncated.is_set()
    drain_direction(env, "forward", timeout=180)

    with (
        psycopg.connect(source_dsn, autocommit=True) as src,
        psycopg.connect(target_dsn, autocommit=True) as tgt,
    ):
        for on_source, on_target in PAIRS:
            expected = src.execute(on_source).fetchall()
            actual = tgt.execute(on_target).fetchall()
            assert expected, on_source
            assert actual == expected, (
                f"{on_target}: missing {sorted(set(expected) - set(actual))[:5]} "
                f"extra {sorted(set(actual) - set(expected))[:5]}\n{daemon.tail()}"
            )
        # Nothing left under the old names; the serial sequence moved with its table.
        for old in ("public.orders", "public.notes", "public.tags", "sales.orders"):
            assert tgt.execute("SELECT to_regclass(%s)", (old,)).fetchone() == (None,), old
        owned = tgt.execute("SELECT pg_get_serial_sequence('sales.orders_v2', 'id')").fetchone()
        assert owned == ("sales.orders_id_seq",), owned
        # The fence covers the renamed tables: found by the source's names, and it bites.
        assert fence.check(tgt, SOURCE_NAMES) == []
        with pytest.raises(psycopg.Error) as bitten:
            tgt.execute("INSERT INTO sales.orders_v2 (customer_name) VALUES ('app')")
        assert bitten.value.sqlstate == fence.SQLSTATE
        assert "orders_v2 is write-fenced" in str(bitten.value)
        with pytest.raises(psycopg.Error) as bitten:
            tgt.execute("DELETE FROM public.tag_list")
        assert bitten.value.sqlstate == fence.SQLSTATE

    # verify compares each source table with its renamed target table.
    for level in ("counts", "checksum", "rows"):
        code, doc = _verify(env, level)
        assert code == 0 and doc["ok"], json.dumps(doc["tables"])[:3000]
        orders = _table(doc, "public.orders")
        assert orders["source_rows"] == orders["target_rows"] > 300, orders
        if level != "counts":
            assert any("sales.orders_v2 on the target" in n for n in orders["notes"]), orders
            assert _table(doc, "public.tags")["method"] == "row-digest buckets"

    # A row damaged in a renamed table is named by its key; put back, equal again.
    with psycopg.connect(target_dsn, autocommit=True) as tgt:
        tgt.execute("SET session_replication_role = replica")  # past the fence
        row = tgt.execute(
            "SELECT id, amount FROM sales.orders_v2 ORDER BY id LIMIT 1 OFFSET 7"
        ).fetchone()
        assert row is not None
        tgt.execute("UPDATE sales.orders_v2 SET amount = -1 WHERE id = %s", (row[0],))
        code, doc = _verify(env, "rows")
        assert code == 3 and not doc["ok"]
        assert _table(doc, "public.orders")["changed"] == [{"id": str(row[0])}], doc["tables"]
        tgt.execute("UPDATE sales.orders_v2 SET amount = %s WHERE id = %s", (row[1], row[0]))
    code, doc = _verify(env, "checksum")
    assert code == 0 and doc["ok"], json.dumps(doc["tables"])[:3000]
    assert daemon.alive(), daemon.tail()
    daemon.kill(signal.SIGTERM)
