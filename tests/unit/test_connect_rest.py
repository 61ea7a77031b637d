"""Which answers of a Connect worker are worth asking again, and which are final."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from cdcsync.adapters.connect_rest import ConnectBusy, ConnectClient
from cdcsync.errors import PreconditionError


class _Worker(BaseHTTPRequestHandler):
    """Answers ``GET /connectors/<status>/offsets`` with that HTTP status."""

    def do_GET(self) -> None:
        code = int(self.path.split("/")[2])
        body = b'{"message": "worker said ' + str(code).encode() + b'"}'
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def worker() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Worker)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("code", [409, 500, 503, 504])
def test_rebalancing_or_overloaded_worker_is_busy(worker: str, code: int) -> None:
    with pytest.raises(ConnectBusy, match=f"failed \\({code}\\): worker said {code}"):
        ConnectClient(worker).offsets(str(code))


@pytest.mark.parametrize("code", [400, 401, 403, 422])
def test_refused_request_is_final(worker: str, code: int) -> None:
    with pytest.raises(PreconditionError) as info:
        ConnectClient(worker).offsets(str(code))
    assert not isinstance(info.value, ConnectBusy)


def test_unreachable_worker_is_busy() -> None:
    with pytest.raises(ConnectBusy, match="unreachable"):
        ConnectClient("http://127.0.0.1:1", timeout=2).offsets("x")
