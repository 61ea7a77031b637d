"""The target's disk fills up under load, then is freed: the applier halts, retries, recovers.

A real full disk, not a simulated error: a 16 MiB tmpfs is mounted (the tests run as
root here), a tablespace is created on it, the target's two insert-heavy tables (the
ledger and ``pgbench_history``) are moved there after the snapshot, and a ballast file
takes every free byte. PostgreSQL itself then fails to extend those tables with
SQLSTATE 53100 (``disk_full``: "could not extend file … No space left on device"); the
test checks that code on a probe table in the same tablespace. The WAL and cdcsync's
state stay on the main data directory, so only the rows' writes fail.

Expected: the stream halts with an error naming the table, topic, partition and
offset; the halt is recorded in the migration state and retried; the failing
partition's stored offset does not move and no part of the failing batch is visible;
once the ballast is deleted the retry succeeds by itself and the proof holds.
"""

from __future__ import annotations

import contextlib
import errno
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.faults.faultkit import count_rows, log_text, stored_offsets, wait_log
from tests.faults.harness import FaultRun
from tests.integration.cutover_helpers import settings_for

pytestmark = pytest.mark.stack

SIZE = "16m"
MOVED = ("public.ledger", "public.pgbench_history")
HALT = re.compile(r"cannot apply (\S+)\[(\d+)\]@(\d+) key=.*No space left on device")


@dataclass
class SmallDisk:
    mountpoint: Path
    tablespace: str

    @property
    def ballast(self) -> Path:
        return self.mountpoint / "ballast"

    def fill(self) -> int:
        """Write the ballast until the filesystem refuses another byte; its size."""
        written = 0
        with self.ballast.open("ab", buffering=0) as out:
            for chunk in (1 << 20, 1 << 12):
                block = b"\0" * chunk
                while True:
                    try:
                        written += out.write(block) or 0
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        return written

    def free(self) -> None:
        self.ballast.unlink(missing_ok=True)


@pytest.fixture
def small_disk(target_dsn: str) -> Iterator[SmallDisk]:
    """A 16 MiB filesystem with a tablespace of the target on it; all undone afterwards."""
    mountpoint = Path(f"/tmp/cdcsync-diskfull-{secrets.token_hex(4)}")
    mountpoint.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0755", "tmpfs", str(mountpoint)],
        check=True,
        capture_output=True,
    )
    location = mountpoint / "pgdata"
    location.mkdir()
    shutil.chown(location, "postgres", "postgres")
    name = f"full_{secrets.token_hex(4)}"
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE TABLESPACE {} LOCATION {}").format(
                sql.Identifier(name), sql.Literal(str(location))
            )
        )
    disk = SmallDisk(mountpoint, name)
    try:
        yield disk
    finally:
        disk.free()
        with psycopg.connect(target_dsn, autocommit=True) as conn:
            # Whatever is still there goes back to the main disk, then the space goes.
            for kind in ("TABLE", "INDEX"):
                with contextlib.suppress(psycopg.Error):
                    conn.execute(
                        sql.SQL("ALTER {} ALL IN TABLESPACE {} SET TABLESPACE pg_default").format(
                            sql.SQL(kind), sql.Identifier(name)
                        )
                    )
            conn.execute(sql.SQL("DROP TABLESPACE IF EXISTS {}").format(sql.Identifier(name)))
        done = subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            mountpoint.rmdir()


def _move(target_dsn: str, tablespace: str) -> None:
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        conn.execute("SET lock_timeout = '30s'")
        for table in MOVED:
            rel = sql.Identifier(*table.split("."))
            space = sql.Identifier(tablespace)
            conn.execute(sql.SQL("ALTER TABLE {} SET TABLESPACE {}").format(rel, space))
            for (index,) in conn.execute(
                "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = %s::regclass",
                (table,),
            ).fetchall():
                conn.execute(
                    sql.SQL("ALTER INDEX {} SET TABLESPACE {}").format(sql.SQL(index), space)
                )


