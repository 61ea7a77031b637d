"""A pgbouncer process for tests and the demo: applications connect through it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cdcsync.adapters.pgbouncer import Backend, write_databases
from cdcsync.errors import StackError
from cdcsync.stack import procs
from cdcsync.stack.install import find_command, is_root

_RUN_AS = "postgres"  # pgbouncer refuses to run as root


class PgbouncerProcess:
    """pgbouncer on 127.0.0.1 with a ``[databases]`` include file cdcsync rewrites."""

    def __init__(self, root: Path, password_file: Path, port: int | None = None) -> None:
        self.root = root
        self.password_file = password_file
        self.port = port or procs.free_port()
        self.pid: int | None = None

    @property
    def databases_file(self) -> Path:
        return self.root / "databases.ini"

    @property
    def log(self) -> Path:
        return self.root / "pgbouncer.log"

    def admin_dsn(self, passfile: Path) -> str:
        return f"host=127.0.0.1 port={self.port} dbname=pgbouncer user=postgres passfile={passfile}"

    def dsn(self, alias: str, passfile: Path) -> str:
        return f"host=127.0.0.1 port={self.port} dbname={alias} user=postgres passfile={passfile}"

    def start(self, databases: dict[str, Backend], pool_mode: str = "session") -> None:
        binary = find_command("pgbouncer")
        if binary is None:
            raise StackError("pgbouncer not found: install the Debian package pgbouncer")
        self.root.mkdir(parents=True, exist_ok=True)
        password = self.password_file.read_text().strip()
        userlist = self.root / "userlist.txt"
        userlist.write_text(f'"postgres" "{password}"\n')
        os.chmod(userlist, 0o600)
        write_databases(self.databases_file, databases)
        ini = self.root / "pgbouncer.ini"
        ini.write_text(
            f"%include {self.databases_file}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = scram-sha-256\n"
            f"auth_file = {userlist}\n"
            "admin_users = postgres\n"
            f"pool_mode = {pool_mode}\n"
            "max_client_conn = 500\n"
            "default_pool_size = 50\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
        )
        user = _RUN_AS if is_root() else None
        if user:
            shutil.chown(self.root, user)
            for path in (userlist, self.databases_file, ini):
                shutil.chown(path, user)
        self.pid = procs.spawn([binary, str(ini)], self.log, user=user)
        if not procs.wait_until(lambda: procs.port_open(self.port), 15):
            self.stop()
            raise StackError("pgbouncer did not start", procs.log_tail(self.log))

    def stop(self) -> None:
        procs.stop_pid(self.pid)
        self.pid = None
