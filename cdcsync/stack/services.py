"""The services of the local stack: how each is configured, started, checked and stopped."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pwd
import re
import secrets
import shutil
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdcsync.errors import StackError
from cdcsync.stack import procs
from cdcsync.stack.install import PG_BIN, find_command, is_root

PG_USER = "postgres"  # the database superuser, and the OS user when running as root
DEBEZIUM_PG_CLASS = "io.debezium.connector.postgresql.PostgresConnector"
DEBEZIUM_JDBC_CLASS = "io.debezium.connector.jdbc.JdbcSinkConnector"


@dataclass
class ServiceState:
    """What the stack remembers about one service between commands."""

    name: str
    port: int
    pid: int | None = None
    log: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Service:
    """One process of the stack. Subclasses know how to configure and check it."""

    name = "service"
    start_timeout = 60.0

    def __init__(self, root: Path, state: ServiceState) -> None:
        self.root = root
        self.state = state

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def log_path(self) -> Path:
        return Path(self.state.log)

    def running(self) -> bool:
        return procs.pid_alive(self.current_pid())

    def current_pid(self) -> int | None:
        return self.state.pid

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        procs.stop_pid(self.current_pid())
        self.state.pid = None

    def fail(self, message: str) -> StackError:
        return StackError(f"{self.name}: {message}", procs.log_tail(self.log_path))

    def check_port_free(self, port: int, what: str = "port") -> None:
        if procs.port_in_use(port):
            raise StackError(
                f"{self.name}: {what} 127.0.0.1:{port} is already in use by another "
                "process; choose another port or stop that process"
            )

    def wait_ready(self) -> None:
        def ok() -> bool:
            if not self.running():
                raise self.fail("exited during start-up")
            return self.ready()

        if not procs.wait_until(ok, self.start_timeout, interval=0.5):
            raise self.fail(f"not ready after {self.start_timeout:.0f}s")


def _postgres_os_user() -> str | None:
    """PostgreSQL refuses to run as root: run it as ``postgres`` then."""
    if not is_root():
        return None
    try:
        pwd.getpwnam(PG_USER)
    except KeyError as exc:
        raise StackError(
            "running as root needs the 'postgres' OS user (created by the Debian package "
            "postgresql-15)"
        ) from exc
    return PG_USER


def _check_reachable(directory: Path, user: str) -> None:
    """Every parent must be searchable by the OS user PostgreSQL runs as."""
    for parent in directory.resolve().parents:
        if not os.stat(parent).st_mode & 0o001:
            raise StackError(
                f"{directory} is not reachable by the OS user {user!r}: {parent} is not "
                "searchable by others (chmod o+x it, or choose another --dir)"
            )


class PostgresService(Service):
    """A PostgreSQL 15 cluster with ``wal_level=logical``, TCP on 127.0.0.1 only."""

    start_timeout = 60.0

    def __init__(self, root: Path, state: ServiceState, secrets_dir: Path) -> None:
        super().__init__(root, state)
        self.secrets_dir = secrets_dir

    @property
    def data(self) -> Path:
        return self.dir / "data"

    def current_pid(self) -> int | None:
        # The postmaster writes its PID file; trust it over what we recorded.
        pidfile = self.data / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(pidfile.read_text().splitlines()[0])
        return None

    def initialised(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def init(self, password_file: Path) -> None:
        user = _postgres_os_user()
        self.dir.mkdir(parents=True, exist_ok=True)
        if user:
            _check_reachable(self.dir, user)
            # The cluster owner needs the directory and the password file.
            shutil.chown(self.dir, user)
            os.chmod(self.dir, 0o700)
            pw_copy = self.dir / ".pwfile"
            shutil.copyfile(password_file, pw_copy)
            shutil.chown(pw_copy, user)
            os.chmod(pw_copy, 0o600)
        else:
            pw_copy = password_file
        initdb = find_command("initdb") or str(PG_BIN / "initdb")
        try:
            procs.run(
                [
                    initdb,
                    "-D",
                    str(self.data),
                    "-U",
                    PG_USER,
                    "--pwfile",
                    str(pw_copy),
                    "--auth-local=scram-sha-256",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                ],
                what=f"{self.name}: initdb",
                user=user,
            )
        finally:
            if user:
                pw_copy.unlink(missing_ok=True)
        conf = self.data / "postgresql.conf"
        with conf.open("a", encoding="utf-8") as fh:
            fh.write(
                "\n# cdcsync local stack\n"
                "listen_addresses = '127.0.0.1'\n"
                "unix_socket_directories = ''\n"
                "wal_level = logical\n"
                "max_replication_slots = 20\n"
                "max_wal_senders = 20\n"
                "max_connections = 200\n"
                "shared_buffers = 256MB\n"
                "max_wal_size = 4GB\n"
                "max_slot_wal_keep_size = 8GB\n"
                "logging_collector = off\n"
                "log_min_messages = warning\n"
                "include_if_exists = 'cdcsync.conf'\n"
            )
        hba = self.data / "pg_hba.conf"
        hba.write_text(
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host replication all 127.0.0.1/32 scram-sha-256\n"
        )

    def start(self) -> None:
        if not self.initialised():
            raise StackError(f"{self.name}: no cluster in {self.data}")
        self.check_port_free(self.state.port)
        pidfile = self.data / "postmaster.pid"
        if pidfile.exists() and not procs.pid_alive(self.current_pid()):
            # A killed postmaster can linger as an unreaped zombie, which PostgreSQL's
            # own check takes for a live server; it is dead, so its lock file is stale.
            pidfile.unlink()
        user = _postgres_os_user()
        log = self.log_path
        log.parent.mkdir(parents=True, exist_ok=True)
        log.touch()
        if user:
            shutil.chown(log, user)
        pg_ctl = find_command("pg_ctl") or str(PG_BIN / "pg_ctl")
        try:
            procs.run(
                [
                    pg_ctl,
                    "start",
                    "-w",
                    "-t",
                    str(int(self.start_timeout)),
                    "-D",
                    str(self.data),
                    "-l",
                    str(log),
                    "-o",
                    f"-p {self.state.port}",
                ],
                what=f"{self.name}: pg_ctl start",
                user=user,
                timeout=self.start_timeout + 10,
            )
        except StackError as exc:
            raise self.fail(f"PostgreSQL failed to start ({exc})") from None
        self.state.pid = self.current_pid()
        self.wait_ready()

    def ready(self) -> bool:
        return procs.port_open(self.state.port)

    def stop(self) -> None:
        pid = self.current_pid()
        if not procs.pid_alive(pid):
            self.state.pid = None
            return
        pg_ctl = find_command("pg_ctl") or str(PG_BIN / "pg_ctl")
        with contextlib.suppress(StackError):
            procs.run(
                [pg_ctl, "stop", "-w", "-m", "fast", "-D", str(self.data)],
                what=f"{self.name}: pg_ctl stop",
                user=_postgres_os_user(),
                timeout=60,
            )
        procs.stop_pid(pid)
        self.state.pid = None


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


_LOG4J = """\
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.stdout.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = {level}
logger.apache.name = org.apache.kafka
logger.apache.level = {level}
logger.reflections.name = org.reflections
logger.reflections.level = error
"""


class JavaService(Service):
    """A JVM process started from the resolved jars."""

    heap = "1g"
    main_class = ""

    def __init__(self, root: Path, state: ServiceState, jars: Path) -> None:
        super().__init__(root, state)
        self.jars = jars

    def java(self) -> str:
        java = find_command("java")
        if java is None:
            raise StackError("java not found: install the Debian package openjdk-17-jre-headless")
        return java

    def java_argv(self, *args: str) -> list[str]:
        return [
            self.java(),
            f"-Xmx{self.heap}",
            f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.dir / 'logs'}",
            "-cp",
            str(self.jars / "libs" / "*"),
            self.main_class,
            *args,
        ]

    def write_log4j(self, level: str = "INFO") -> None:
        _write(self.dir / "log4j2.properties", _LOG4J.format(level=level))


def _kafka_cluster_id() -> str:
    """A random cluster id in Kafka's form; like Kafka, never one starting with '-'."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