def _probe_sqlstate(target_dsn: str, tablespace: str) -> str | None:
    """SQLSTATE of writing a fresh table in the full tablespace (None: it went through)."""
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        try:
            conn.execute(
                sql.SQL("CREATE TABLE public.disk_probe (v text) TABLESPACE {}").format(
                    sql.Identifier(tablespace)
                )
            )
            conn.execute(
                "INSERT INTO public.disk_probe SELECT md5(g::text) FROM generate_series(1, 9999) g"
            )
        except psycopg.Error as exc:
            return exc.sqlstate
        finally:
            conn.execute("DROP TABLE IF EXISTS public.disk_probe")
    return None


def _halt_state(env: dict[str, str]) -> str | None:
    settings = settings_for(env)
    with psycopg.connect(env["CDCSYNC_TARGET_DSN"], autocommit=True) as conn:
        row = conn.execute(
            sql.SQL("SELECT data->>'halted' FROM {}.migration WHERE migration_id = %s").format(
                sql.Identifier(settings.state_schema)
            ),
            (settings.migration_id,),
        ).fetchone()
    return str(row[0]) if row and row[0] else None


@pytest.mark.scenario(
    "target disk full (tablespace on a full filesystem, SQLSTATE 53100), then freed",
    "halt naming table/topic/partition/offset, retried; offsets held; recovers; 0 lost, 0 doubled",
)
@pytest.mark.parametrize("on_error", ["halt", pytest.param("dead-letter", marks=pytest.mark.slow)])
def test_target_disk_full_then_freed(
    fault_run: FaultRun,
    connectors: list[str],
    small_disk: SmallDisk,
    target_dsn: str,
    on_error: str,
) -> None:
    # With apply.on_error=dead-letter too: a full disk is not the event's fault, so it
    # must halt the same way rather than send every event it meets to the DLQ.
    fault_run.outcome.scenario += f" — apply.on_error={on_error}"
    fault_run.env["CDCSYNC_APPLY__ON_ERROR"] = on_error
    fault_run.env["CDCSYNC_APPLY__HALT_RETRY_SECONDS"] = "2"
    fault_run.start(connectors, seconds=45)
    time.sleep(2)
    _move(target_dsn, small_disk.tablespace)
    mark = len(log_text(fault_run.daemon))
    ballast = small_disk.fill()
    assert ballast > 0
    assert _probe_sqlstate(target_dsn, small_disk.tablespace) == "53100"

    line = wait_log(fault_run.daemon, "No space left on device", timeout=60, since=mark)
    found = HALT.search(line)
    assert found, f"the halt does not name topic, partition and offset: {line}"
    topic, partition, offset = found.group(1), int(found.group(2)), int(found.group(3))
    assert any(t in line for t in MOVED), f"the halt does not name the table: {line}"
    assert topic.endswith(("public.ledger", "public.pgbench_history")), line
    halted = _halt_state(fault_run.env)
    assert halted and "No space left on device" in halted, halted

    # While the disk stays full: retried (a second halt), nothing of the failing
    # partition applied past the failing event, nothing of the batch half-applied.
    # A retry takes a while: the set-based apply fails, then the events are tried one
    # by one (rolled back) to find the one to name.
    key = (topic, partition)
    first = stored_offsets(fault_run.env).get(key, 0)
    rows = {t: count_rows(target_dsn, t) for t in MOVED}
    after_first = log_text(fault_run.daemon).index(line) + len(line)
    again = wait_log(fault_run.daemon, "stream halted", timeout=90, since=after_first)
    assert "No space left on device" in again, again
    assert stored_offsets(fault_run.env).get(key, 0) == first <= offset
    assert {t: count_rows(target_dsn, t) for t in MOVED} == rows
    assert fault_run.daemon.alive(), fault_run.daemon.tail()

    small_disk.free()
    fault_run.finish()
    assert stored_offsets(fault_run.env)[key] > offset
    assert "Traceback" not in log_text(fault_run.daemon)
