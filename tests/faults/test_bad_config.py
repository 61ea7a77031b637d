"""Every plausible bad configuration, through the real CLI against the real stack.

Each case runs ``python -m cdcsync <command>`` as an operator would, with one mistake in
the environment or the YAML file. Expected, every time: one ``error:`` line naming the
key, file, variable or host at fault; the documented exit code (2 configuration, 3
precondition not met); no traceback; no secret in stdout or stderr; and nothing
created — no slot, no publication, no connector, no cdcsync schema, no table on the
target — because each mistake is caught before the first thing is created.
"""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdcsync.adapters.connect_rest import ConnectClient
from tests.faults.harness import Outcome
from tests.fix_stack import StackHandle, _drop_database, _new_database
from tests.integration.cutover_helpers import cdcsync

pytestmark = pytest.mark.stack

WRONG_PASSWORD = "Wr0ng-" + secrets.token_hex(6)
CONNECT_PASSWORD = "C0nnect-" + secrets.token_hex(6)


@dataclass(frozen=True)
class Case:
    """One mistake: the command, what changes, the exit code and what the message names."""

    command: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    config: str | None = None  # YAML text written to a file passed with --config
    code: int = 2
    names: tuple[str, ...] = ()
    secret: str | None = None


@dataclass
class Slice:
    """A source with one table and an empty target, plus the stack's other addresses."""

    env: dict[str, str]
    source_dsn: str
    target_dsn: str
    admin: dict[str, str]


def _without_passfile(dsn: str, password: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    info.pop("passfile", None)
    info["password"] = password
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in info.items()})