class KafkaService(JavaService):
    """A single-node Kafka broker in KRaft mode (combined broker and controller)."""

    name = "kafka"
    main_class = "kafka.Kafka"
    start_timeout = 90.0

    @property
    def controller_port(self) -> int:
        return int(self.state.extra["controller_port"])

    @property
    def properties(self) -> Path:
        return self.dir / "server.properties"

    def configure(self) -> None:
        port, ctl = self.state.port, self.controller_port
        _write(
            self.properties,
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.bootstrap.servers=127.0.0.1:{ctl}",
                    f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{ctl}",
                    f"advertised.listeners=PLAINTEXT://127.0.0.1:{port},"
                    f"CONTROLLER://127.0.0.1:{ctl}",
                    "controller.listener.names=CONTROLLER",
                    "inter.broker.listener.name=PLAINTEXT",
                    "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                    f"log.dirs={self.dir / 'data'}",
                    "num.partitions=1",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=4",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    "default.replication.factor=1",
                    "min.insync.replicas=1",
                    "group.initial.rebalance.delay.ms=0",
                    "auto.create.topics.enable=true",
                    "delete.topic.enable=true",
                    "log.retention.hours=168",
                    "",
                ]
            ),
        )
        self.write_log4j()

    def format_storage(self) -> None:
        if (self.dir / "data" / "meta.properties").exists():
            return
        cluster_id = self.state.extra.setdefault("cluster_id", _kafka_cluster_id())
        argv = self.java_argv()
        argv[argv.index(self.main_class)] = "kafka.tools.StorageTool"
        procs.run(
            [
                *argv,
                "format",
                "--standalone",
                f"--cluster-id={cluster_id}",
                f"--config={self.properties}",
            ],
            what="kafka: formatting storage",
            timeout=120,
        )

    def start(self) -> None:
        self.check_port_free(self.state.port)
        self.check_port_free(self.controller_port, "controller port")
        self.configure()
        self.format_storage()
        self.state.pid = procs.spawn(self.java_argv(str(self.properties)), self.log_path)
        self.wait_ready()

    def ready(self) -> bool:
        if not procs.port_open(self.state.port):
            return False
        # The port opens before the broker can serve metadata: ask it for real.
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{self.state.port}", "log_level": 0})
        try:
            metadata = admin.list_topics(timeout=3)
        except Exception:  # any client error means "not yet"
            return False
        return bool(metadata.brokers)


