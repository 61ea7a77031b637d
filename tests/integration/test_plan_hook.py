"""A plan with a Python hook: snapshot, streaming and verification honour it.

The hook (``tests.integration.plan_hooks:mask_email``) masks e-mails. Existing rows go
through the snapshot, then a writer inserts, updates (e-mails, and other columns of rows
whose e-mail is TOASTed, so Debezium sends it as its unchanged-value placeholder) and
deletes. The target's e-mails are compared with the hook applied here, in Python, to the
source's values; the rest by SQL. ``cdcsync verify`` then finds the other columns equal
and says the hooked one is not compared.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tests.integration import workload
from tests.integration.cutover_helpers import cdcsync, drain_direction
from tests.integration.plan_hooks import mask_email
from tests.integration.test_e2e_stream import Daemon, wait_streaming

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[2]

SOURCE_DDL = """
CREATE TABLE public.people (
    id bigint PRIMARY KEY,
    email text,
    name text NOT NULL,
    score integer NOT NULL
);
"""

PLAN = {
    "version": 1,
    "tables": {
        "public.people": {
            "columns": {
                "email": {"transform": [{"hook": "tests.integration.plan_hooks:mask_email"}]},
                "name": {"transform": "trim"},
            }
        }
    },
}


def _email(rng: random.Random, key: int) -> str | None:
    pick = rng.random()
    if pick < 0.1:
        return None
    if pick < 0.3:  # long and incompressible: stored out of line (TOAST)
        return f"{rng.randbytes(4000).hex()}{key}@Long.Example"
    return f"User{key}.{rng.randint(0, 99)}@Example.COM"


def _row(rng: random.Random, key: int) -> tuple[object, ...]:
    return key, _email(rng, key), f"  n{key} ", rng.randint(0, 1000)


class Writer(workload.Writer):
    """Inserts, updates (e-mails, or only the score) and deletes for a while."""

    seed = 7

    def write(self, conn: psycopg.Connection[Any], rng: random.Random, end: float) -> None:
        key = 1000
        while time.monotonic() < end:
            key += 1
            conn.execute("INSERT INTO public.people VALUES (%s, %s, %s, %s)", _row(rng, key))
            other = rng.randint(1, key)
            pick = rng.random()
            if pick < 0.4:
                conn.execute(
                    "UPDATE public.people SET email = %s WHERE id = %s",
                    (_email(rng, other), other),
                )
            elif pick < 0.8:  # a TOASTed e-mail arrives as the placeholder
                conn.execute("UPDATE public.people SET score = score + 1 WHERE id = %s", (other,))
            elif pick < 0.9:
                conn.execute("DELETE FROM public.people WHERE id = %s", (other,))
            time.sleep(0.005)


def test_a_hook_through_snapshot_streaming_and_verify(
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
                "INSERT INTO public.people VALUES (%s, %s, %s, %s)",
                [_row(rng, k) for k in range(1, 401)],
            )
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(PLAN))
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**migration_env, "CDCSYNC_PLAN": str(plan_file), "PYTHONPATH": path}
    checked = cdcsync(env, "plan", "--check", str(plan_file))
    assert checked.returncode == 0, checked.stderr

    # A wrong hook is refused when the plan is read, naming where it is.
    bad = tmp_path / "bad.yaml"
    wrong = json.loads(json.dumps(PLAN))
    wrong["tables"]["public.people"]["columns"]["email"]["transform"] = [
        {"hook": "tests.integration.plan_hooks:missing"}
    ]
    bad.write_text(yaml.safe_dump(wrong))
    refused = cdcsync(env, "plan", "--check", str(bad))
    assert refused.returncode != 0, refused.stdout
    assert "tables.public.people.columns.email.transform[0].hook" in refused.stderr, refused.stderr

    daemon.env = {**daemon.env, "CDCSYNC_PLAN": str(plan_file), "PYTHONPATH": path}
    daemon.start()
    wait_streaming(env, daemon)
    # The snapshot's rows (nothing written since) went through the hook.
    with (
        psycopg.connect(source_dsn, autocommit=True) as src,
        psycopg.connect(target_dsn, autocommit=True) as tgt,
    ):
        copied = src.execute("SELECT id, email FROM public.people ORDER BY id").fetchall()
        snap = tgt.execute("SELECT id, email FROM public.people ORDER BY id").fetchall()
    assert len(copied) == 400 and snap == [(i, mask_email(e)) for i, e in copied]
    assert sum(e != mask_email(e) for _, e in copied) > 300
    writer = Writer(source_dsn, seconds=10)
    writer.start()
    writer.wait()
    assert not writer.errors, writer.errors
    drain_direction(env, "forward", timeout=180)

    with (
        psycopg.connect(source_dsn, autocommit=True) as src,
        psycopg.connect(target_dsn, autocommit=True) as tgt,
    ):
        rows = src.execute("SELECT id, email FROM public.people ORDER BY id").fetchall()
        expected = [(i, mask_email(e)) for i, e in rows]
        actual = tgt.execute("SELECT id, email FROM public.people ORDER BY id").fetchall()
        others = "SELECT id, {} , score FROM public.people ORDER BY id"
        assert (
            tgt.execute(others.format("name")).fetchall()
            == src.execute(others.format("btrim(name)")).fetchall()
        )
    assert len(expected) > 700, len(expected)
    wrong_rows = [(a, e) for a, e in zip(actual, expected, strict=False) if a != e][:3]
    assert actual == expected, f"{wrong_rows}\n{daemon.tail()}"
    assert sum(e is None for _, e in expected) > 10
    long_ones = [i for i, e in rows if e is not None and len(e) > 4000]
    assert len(long_ones) > 50, len(long_ones)

    done = cdcsync(env, "verify", "--level", "checksum", "--output", "json")
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout)
    assert doc["ok"], json.dumps(doc["tables"])[:3000]
    (people,) = [t for t in doc["tables"] if t["table"] == "public.people"]
    assert people["source_rows"] == people["target_rows"] == len(expected)
    notes = people["notes"]
    assert any(n.startswith("email: computed by the Python hook") for n in notes), notes
    assert not any("only on the target" in n for n in notes), notes
    assert daemon.alive(), daemon.tail()
    daemon.kill(signal.SIGTERM)
