"""Kafka Connect REST API: register, inspect and remove connectors."""

from __future__ import annotations

import time
from typing import Any, cast

import requests

from cdcsync.errors import PreconditionError

#: Statuses a worker answers while rebalancing, restarting or overloaded: worth asking again.
BUSY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class ConnectBusy(PreconditionError):
    """Connect did not answer now (unreachable, rebalancing, timed out); it may later."""


class ConnectClient:
    """A thin client; every failure names the connector and the worker URL."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self.session.request(method, f"{self.url}{path}", timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise ConnectBusy(f"Kafka Connect at {self.url} unreachable: {exc}") from exc
        if resp.status_code == 404:
            return None
        if resp.status_code >= 400:
            try:
                message = resp.json().get("message", resp.text)
            except ValueError:
                message = resp.text
            error = ConnectBusy if resp.status_code in BUSY_STATUSES else PreconditionError
            raise error(f"Kafka Connect {method} {path} failed ({resp.status_code}): {message}")
        return resp.json() if resp.content else None

    def plugins(self) -> list[str]:
        body = self._call("GET", "/connector-plugins") or []
        return [str(p["class"]) for p in body]

    def put_config(self, name: str, config: dict[str, str]) -> dict[str, Any]:
        """Create or update a connector (idempotent)."""
        return cast(dict[str, Any], self._call("PUT", f"/connectors/{name}/config", json=config))

    def status(self, name: str) -> dict[str, Any] | None:
        return cast(dict[str, Any] | None, self._call("GET", f"/connectors/{name}/status"))

    def offsets(self, name: str) -> dict[str, Any] | None:
        """The connector's committed source offsets (Connect 3.5+)."""
        return cast(dict[str, Any] | None, self._call("GET", f"/connectors/{name}/offsets"))

    def delete(self, name: str) -> None:
        self._call("DELETE", f"/connectors/{name}")

    def connectors(self) -> list[str]:
        return cast(list[str], self._call("GET", "/connectors") or [])

    def state(self, name: str) -> str:
        """Worst of the connector's and its tasks' states, or ``ABSENT``."""
        status = self.status(name)
        if status is None:
            return "ABSENT"
        states = [status["connector"]["state"]] + [t["state"] for t in status.get("tasks", [])]
        if not status.get("tasks"):
            states.append("UNASSIGNED")
        for bad in ("FAILED", "UNASSIGNED", "PAUSED", "RESTARTING"):
            if bad in states:
                return bad
        return "RUNNING"

    def wait_running(self, name: str, timeout: float = 60.0) -> None:
        """Wait until connector and tasks run; a FAILED task raises with its trace."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(name)
            if status is not None:
                for task in status.get("tasks", []):
                    if task["state"] == "FAILED":
                        trace = str(task.get("trace", ""))[:2000]
                        raise PreconditionError(f"connector {name} task failed: {trace}")
                if self.state(name) == "RUNNING":
                    return
            if time.monotonic() > deadline:
                raise PreconditionError(
                    f"connector {name} not RUNNING after {timeout:.0f}s: {status}"
                )
            time.sleep(0.5)

    def reset_offsets(self, name: str, timeout: float = 60.0) -> None:
        """Forget a connector's committed source offsets (it must start from a new slot)."""
        if self.status(name) is None:
            return
        self._call("PUT", f"/connectors/{name}/stop")
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(name)
            if status is not None and status["connector"]["state"] == "STOPPED":
                break
            if time.monotonic() > deadline:
                raise PreconditionError(f"connector {name} did not stop within {timeout:.0f}s")
            time.sleep(0.3)
        self._call("DELETE", f"/connectors/{name}/offsets")