class ConnectService(JavaService):
    """A distributed-mode Kafka Connect worker with the Debezium plugins."""

    name = "connect"
    main_class = "org.apache.kafka.connect.cli.ConnectDistributed"
    start_timeout = 150.0

    def __init__(
        self, root: Path, state: ServiceState, jars: Path, kafka_port: int, secrets_file: Path
    ) -> None:
        super().__init__(root, state, jars)
        self.kafka_port = kafka_port
        self.secrets_file = secrets_file

    @property
    def plugin_path(self) -> Path:
        override = os.environ.get("CDCSYNC_STACK_PLUGIN_PATH")
        return Path(override) if override else self.jars / "plugins"

    @property
    def properties(self) -> Path:
        return self.dir / "connect.properties"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.state.port}"

    def configure(self) -> None:
        group = self.state.extra.setdefault("group_id", f"cdcsync-connect-{secrets.token_hex(4)}")
        _write(
            self.properties,
            "\n".join(
                [
                    f"bootstrap.servers=127.0.0.1:{self.kafka_port}",
                    f"group.id={group}",
                    f"config.storage.topic={group}-configs",
                    f"offset.storage.topic={group}-offsets",
                    f"status.storage.topic={group}-status",
                    "config.storage.replication.factor=1",
                    "offset.storage.replication.factor=1",
                    "status.storage.replication.factor=1",
                    "offset.storage.partitions=1",
                    "status.storage.partitions=1",
                    "key.converter=org.apache.kafka.connect.json.JsonConverter",
                    "value.converter=org.apache.kafka.connect.json.JsonConverter",
                    "key.converter.schemas.enable=true",
                    "value.converter.schemas.enable=true",
                    "offset.flush.interval.ms=50",
                    # A worker that lost its broker rejoins under a new member id; its
                    # old tasks count as lost and, by default, wait 5 minutes for the
                    # old member to come back before being assigned again. One worker:
                    # nobody else will come back, so reassign them almost at once.
                    "scheduled.rebalance.max.delay.ms=5000",
                    f"listeners=http://127.0.0.1:{self.state.port}",
                    "rest.advertised.host.name=127.0.0.1",
                    f"rest.advertised.port={self.state.port}",
                    f"plugin.path={self.plugin_path}",
                    # Secrets are referenced as ${file:<path>:<key>}, never sent over REST.
                    "config.providers=file",
                    "config.providers.file.class="
                    "org.apache.kafka.common.config.provider.FileConfigProvider",
                    "",
                ]
            ),
        )
        self.write_log4j()

    def start(self) -> None:
        self.check_port_free(self.state.port)
        self.configure()
        self.state.pid = procs.spawn(self.java_argv(str(self.properties)), self.log_path)
        self.wait_ready()

    def plugins(self) -> list[str] | None:
        """Listed connector classes; ``None`` while the REST API does not answer yet."""
        try:
            with urllib.request.urlopen(f"{self.url}/connector-plugins", timeout=3) as resp:  # noqa: S310
                body = json.loads(resp.read())
        except (OSError, urllib.error.URLError, ValueError):
            return None
        return [str(p.get("class")) for p in body if isinstance(p, dict)]

    def ready(self) -> bool:
        if not procs.port_open(self.state.port):
            return False
        plugins = self.plugins()
        if plugins is None:
            return False
        # The REST API answers only after plugin discovery: the list is final.
        if DEBEZIUM_PG_CLASS not in plugins:
            raise self.fail(
                f"Kafka Connect is up but does not list {DEBEZIUM_PG_CLASS} "
                f"(plugin.path={self.plugin_path}; listed: {', '.join(plugins) or 'nothing'})"
            )
        return True