@pytest.fixture(scope="module")
def bad_config_slice(stack: StackHandle) -> Iterator[Slice]:
    admin = {side: stack.admin_dsn(side) for side in ("source", "target")}
    src_name, src = _new_database(admin["source"], "cfgsrc")
    tgt_name, tgt = _new_database(admin["target"], "cfgtgt")
    with psycopg.connect(src, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO public.t SELECT g, 'v' || g FROM generate_series(1, 100) g")
    env = {
        "CDCSYNC_SOURCE_DSN": src,
        "CDCSYNC_TARGET_DSN": tgt,
        "CDCSYNC_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
        "CDCSYNC_CONNECT_URL": stack.connect_url,
        "CDCSYNC_CONNECT_SECRETS_FILE": stack.connect_secrets_file,
        "CDCSYNC_METRICS_ADDR": "127.0.0.1:0",
        "CDCSYNC_LOG_FORMAT": "json",
    }
    yield Slice(env, src, tgt, admin)
    _drop_database(admin["source"], src_name)
    _drop_database(admin["target"], tgt_name)


RUN = ("run",)
CASES: dict[str, Case] = {
    # ---- unreachable or refusing services
    "source-dsn-unreachable": Case(
        RUN,
        {"CDCSYNC_SOURCE_DSN": "host=127.0.0.1 port=1 dbname=app user=postgres"},
        code=3,
        names=("source database", "port=1"),
    ),
    "target-dsn-unreachable": Case(
        RUN,
        {"CDCSYNC_TARGET_DSN": "host=127.0.0.1 port=1 dbname=app user=postgres"},
        code=3,
        names=("target database", "port=1"),
    ),
    "source-dsn-unknown-host": Case(
        ("snapshot",),
        {"CDCSYNC_SOURCE_DSN": "host=db.invalid dbname=app user=postgres connect_timeout=5"},
        code=3,
        names=("source database", "db.invalid"),
    ),
    "source-wrong-password": Case(
        ("snapshot",),
        {"CDCSYNC_SOURCE_DSN": "{source_wrong_password}"},
        code=3,
        names=("source database", "password authentication failed"),
        secret=WRONG_PASSWORD,
    ),
    "target-wrong-password": Case(
        RUN,
        {"CDCSYNC_TARGET_DSN": "{target_wrong_password}"},
        code=3,
        names=("target database", "password authentication failed"),
        secret=WRONG_PASSWORD,
    ),
    "source-database-missing": Case(
        RUN,
        {"CDCSYNC_SOURCE_DSN": "{source_no_database}"},
        code=3,
        names=("source database", "no_such_db"),
    ),
    "kafka-unreachable": Case(
        RUN,
        {"CDCSYNC_KAFKA_BOOTSTRAP": "127.0.0.1:1"},
        code=3,
        names=("Kafka at 127.0.0.1:1", "CDCSYNC_KAFKA_BOOTSTRAP"),
    ),
    "connect-unreachable": Case(
        RUN,
        {"CDCSYNC_CONNECT_URL": "http://127.0.0.1:1"},
        code=3,
        names=("http://127.0.0.1:1", "CDCSYNC_CONNECT_URL", "refused"),
    ),
    "connect-url-without-scheme": Case(
        RUN,
        {"CDCSYNC_CONNECT_URL": "{connect_hostport}"},
        code=3,
        names=("CDCSYNC_CONNECT_URL", "http://"),
    ),
    "connect-url-wrong-path": Case(
        RUN,
        {"CDCSYNC_CONNECT_URL": "{connect_url}/v1/api"},
        code=3,
        names=("/v1/api", "CDCSYNC_CONNECT_URL", "Debezium"),
    ),
    "connect-url-with-credentials-unreachable": Case(
        RUN,
        {"CDCSYNC_CONNECT_URL": f"http://admin:{CONNECT_PASSWORD}@127.0.0.1:1"},
        code=3,
        names=("127.0.0.1:1", "CDCSYNC_CONNECT_URL"),
        secret=CONNECT_PASSWORD,
    ),
    "metrics-addr-in-use": Case(
        RUN,
        {"CDCSYNC_METRICS_ADDR": "{busy_addr}"},
        code=3,
        names=("{busy_addr}", "CDCSYNC_METRICS_ADDR", "in use"),
    ),
    "metrics-addr-without-port": Case(
        RUN, {"CDCSYNC_METRICS_ADDR": "localhost"}, code=2, names=("CDCSYNC_METRICS_ADDR",)
    ),
    # ---- missing settings and files
    "target-dsn-missing": Case(
        RUN, {"CDCSYNC_TARGET_DSN": ""}, names=("target_dsn", "CDCSYNC_TARGET_DSN")
    ),
    "kafka-bootstrap-missing": Case(
        RUN, {"CDCSYNC_KAFKA_BOOTSTRAP": ""}, names=("CDCSYNC_KAFKA_BOOTSTRAP",)
    ),
    "source-password-file-missing": Case(
        RUN,
        {"CDCSYNC_SOURCE_PASSWORD_FILE": "/nonexistent/source-password"},
        names=("source password file", "/nonexistent/source-password", "No such file"),
    ),
    "config-file-not-found": Case(
        ("run", "--config", "/nonexistent/cdcsync.yaml"),
        names=("/nonexistent/cdcsync.yaml", "No such file"),
    ),
    "config-file-not-found-env": Case(
        RUN,
        {"CDCSYNC_CONFIG": "/nonexistent/cdcsync.yaml"},
        names=("/nonexistent/cdcsync.yaml", "No such file"),
    ),
    "config-file-is-a-directory": Case(("run", "--config", "/tmp"), names=("/tmp", "directory")),
    # ---- the file's syntax
    "yaml-malformed": Case(
        RUN, config="apply: [batch_max_events\n", names=("{config}", "not valid YAML", "line 2")
    ),
    "toml-instead-of-yaml": Case(
        RUN,
        config='[apply]\nbatch_max_events = 5000\nmigration_id = "m"\n',
        names=("{config}", "not valid YAML", "line 2"),
    ),
    "yaml-top-level-list": Case(
        RUN, config="- source_dsn: x\n", names=("{config}", "top level must be a mapping")
    ),
    "yaml-tab-indented": Case(
        RUN, config="apply:\n\tbatch_max_events: 10\n", names=("{config}", "not valid YAML")
    ),
    # ---- keys and values
    "unknown-key-typo": Case(
        RUN,
        config="sourse_dsn: 'host=x'\n",
        names=("{config}", "sourse_dsn", "unknown setting", "source_dsn"),
    ),
    "unknown-nested-key-typo": Case(
        RUN,
        config="apply:\n  bach_max_events: 5000\n",
        names=("apply.bach_max_events", "unknown setting", "apply.batch_max_events"),
    ),
    "unknown-nested-key-env": Case(
        RUN,
        {"CDCSYNC_APPLY__BATCH_MAX_EVENT": "5000"},
        names=("apply.batch_max_event", "CDCSYNC_APPLY__BATCH_MAX_EVENT", "batch_max_events"),
    ),
    "unknown-top-level-env-typo": Case(
        RUN,
        {"CDCSYNC_SOURSE_DSN": "host=127.0.0.1"},
        names=("CDCSYNC_SOURSE_DSN", "unknown setting", "CDCSYNC_SOURCE_DSN"),
    ),
    "wrong-type-string-for-int": Case(
        RUN, config="workers: four\n", names=("{config}", "workers", "integer")
    ),
    "wrong-type-env": Case(
        RUN,
        {"CDCSYNC_APPLY__BATCH_MAX_EVENTS": "lots"},
        names=("apply.batch_max_events", "CDCSYNC_APPLY__BATCH_MAX_EVENTS", "integer"),
    ),
    "wrong-type-section-scalar": Case(RUN, config="apply: 5000\n", names=("{config}", "apply")),
    "batch-size-zero": Case(
        RUN,
        config="apply:\n  batch_max_events: 0\n",
        names=("apply.batch_max_events", "greater than or equal to 1"),
    ),
    "batch-size-negative": Case(
        RUN,
        {"CDCSYNC_APPLY__BATCH_MAX_EVENTS": "-5"},
        names=("apply.batch_max_events", "greater than or equal to 1"),
    ),
    "batch-bytes-too-small": Case(
        RUN, config="apply:\n  batch_max_bytes: 10\n", names=("apply.batch_max_bytes", "1024")
    ),
    "workers-zero": Case(RUN, {"CDCSYNC_WORKERS": "0"}, names=("workers", "CDCSYNC_WORKERS")),
    "halt-retry-negative": Case(
        RUN,
        config="apply:\n  halt_retry_seconds: -1\n",
        names=("apply.halt_retry_seconds", "greater than 0"),
    ),
    "on-error-unknown": Case(
        RUN, config="apply:\n  on_error: skip\n", names=("apply.on_error", "halt", "dead-letter")
    ),
    "log-format-unknown": Case(
        RUN, {"CDCSYNC_LOG_FORMAT": "xml"}, names=("log_format", "CDCSYNC_LOG_FORMAT")
    ),
    "dead-letter-topic-under-prefix": Case(
        RUN,
        config="apply:\n  dead_letter_topic: '{migration_id}.dlq'\n",
        names=("apply.dead_letter_topic", "{migration_id}.dlq", "topic prefix"),
    ),
    "cutover-freeze-timeout-zero": Case(
        ("cutover", "--dry-run"),
        config="cutover:\n  freeze_timeout_seconds: 0\n",
        names=("cutover.freeze_timeout_seconds", "greater than 0"),
    ),
    "pgbouncer-section-incomplete": Case(
        RUN,
        config="pgbouncer:\n  admin_dsn: 'host=127.0.0.1 port=6432 dbname=pgbouncer'\n",
        names=("pgbouncer.databases_file", "pgbouncer.database", "Field required"),
    ),
    # ---- names unsafe for slots, publications and topics
    "migration-id-unsafe-characters": Case(
        RUN, {"CDCSYNC_MIGRATION_ID": "orders-2024!"}, names=("migration_id", "orders-2024!")
    ),
    "migration-id-upper-case": Case(
        RUN, {"CDCSYNC_MIGRATION_ID": "Orders"}, names=("migration_id", "lower-case")
    ),
    "migration-id-dotted": Case(
        RUN, {"CDCSYNC_MIGRATION_ID": "orders.v2"}, names=("migration_id", "orders.v2")
    ),
    "migration-id-too-long-for-slot-names": Case(
        RUN, {"CDCSYNC_MIGRATION_ID": "m" * 60}, names=("migration_id", "max 54")
    ),
    "state-schema-unsafe": Case(
        RUN, {"CDCSYNC_STATE_SCHEMA": "cdc sync"}, names=("state_schema", "CDCSYNC_STATE_SCHEMA")
    ),
    # ---- what the configuration names does not exist
    "table-list-names-missing-table": Case(
        RUN, {"CDCSYNC_TABLES": "public.t,public.nope"}, names=("public.nope", "CDCSYNC_TABLES")
    ),
    "table-list-without-schema": Case(
        RUN, {"CDCSYNC_TABLES": "t"}, names=("CDCSYNC_TABLES", "schema.table")
    ),
    "schema-list-names-missing-schema": Case(
        RUN, {"CDCSYNC_SCHEMAS": "public,sales"}, names=("sales", "CDCSYNC_SCHEMAS")
    ),
}


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def _created(sl: Slice, migration_id: str) -> list[str]:
    """Whatever a failed command left behind on either side or in Connect."""
    found: list[str] = []
    with psycopg.connect(sl.source_dsn, autocommit=True) as conn:
        found += [
            f"source slot {r[0]}"
            for r in conn.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE database = current_database()"
            )
        ]
        found += [f"source publication {r[0]}" for r in conn.execute("TABLE pg_publication")]
        found += [
            f"source schema {r[0]}"
            for r in conn.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' "
                "AND nspname NOT IN ('public', 'information_schema')"
            )
        ]
    with psycopg.connect(sl.target_dsn, autocommit=True) as conn:
        found += [
            f"target relation {r[0]}.{r[1]}"
            for r in conn.execute(
                "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
                "ON n.oid = c.relnamespace WHERE n.nspname NOT LIKE 'pg\\_%' "
                "AND n.nspname <> 'information_schema'"
            )
        ]
        found += [
            f"target schema {r[0]}"
            for r in conn.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' "
                "AND nspname NOT IN ('public', 'information_schema')"
            )
        ]
    client = ConnectClient(sl.env["CDCSYNC_CONNECT_URL"])
    found += [f"connector {c}" for c in client.connectors() if c.startswith(migration_id)]
    return found


