"""Liveness and readiness of the daemon, served with /metrics from a daemon thread.

The daemon's loop owns every transition and reports them to one small thread-safe
:class:`HealthState`; the HTTP server only reads it. ``/livez`` answers "is the loop
still turning" (its :meth:`HealthState.heartbeat` is fresh), so a wedged process gets
restarted; ``/readyz`` answers "is the migration keeping up" (not halted, not paused,
connector RUNNING, time lag within the SLO), so load balancers and cutover preflight
can rely on it. Both list their individual checks with ``?verbose``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from cdcsync import metrics
from cdcsync.config import Settings
from cdcsync.errors import ConfigError, PreconditionError

log = logging.getLogger("cdcsync.health")


@dataclass(frozen=True)
class Check:
    """One named check; ``detail`` says why it failed (or what it saw)."""

    name: str
    ok: bool
    detail: str = ""


class HealthState:
    """What the engine reports; every method is cheap and safe from any thread."""

    def __init__(
        self,
        *,
        liveness_timeout: float = 30.0,
        lag_slo: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        lag: Callable[[str], float | None] = metrics.time_lag_seconds,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._lag = lag
        self.liveness_timeout = liveness_timeout
        self.lag_slo = lag_slo
        self._beat = clock()
        self._halted: dict[str, str] = {}
        self._paused: str | None = None
        self._connector: dict[str, str] = {}

    def configure(
        self, *, liveness_timeout: float | None = None, lag_slo: float | None = None
    ) -> None:
        with self._lock:
            if liveness_timeout is not None:
                self.liveness_timeout = liveness_timeout
            if lag_slo is not None:
                self.lag_slo = lag_slo
            slo = self.lag_slo
        metrics.set_lag_slo(slo)

    # ------------------------------------------------------------ engine calls
    def heartbeat(self) -> None:
        """The loop is alive; call once per iteration (also while paused or idle)."""
        now = self._clock()
        with self._lock:
            self._beat = now

    def set_halted(self, direction: str, reason: str, partitions: int = 1) -> None:
        """The applier of a direction stopped at an event it cannot apply."""
        d = metrics.direction_label(direction)
        with self._lock:
            self._halted[d] = reason
        metrics.set_halted_partitions(d, partitions)

    def clear_halted(self, direction: str) -> None:
        """The operator resolved the halt and the applier moves again."""
        d = metrics.direction_label(direction)
        with self._lock:
            self._halted.pop(d, None)
        metrics.set_halted_partitions(d, 0)

    def set_paused(self, reason: str | None) -> None:
        """Paused by an operator with ``reason`` (None: resumed)."""
        with self._lock:
            self._paused = reason
        metrics.set_paused(reason is not None)

    def set_connector_state(self, direction: str, state: str) -> None:
        """Connector state from Kafka Connect; a direction with one is checked for readiness."""
        d = metrics.direction_label(direction)
        with self._lock:
            self._connector[d] = state
        metrics.set_connector_state(d, state)

    def forget_direction(self, direction: str) -> None:
        """Stop checking a direction (its connector was removed on purpose)."""
        with self._lock:
            self._connector.pop(direction, None)
            self._halted.pop(direction, None)

    # ------------------------------------------------------------ checks
    def liveness(self) -> list[Check]:
        with self._lock:
            age = self._clock() - self._beat
            timeout = self.liveness_timeout
        ok = age <= timeout
        detail = f"last loop iteration {age:.1f}s ago" + ("" if ok else f" (limit {timeout:g}s)")
        return [Check("loop", ok, detail)]

    def readiness(self) -> list[Check]:
        checks = self.liveness()
        with self._lock:
            halted = dict(self._halted)
            paused = self._paused
            connectors = dict(self._connector)
            slo = self.lag_slo
        checks.append(
            Check(
                "halted",
                not halted,
                "; ".join(f"{d}: {r}" for d, r in sorted(halted.items())) or "not halted",
            )
        )
        checks.append(
            Check("paused", paused is None, "running" if paused is None else f"paused: {paused}")
        )
        if not connectors:
            checks.append(Check("streaming", False, "no direction is streaming yet"))
        for d, state in sorted(connectors.items()):
            checks.append(Check(f"connector:{d}", state == "RUNNING", f"state {state}"))
            lag = self._lag(d)
            if lag is None:
                checks.append(Check(f"lag:{d}", False, "no applied position known yet"))
            else:
                checks.append(
                    Check(f"lag:{d}", lag <= slo, f"time lag {lag:.1f}s (objective {slo:g}s)")
                )
        return checks

    def describe(self) -> dict[str, Any]:
        """Both verdicts with their checks, for ``cdcsync status`` and logs."""
        live, ready = self.liveness(), self.readiness()
        return {
            "live": all(c.ok for c in live),
            "ready": all(c.ok for c in ready),
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in ready],
        }


#: The daemon's one health state; the engine imports and updates it.
state = HealthState()


def render(name: str, checks: list[Check], verbose: bool) -> tuple[int, str]:
    """HTTP status and body in the Kubernetes style (``[+]name ok`` / ``[-]name failed``)."""
    ok = all(c.ok for c in checks)
    lines = []
    for c in checks:
        if verbose or not c.ok:
            mark = "[+]" if c.ok else "[-]"
            lines.append(f"{mark}{c.name} {'ok' if c.ok else 'failed'}: {c.detail}")
    if not verbose and ok:
        return 200, "ok\n"
    lines.append(f"{name} check {'passed' if ok else 'failed'}")
    return (200 if ok else 503), "\n".join(lines) + "\n"


def parse_addr(addr: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (every interface)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"metrics address {addr!r} (CDCSYNC_METRICS_ADDR) must be host:port, "
            "e.g. 127.0.0.1:9187"
        )
    return host.strip("[]"), int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class HealthServer:
    """Serves /metrics, /livez and /readyz from a daemon thread."""

    def __init__(
        self,
        addr: str,
        health: HealthState | None = None,
        registry: CollectorRegistry = metrics.REGISTRY,
    ) -> None:
        host, port = parse_addr(addr)
        self.health = health or state
        self.registry = registry
        handler = _handler(self.health, registry)
        server_cls = _Server6 if ":" in host else _Server
        try:
            self._server = server_cls((host, port), handler)
        except OSError as exc:
            raise PreconditionError(
                f"cannot serve metrics on {addr} (CDCSYNC_METRICS_ADDR): {exc.strerror}"
            ) from None
        self.host = host or "0.0.0.0"  # noqa: S104 - an empty host means every interface
        self.port = int(self._server.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> HealthServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},  # how soon close() returns
            name="cdcsync-health",
            daemon=True,
        )
        self._thread.start()
        log.info("metrics and health on %s (/metrics, /livez, /readyz)", self.url)
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> HealthServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start(settings: Settings, health: HealthState | None = None) -> HealthServer:
    """Configure the state from the settings and serve on ``settings.metrics_addr``."""
    h = health or state
    h.configure(
        liveness_timeout=settings.health.liveness_timeout_seconds,
        lag_slo=settings.health.lag_slo_seconds,
    )
    return HealthServer(settings.metrics_addr, h).start()


def _handler(health: HealthState, registry: CollectorRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "cdcsync"

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            verbose = "verbose" in parse_qs(url.query, keep_blank_values=True)
            try:
                if url.path == "/metrics":
                    encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                    self._send(200, encoder(registry), content_type)
                elif url.path == "/livez":
                    code, body = render("livez", health.liveness(), verbose)
                    self._send(code, body.encode(), "text/plain; charset=utf-8")
                elif url.path == "/readyz":
                    code, body = render("readyz", health.readiness(), verbose)
                    self._send(code, body.encode(), "text/plain; charset=utf-8")
                else:
                    self._send(404, b"not found: try /metrics, /livez or /readyz\n", "text/plain")
            except Exception:  # a broken check must not kill the server thread
                log.exception("health endpoint %s failed", url.path)
                with contextlib.suppress(OSError):
                    self._send(500, b"internal error\n", "text/plain")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), format % args)

    return Handler
