"""Three daemons share one migration's stream through a consumer group.

The tables' topics have three partitions (``topic_partitions``; the table without a key
gets one). The three processes start together: one takes the snapshot lock and
snapshots, the others wait for it, then the group spreads the partitions over all three.
One is killed with SIGKILL under load; after the session timeout its partitions go to
the survivors, which seek to the offsets stored in the target. Expected: sides equal,
every acknowledged ledger write once, and the logs show the partitions were shared and
then taken over.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import psycopg
import pytest

from tests.faults.harness import Outcome
from tests.integration import workload
from tests.integration.cutover_helpers import (
    LEDGER_DDL,
    App,
    cdcsync,
    drain_direction,
    hook,
    settings_for,
)
from tests.integration.test_e2e_stream import Daemon, wait_streaming

pytestmark = pytest.mark.stack


def _assigned(log: Path) -> list[list[str]]:
    """Every assignment a daemon logged, as lists of topic[partition]."""
    out = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        message = str(record.get("msg", ""))
        if message.startswith("assigned "):
            out.append([p.split("@")[0] for p in json.loads(message[9:].replace("'", '"'))])
    return out


def _last(log: Path) -> list[str]:
    found = _assigned(log)
    return found[-1] if found else []


@pytest.mark.scenario(
    "one of three daemons killed (SIGKILL), topics of 3 partitions, then cutover",
    "survivors take its partitions from the stored offsets; the cutover drains across "
    "both; nothing lost or doubled",
)
def test_kill_one_of_three_daemons(
    fault_outcome: Outcome,
    source_dsn: str,
    target_dsn: str,
    migration_env: dict[str, str],
    connectors: list[str],
    tmp_path: Path,
) -> None:
    connectors.append(settings_for(migration_env).reverse_connector_name)
    workload.create_source(source_dsn, scale=1)
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(LEDGER_DDL)
    env = {**migration_env, "CDCSYNC_TOPIC_PARTITIONS": "3"}
    daemons = [
        Daemon({**env, "CDCSYNC_INSTANCE_ID": f"cdcsync-{i}"}, tmp_path / f"daemon-{i}.log")
        for i in range(3)
    ]
    try:
        for d in daemons:
            d.start()
        wait_streaming(env, daemons[0])
        primary = tmp_path / "primary"
        app = App({"source": source_dsn, "target": target_dsn}, primary)
        app.start()
        load = workload.Load(source_dsn, seconds=40, seed=19, exclude=("truncate",), rate=200)
        load.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(_last(d.log) for d in daemons):
                break
            time.sleep(1)
        shared = {i: _last(d.log) for i, d in enumerate(daemons)}
        assert all(shared.values()), f"partitions not shared: {shared}"
        victim = shared[1]
        time.sleep(3)
        daemons[1].kill(signal.SIGKILL)
        load.wait()
        assert not load.errors, load.errors
        drain_direction(env, "forward", timeout=240)
        taken = {p for d in (daemons[0], daemons[2]) for p in _last(d.log)}
        assert set(victim) <= taken, f"{victim} not taken over: {taken}"

        # A cutover drains across both surviving processes; both then apply the
        # reverse stream while the ledger writes on the new primary.
        cut = cdcsync(env, "cutover", "--yes", "--verify", "counts", "--on-switch", hook(primary))
        assert cut.returncode == 0, cut.stderr + daemons[0].tail()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and app.sides.get("target", 0) < 50:
            time.sleep(0.5)
        app.stop()
        assert app.sides.get("target", 0) >= 50, app.sides
        drain_direction(env, "reverse", timeout=240)
        diff = workload.differences(source_dsn, target_dsn)
        assert not diff, f"{diff}\n{daemons[0].tail()}"
        reverse_groups = [
            d
            for d in (daemons[0], daemons[2])
            if "starting the reverse stream" in d.log.read_text()
        ]
        assert len(reverse_groups) == 2, "both survivors apply the reverse stream"
        counts = app.check(target_dsn)
        fault_outcome.acknowledged = counts["acknowledged"]
        fault_outcome.lost, fault_outcome.doubled = counts["lost"], counts["doubled"]
        assert counts["lost"] == counts["doubled"] == counts["unexpected"] == 0, counts
        snapshotting = [d for d in daemons if "snapshot done" in d.log.read_text()]
        assert len(snapshotting) == 1, "exactly one process snapshots"
        for d in (daemons[0], daemons[2]):
            assert d.alive(), d.tail()
    finally:
        for d in daemons:
            if d.alive():
                d.kill(signal.SIGTERM)
