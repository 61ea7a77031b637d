"""The local stack as a whole: ``up`` (idempotent), ``down``, ``status`` and ``env``.

Everything lives under one directory: each service's data, configuration and log, the
secrets (a password file, a libpq passfile, a properties file for Kafka Connect's file
config provider) and ``stack.json`` with the ports and PIDs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shlex
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cdcsync.errors import StackError
from cdcsync.stack import install, procs
from cdcsync.stack.services import (
    ConnectService,
    KafkaService,
    PostgresService,
    RegistryService,
    Service,
    ServiceState,
    java_major,
)

SERVICES = ("source", "target", "kafka", "connect")
#: Started only when named: ``up()`` without arguments leaves them out.
OPTIONAL_SERVICES = ("registry",)
KNOWN_SERVICES = (*SERVICES, *OPTIONAL_SERVICES)
DEPENDS: dict[str, tuple[str, ...]] = {
    "source": (),
    "target": (),
    "kafka": (),
    "connect": ("kafka",),
    "registry": (),
}


def default_dir() -> Path:
    return Path(os.environ.get("CDCSYNC_STACK_DIR", ".stack")).resolve()


class LocalStack:
    """A stack rooted at ``root``; methods are safe to call from several processes."""

    def __init__(self, root: Path, ports: dict[str, int] | None = None) -> None:
        self.root = root.resolve()
        self.requested_ports = ports or {}
        self.state_file = self.root / "stack.json"
        self.secrets_dir = self.root / "secrets"
        self.timings: dict[str, float] = {}

    # ----------------------------------------------------------------- state
    def _load(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {"services": {}}
        except ValueError as exc:
            raise StackError(f"stack state {self.state_file} is corrupt: {exc}") from exc
        return data

    def _save(self, data: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        tmp.replace(self.state_file)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Hold the stack's file lock and yield its state, saved on exit."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # noqa: S103 - PostgreSQL's OS user must traverse it
        with (self.root / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._load()
            try:
                yield data
            finally:
                self._save(data)

    def _state(self, data: dict[str, Any], name: str) -> ServiceState:
        raw = data["services"].get(name)
        if raw is None:
            port = self.requested_ports.get(name) or procs.free_port()
            extra: dict[str, Any] = {}
            if name == "kafka":
                extra["controller_port"] = (
                    self.requested_ports.get("kafka_controller") or procs.free_port()
                )
            state = ServiceState(name, port, None, str(self.root / "logs" / f"{name}.log"), extra)
            data["services"][name] = asdict(state)
            return state
        return ServiceState(**raw)

    def _service(self, data: dict[str, Any], name: str) -> Service:
        state = self._state(data, name)
        if name in ("source", "target"):
            svc = PostgresService(self.root, state, self.secrets_dir)
            svc.name = name
            return svc
        if name == "registry":
            runner = data.get("registry_runner")
            return RegistryService(self.root, state, Path(runner) if runner else None)
        jars = Path(data.get("jars") or install.jar_cache_dir())
        if name == "kafka":
            return KafkaService(self.root, state, jars)
        kafka = self._state(data, "kafka")
        return ConnectService(self.root, state, jars, kafka.port, self.connect_secrets)

    # --------------------------------------------------------------- secrets
    @property
    def password_file(self) -> Path:
        return self.secrets_dir / "pg-password"

    @property
    def passfile(self) -> Path:
        return self.secrets_dir / "pgpass"

    @property
    def connect_secrets(self) -> Path:
        return self.secrets_dir / "connect-secrets.properties"

    def _ensure_secrets(self) -> None:
        self.secrets_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.secrets_dir, 0o700)
        if self.password_file.exists():
            return
        password = secrets.token_urlsafe(18)
        for path, text in (
            (self.password_file, password + "\n"),
            (self.passfile, f"127.0.0.1:*:*:postgres:{password}\n"),
            (self.connect_secrets, f"source.password={password}\ntarget.password={password}\n"),
        ):
            path.touch(mode=0o600)
            os.chmod(path, 0o600)
            path.write_text(text)

    # ------------------------------------------------------------------ verbs
    def up(self, services: tuple[str, ...] = SERVICES, *, install_missing: bool = True) -> None:
        """Start what is not running; a running, ready service is left alone."""
        wanted = self._closure(services)
        needs_jvm = any(s in ("kafka", "connect") for s in wanted)
        needs_registry = "registry" in wanted
        needs_pg = any(s in ("source", "target") for s in wanted)
        commands: tuple[str, ...] = ()
        if needs_pg:
            commands += ("postgres", "pg_dump")
        if needs_jvm or needs_registry:
            commands += ("java", "mvn")
        t0 = time.monotonic()
        install.ensure_commands(commands, install=install_missing)
        self.timings["install"] = time.monotonic() - t0
        with self._locked() as data:
            if needs_jvm:
                java = install.find_command("java")
                assert java is not None
                if java_major(java) < 17:
                    raise StackError(
                        f"{java} is older than Java 17: install openjdk-17-jre-headless"
                    )
                # The POMs pick the jars: a changed POM means new jars for new services.
                t0 = time.monotonic()
                jars, _ = install.resolve_jars()
                data["jars"] = str(jars)
                self.timings["jars"] = time.monotonic() - t0
            if needs_registry:
                t0 = time.monotonic()
                runner, _ = install.build_registry()
                data["registry_runner"] = str(runner)
                self.timings["registry_build"] = time.monotonic() - t0
            self._ensure_secrets()
            for name in KNOWN_SERVICES:
                if name not in wanted:
                    continue
                svc = self._service(data, name)
                try:
                    if svc.running() and svc.ready():
                        continue
                    if svc.running():
                        # Alive but not answering: wait for it as if just started.
                        svc.wait_ready()
                        continue
                    t0 = time.monotonic()
                    if isinstance(svc, PostgresService) and not svc.initialised():
                        svc.init(self.password_file)
                    try:
                        svc.start()
                    except StackError:
                        # Leave nothing half-started behind a failure.
                        with contextlib.suppress(StackError):
                            svc.stop()
                        raise
                    self.timings[name] = time.monotonic() - t0
                finally:
                    data["services"][name] = asdict(svc.state)

    def down(self) -> None:
        """Stop every service by PID, newest first; verify no PID and no port is left."""
        with self._locked() as data:
            for name in reversed(KNOWN_SERVICES):
                if name not in data["services"]:
                    continue
                svc = self._service(data, name)
                svc.stop()
                data["services"][name] = asdict(svc.state)
            leftovers = self._leftovers(data)
        if leftovers:
            raise StackError("after down, still alive or bound: " + "; ".join(leftovers))

    def _leftovers(self, data: dict[str, Any]) -> list[str]:
        found = []
        for name, raw in data["services"].items():
            state = ServiceState(**raw)
            if procs.pid_alive(state.pid):
                found.append(f"{name} pid {state.pid}")
            ports = [state.port, *([state.extra["controller_port"]] if name == "kafka" else [])]
            found.extend(f"{name} port {p}" for p in ports if procs.port_in_use(p))
        return found

    def status(self) -> dict[str, Any]:
        """Each service's state, PID, port and log file."""
        data = self._load()
        out: dict[str, Any] = {"dir": str(self.root), "services": {}}
        for name in KNOWN_SERVICES:
            if name not in data["services"]:
                if name in SERVICES:
                    out["services"][name] = {"state": "absent"}
                continue
            svc = self._service(data, name)
            running = svc.running()
            ready = False
            if running:
                with contextlib.suppress(StackError):
                    ready = svc.ready()
            entry: dict[str, Any] = {
                "state": "ready" if ready else ("starting" if running else "stopped"),
                "pid": svc.current_pid() if running else None,
                "port": svc.state.port,
                "log": svc.state.log,
            }
            if name == "kafka":
                entry["controller_port"] = svc.state.extra.get("controller_port")
            out["services"][name] = entry
        return out

    # -------------------------------------------------------------- contract
    def dsn(self, side: str, dbname: str = "postgres") -> str:
        data = self._load()
        port = data["services"][side]["port"]
        return f"host=127.0.0.1 port={port} user=postgres dbname={dbname} passfile={self.passfile}"

    def kafka_bootstrap(self) -> str:
        return f"127.0.0.1:{self._load()['services']['kafka']['port']}"

    def connect_url(self) -> str:
        return f"http://127.0.0.1:{self._load()['services']['connect']['port']}"

    def registry_url(self) -> str:
        return f"http://127.0.0.1:{self._load()['services']['registry']['port']}"

    def env(self) -> dict[str, str]:
        """The variables every cdcsync command reads; no secret is in them."""
        data = self._load()
        env: dict[str, str] = {}
        if "source" in data["services"]:
            env["CDCSYNC_SOURCE_DSN"] = self.dsn("source")
        if "target" in data["services"]:
            env["CDCSYNC_TARGET_DSN"] = self.dsn("target")
        if "kafka" in data["services"]:
            env["CDCSYNC_KAFKA_BOOTSTRAP"] = self.kafka_bootstrap()
        if "connect" in data["services"]:
            env["CDCSYNC_CONNECT_URL"] = self.connect_url()
            env["CDCSYNC_CONNECT_SECRETS_FILE"] = str(self.connect_secrets)
        if "registry" in data["services"]:
            env["CDCSYNC_KAFKA__SCHEMA_REGISTRY_URL"] = self.registry_url()
        return env

    def env_lines(self) -> str:
        return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.env().items())

    @staticmethod
    def _closure(services: tuple[str, ...]) -> set[str]:
        unknown = [s for s in services if s not in KNOWN_SERVICES]
        if unknown:
            raise StackError(f"unknown service(s) {', '.join(unknown)}; known: {KNOWN_SERVICES}")
        wanted = set(services)
        for s in services:
            wanted.update(DEPENDS[s])
        return wanted
