"""Columns added on the source while streaming: added on the target, or a clear halt.

With ``apply.add_new_columns`` the target gets each new column as the source has it
(type, NOT NULL, default, and the value older rows read for it), so both sides stay
equal row for row. Without it, the applier halts naming the table and the column, and
nothing at or past the first event that carries the column is committed.
"""

from __future__ import annotations

import time

import psycopg
import pytest

from tests.integration import workload
from tests.integration.cutover_helpers import drain_direction
from tests.integration.test_e2e_stream import Daemon, wait_streaming

pytestmark = pytest.mark.stack

COLUMNS_SQL = (
    "SELECT attname, format_type(atttypid, atttypmod), attnotnull FROM pg_attribute "
    "WHERE attrelid = 'public.items'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
)


def _columns(dsn: str) -> list[tuple[str, str, bool]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [(str(a), str(b), bool(c)) for a, b, c in conn.execute(COLUMNS_SQL).fetchall()]


def _source(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.items (id int PRIMARY KEY, v text)")
        conn.execute("CREATE TABLE public.log (kind text, n int)")  # keyless
        conn.execute("ALTER TABLE public.log REPLICA IDENTITY FULL")
        conn.execute("INSERT INTO public.items SELECT g, 'v' || g FROM generate_series(1, 50) g")
        conn.execute("INSERT INTO public.log VALUES ('a', 1), ('a', 1)")


def test_new_columns_follow_the_source(
    source_dsn: str, target_dsn: str, migration_env: dict[str, str], daemon: Daemon
) -> None:
    _source(source_dsn)
    daemon.env = {**daemon.env, "CDCSYNC_APPLY__ADD_NEW_COLUMNS": "true"}
    daemon.start()
    wait_streaming(migration_env, daemon)
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.items ADD COLUMN note text NOT NULL DEFAULT 'n/a'")
        conn.execute("ALTER TABLE public.items ADD COLUMN price numeric(10,2)")
        conn.execute('ALTER TABLE public.items ADD COLUMN "Added At" timestamptz DEFAULT now()')
        conn.execute("ALTER TABLE public.log ADD COLUMN tag varchar(8) DEFAULT 'x'")
        conn.execute("INSERT INTO public.items (id, v, price) VALUES (100, 'new', 12.50)")
        conn.execute("UPDATE public.items SET v = 'changed' WHERE id = 7")
        conn.execute("UPDATE public.log SET n = 2 WHERE ctid = (SELECT min(ctid) FROM public.log)")
        conn.execute("INSERT INTO public.log VALUES ('b', 3, 'yy')")
    drain_direction(migration_env, "forward")
    diff = workload.differences(source_dsn, target_dsn)
    assert not diff, f"{diff}\n{daemon.tail()}"
    assert _columns(target_dsn) == _columns(source_dsn)
    assert daemon.alive(), daemon.tail()


def test_a_new_column_halts_when_not_allowed(
    source_dsn: str, target_dsn: str, migration_env: dict[str, str], daemon: Daemon
) -> None:
    _source(source_dsn)
    daemon.env = {**daemon.env, "CDCSYNC_APPLY__HALT_RETRY_SECONDS": "2"}
    daemon.start()
    wait_streaming(migration_env, daemon)
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.items ADD COLUMN note text")
        conn.execute("INSERT INTO public.items VALUES (100, 'new', 'carried')")
    deadline = time.monotonic() + 60
    while "note" not in daemon.log.read_text() or "not on the target" not in daemon.log.read_text():
        assert time.monotonic() < deadline, daemon.tail()
        time.sleep(0.5)
    text = daemon.log.read_text()
    assert "public.items" in text and "add_new_columns" in text, daemon.tail()
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM public.items WHERE id = 100").fetchone() == (0,)
    assert daemon.alive(), daemon.tail()  # halted and retrying, not gone