@pytest.fixture
def busy_port() -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.mark.scenario("bad configuration", "clear error, documented exit code, nothing created")
@pytest.mark.parametrize("name", list(CASES))
def test_bad_configuration(
    name: str,
    bad_config_slice: Slice,
    fault_outcome: Outcome,
    busy_port: str,
    tmp_path: Path,
) -> None:
    case = CASES[name]
    sl = bad_config_slice
    migration_id = f"cfg{secrets.token_hex(4)}"
    config_path = tmp_path / "cdcsync.yaml"
    connect = sl.env["CDCSYNC_CONNECT_URL"]
    values = {
        "migration_id": migration_id,
        "config": str(config_path),
        "connect_url": connect,
        "connect_hostport": connect.removeprefix("http://"),
        "busy_addr": busy_port,
        "source_wrong_password": _without_passfile(sl.source_dsn, WRONG_PASSWORD),
        "target_wrong_password": _without_passfile(sl.target_dsn, WRONG_PASSWORD),
        "source_no_database": psycopg.conninfo.make_conninfo(sl.source_dsn, dbname="no_such_db"),
    }
    fault_outcome.scenario = f"bad configuration: {name}"
    named = ", ".join(_fill(n, values).replace(str(tmp_path), "…") for n in case.names)
    fault_outcome.expected = f"exit {case.code}, names {named}; nothing created"
    env: dict[str, Any] = {**sl.env, "CDCSYNC_MIGRATION_ID": migration_id}
    env.update({k: _fill(v, values) for k, v in case.env.items()})
    args = list(case.command)
    if case.config is not None:
        config_path.write_text(_fill(case.config, values))
        args += ["--config", str(config_path)]
    done = cdcsync(env, *args, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == case.code, f"{name}: exit {done.returncode}\n{output}"
    assert "Traceback" not in output, output
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors, f"{name}: no 'error:' line\n{output}"
    for needle in case.names:
        assert _fill(needle, values) in done.stderr, f"{name}: {needle!r} not named\n{output}"
    if case.secret is not None:
        assert case.secret not in output, f"{name}: the secret was printed\n{output}"
    assert WRONG_PASSWORD not in output and CONNECT_PASSWORD not in output
    left = _created(sl, env["CDCSYNC_MIGRATION_ID"])
    assert not left, f"{name}: left behind {left}\n{output}"


@pytest.mark.scenario(
    "status with the target unreachable",
    "exit 3 after printing what it could read; the target's failure named in the errors",
)
def test_status_exits_3_when_a_part_cannot_be_read(
    bad_config_slice: Slice, fault_outcome: Outcome
) -> None:
    """``cdcsync status`` run by a script or a probe must not read as healthy."""
    env = {
        **bad_config_slice.env,
        "CDCSYNC_MIGRATION_ID": f"cfg{secrets.token_hex(4)}",
        "CDCSYNC_TARGET_DSN": "host=127.0.0.1 port=1 dbname=app user=postgres connect_timeout=3",
        "CDCSYNC_METRICS_ADDR": "127.0.0.1:1",
    }
    done = cdcsync(env, "status", "--output", "json", timeout=120)
    assert done.returncode == 3, f"exit {done.returncode}\n{done.stdout}{done.stderr}"
    assert "Traceback" not in done.stdout + done.stderr
    doc = json.loads(done.stdout)
    problems = doc["errors"] + [e for d in doc["directions"] for e in d["errors"]]
    assert any("port 1" in p or "127.0.0.1" in p for p in problems), problems
    assert "could not be read" in done.stderr, done.stderr
