"""pgbouncer PAUSE → repoint → RESUME: a client waits, then lands on the new backend."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from cdcsync.adapters.pgbouncer import PgbouncerAdmin, backend_of
from cdcsync.stack.pgbouncer import PgbouncerProcess
from tests.fix_stack import StackHandle

pytestmark = pytest.mark.stack


@pytest.fixture
def bouncer(stack: StackHandle, source_dsn: str) -> Iterator[PgbouncerProcess]:
    assert stack.local is not None, "pgbouncer tests need the local stack"
    root = Path(tempfile.mkdtemp(prefix="cdcsync-pgb-"))
    os.chmod(root, 0o755)
    proc = PgbouncerProcess(root, stack.local.password_file)
    proc.start({"app": backend_of(source_dsn)})
    yield proc
    proc.stop()
    shutil.rmtree(root, ignore_errors=True)


def test_pause_switch_resume(
    stack: StackHandle, bouncer: PgbouncerProcess, source_dsn: str, target_dsn: str
) -> None:
    assert stack.local is not None
    passfile = stack.local.passfile
    for dsn, side in ((source_dsn, "source"), (target_dsn, "target")):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE whoami (side text)")
            conn.execute("INSERT INTO whoami VALUES (%s)", (side,))

    app = psycopg.connect(bouncer.dsn("app", passfile), autocommit=True, prepare_threshold=None)
    assert app.execute("SELECT side FROM whoami").fetchone() == ("source",)
    app.close()

    admin = PgbouncerAdmin(bouncer.admin_dsn(passfile))
    admin.pause("app")
    answers: list[tuple[str, float]] = []

    def query() -> None:
        started = time.monotonic()
        with psycopg.connect(bouncer.dsn("app", passfile), prepare_threshold=None) as conn:
            row = conn.execute("SELECT side FROM whoami").fetchone()
            assert row is not None
            answers.append((row[0], time.monotonic() - started))

    waiter = threading.Thread(target=query)
    waiter.start()
    time.sleep(0.5)
    assert answers == [], "a query ran while the database was paused"
    admin.switch("app", bouncer.databases_file, backend_of(target_dsn))
    admin.resume("app")
    waiter.join(timeout=10)
    admin.close()
    assert len(answers) == 1
    side, waited = answers[0]
    assert side == "target"
    assert waited >= 0.5
