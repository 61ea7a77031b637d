"""Tables the plan renames through a cutover and a rollback.

After the snapshot and streaming of the renamed tables (see ``test_plan_rename``), a
cutover verifies them under the freeze, arms the reverse stream on the renamed tables
and sets their owned sequences — one moved into another schema with its table — so the
application's inserts on the new primary take fresh keys. Those writes come back onto
the source's tables under the source's names; a rollback (verified by counts) re-arms
the forward stream, whose writes land in the renamed tables again. Both sides end equal.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import psycopg
import pytest
import yaml

from tests.integration.cutover_helpers import cdcsync, drain_direction, settings_for
from tests.integration.test_e2e_stream import Daemon, wait_streaming
from tests.integration.test_plan_rename import PAIRS, PLAN, SOURCE_DDL, Writer

pytestmark = pytest.mark.stack


def _equal(source_dsn: str, target_dsn: str) -> None:
    with (
        psycopg.connect(source_dsn, autocommit=True) as src,
        psycopg.connect(target_dsn, autocommit=True) as tgt,
    ):
        for on_source, on_target in PAIRS:
            expected, actual = src.execute(on_source).fetchall(), tgt.execute(on_target).fetchall()
            assert actual == expected, (
                f"{on_target}: missing {sorted(set(expected) - set(actual))[:5]} "
                f"extra {sorted(set(actual) - set(expected))[:5]}"
            )


def test_renamed_tables_through_cutover_and_rollback(
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
        conn.execute(
            "INSERT INTO public.orders (customer, amount) "
            "SELECT 'c' || g, g FROM generate_series(1, 200) g"
        )
        conn.execute("INSERT INTO public.notes SELECT g, 'n' || g FROM generate_series(1, 50) g")
        conn.execute(
            "INSERT INTO public.tags SELECT 't' || (g % 5), g FROM generate_series(1, 40) g"
        )
        conn.execute("INSERT INTO public.plain SELECT g, 'v' FROM generate_series(1, 20) g")
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(PLAN))
    daemon.env = {**daemon.env, "CDCSYNC_PLAN": str(plan_file)}
    env = {**migration_env, "CDCSYNC_PLAN": str(plan_file)}
    writer = Writer(source_dsn, seconds=4)
    writer.truncated.set()  # no truncate in this one
    writer.start()
    daemon.start()
    wait_streaming(env, daemon)
    writer.wait()
    assert not writer.errors, writer.errors
    with psycopg.connect(source_dsn, autocommit=True) as src:  # streamed, whatever the timing
        src.execute("UPDATE public.orders SET amount = amount + 1 WHERE id <= 3")
        # Past the position the snapshot copied: only the cutover's sync moves it there.
        src.execute("INSERT INTO public.orders (customer, amount) VALUES ('streamed', 1)")
        src.execute("UPDATE public.notes SET body = body || '!' WHERE id <= 3")
        src.execute("INSERT INTO public.tags VALUES ('streamed', 1)")
        src.execute("UPDATE public.plain SET v = v || '!' WHERE id <= 3")
    drain_direction(env, "forward", timeout=180)

    cut = cdcsync(env, "cutover", "--yes", "--output", "json", "--verify", "checksum")
    assert cut.returncode == 0, cut.stderr[-3000:] + daemon.tail()
    report = json.loads(cut.stdout)
    assert report["result"] == "done" and report["verification"]["mismatches"] == {}, report

    # The sequence moved into sales with its table was set past the source's.
    with (
        psycopg.connect(source_dsn, autocommit=True) as src,
        psycopg.connect(target_dsn, autocommit=True) as tgt,
    ):
        top = src.execute("SELECT max(id) FROM public.orders").fetchone()
        there = tgt.execute("SELECT last_value FROM sales.orders_id_seq").fetchone()
        assert top is not None and there is not None and there[0] >= top[0], (there, top)

    # The application on the new primary: fresh keys from the moved sequence, back on the
    # source under the source's names.
    with psycopg.connect(target_dsn, autocommit=True) as tgt:
        new_id = tgt.execute(
            "INSERT INTO sales.orders_v2 (customer_name, amount) VALUES ('on target', 7) "
            "RETURNING id"
        ).fetchone()
        assert new_id is not None
        tgt.execute("UPDATE sales.orders_v2 SET amount = 0 WHERE id = 1")
        tgt.execute("INSERT INTO public.notes_v2 VALUES (1000, 'from target')")
        tgt.execute("INSERT INTO public.tag_list VALUES ('target', 1)")
        tgt.execute("DELETE FROM public.plain WHERE id = 2")
    drain_direction(env, "reverse", timeout=180)
    with psycopg.connect(source_dsn, autocommit=True) as src:
        back = src.execute(
            "SELECT customer, amount FROM public.orders WHERE id = %s", (new_id[0],)
        ).fetchone()
        assert back == ("on target", 7), back
        assert src.execute("SELECT body FROM public.notes WHERE id = 1000").fetchone() == (
            "from target",
        )
    _equal(source_dsn, target_dsn)
    code = cdcsync(env, "verify", "--level", "checksum", "--output", "json")
    assert code.returncode == 0, code.stdout[-3000:] + code.stderr[-2000:]

    rolled = cdcsync(env, "rollback", "--yes", "--output", "json", "--verify", "counts")
    assert rolled.returncode == 0, rolled.stderr[-3000:] + daemon.tail()
    assert json.loads(rolled.stdout)["verification"]["mismatches"] == {}
    with psycopg.connect(source_dsn, autocommit=True) as src:
        src.execute("INSERT INTO public.orders (customer, amount) VALUES ('after rollback', 1)")
        src.execute("TRUNCATE public.tags")
    drain_direction(env, "forward", timeout=180)
    _equal(source_dsn, target_dsn)
    assert daemon.alive(), daemon.tail()
    daemon.kill(signal.SIGTERM)