class RegistryService(Service):
    """Apicurio Registry with in-memory storage, for connectors that publish Avro.

    Optional: started only when asked for, since only Avro-mode migrations need it. Its
    schemas live in the process, so a restart forgets them while Kafka keeps the messages
    that refer to them: it is a test and demo service, not a production registry.
    """

    name = "registry"
    start_timeout = 120.0
    heap = "256m"

    def __init__(self, root: Path, state: ServiceState, runner: Path | None) -> None:
        super().__init__(root, state)
        self.runner = runner

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.state.port}"

    def start(self) -> None:
        if self.runner is None or not self.runner.exists():
            raise StackError(f"{self.name}: the registry application is not built")
        self.check_port_free(self.state.port)
        java = find_command("java")
        if java is None:
            raise StackError("java not found: install the Debian package openjdk-17-jre-headless")
        self.dir.mkdir(parents=True, exist_ok=True)
        argv = [
            java,
            f"-Xmx{self.heap}",
            f"-Dquarkus.http.port={self.state.port}",
            "-Dquarkus.http.host=127.0.0.1",
            "-jar",
            str(self.runner),
        ]
        self.state.pid = procs.spawn(argv, self.log_path, cwd=self.dir)
        self.wait_ready()

    def ready(self) -> bool:
        if not procs.port_open(self.state.port):
            return False
        try:
            with urllib.request.urlopen(  # noqa: S310 - loopback URL built here
                f"{self.url}/apis/registry/v2/system/info", timeout=3
            ) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError, ValueError):
            return False


def java_major(java: str) -> int:
    """The JVM's major version (the properties dump goes to stderr)."""
    import subprocess

    done = subprocess.run(
        [java, "-XshowSettings:properties", "-version"],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"java\.specification\.version = (\d+)", done.stderr)
    return int(match.group(1)) if match else 0
