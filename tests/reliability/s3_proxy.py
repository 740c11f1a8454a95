"""A fault-injecting HTTP proxy to put in front of the test S3 server (SeaweedFS) or a served VLM.

Clients use the proxy's address as their S3 endpoint (or the VLM's ``base_url``). Requests are forwarded
unchanged (the Host header too, so SigV4 signatures still verify), except the
ones a ``Fault`` rule claims. A rule fires on matching requests number
``start``, ``start + every``, ... until it has fired ``count`` times (spacing
faults out keeps one request from collecting them all and backing off for
long), so a test's outcome does not depend on timing or luck:

- ``reset``: the connection is reset before the request reaches S3;
- ``reset_after``: the request reaches S3, then the connection is reset, so the
  client never learns that its write landed (the nastiest case for commits);
- ``slowdown``: S3's ``503 SlowDown`` throttling answer;
- ``slow``: the answer comes ``delay`` seconds late;
- ``forbidden``: ``403 AccessDenied``, as for an object the credentials may not read;
- ``too_many``: ``429`` with ``Retry-After: delay`` (a rate-limited API);
- ``unavailable``: ``503`` with an OpenAI-style JSON error (an overloaded server);
- ``bad_request``: ``400`` with an OpenAI-style JSON error (a request the server refuses).

``body_contains`` picks requests by their body (one row's chat request). The proxy also counts
``resent``: requests whose body it had already answered with a 2xx (a client that sent a request again
after it succeeded), and ``auth``: each request's ``Authorization`` header by its SHA-256.

The proxy runs in its own process: deltalake's Rust calls hold the GIL while they
wait on the network, so a proxy thread in the test's process could not answer them.

Usage::

    with FaultProxy(s3.endpoint_url, [Fault("GET", "reset", count=2)]) as proxy:
        ... use proxy.endpoint_url ...
    proxy.fired  # {"GET reset": 2, ...}
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal

_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>'
)
_WRITES = ("PUT", "POST", "DELETE")


def _json_error(message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind}}).encode()


# The faults answered by the proxy itself: (status, content type, body).
_ANSWERS = {
    "slowdown": (503, "application/xml", _SLOWDOWN),
    "forbidden": (403, "application/xml", _DENIED),
    "too_many": (429, "application/json", _json_error("Rate limit reached, retry after a while", "rate_limit")),
    "unavailable": (503, "application/json", _json_error("The server is overloaded", "server_error")),
    "bad_request": (400, "application/json", _json_error("This request's image is too large", "invalid_request")),
}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Fault:
    """Inject ``kind`` into ``count`` requests with this method (``WRITE``: PUT/POST/DELETE) and path part."""

    method: str
    kind: Literal["reset", "reset_after", "slowdown", "slow", "forbidden", "too_many", "unavailable", "bad_request"]
    count: int = 1
    path_contains: str = ""
    delay: float = 1.0
    start: int = 1
    every: int = 1
    body_contains: str = ""

    def matches(self, method: str, path: str, body: bytes = b"") -> bool:
        wanted = _WRITES if self.method == "WRITE" else (self.method,)
        return method in wanted and self.path_contains in path and self.body_contains.encode() in body

    @property
    def name(self) -> str:
        parts = (self.method, self.kind, self.path_contains, self.body_contains)
        return " ".join(part for part in parts if part)


_STATS_PATH = "/__faults__"  # not a valid bucket name, so never an S3 request


class FaultProxy:
    """Runs ``ProxyServer`` in a child process; ``fired`` and ``requests`` are read from it."""

    def __init__(self, upstream_url: str, faults: list[Fault]):
        self.upstream_url = upstream_url
        self.faults = faults
        self.fired: Counter = Counter()
        self.requests: Counter = Counter()
        self.resent = 0
        self.auth: Counter = Counter()
        self._process: subprocess.Popen | None = None
        self.endpoint_url = ""

    def __enter__(self) -> FaultProxy:
        spec = json.dumps({"upstream": self.upstream_url, "faults": [asdict(f) for f in self.faults]})
        self._process = subprocess.Popen(
            [sys.executable, __file__, spec], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent
        )
        self.endpoint_url = self._process.stdout.readline().strip()
        if not self.endpoint_url:
            raise RuntimeError("the fault proxy did not start")
        return self

    def stats(self) -> None:
        """Refresh ``fired`` and ``requests`` from the proxy process."""
        conn = http.client.HTTPConnection(self.endpoint_url.removeprefix("http://"), timeout=10)
        try:
            conn.request("GET", _STATS_PATH)
            data = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        self.fired, self.requests = Counter(data["fired"]), Counter(data["requests"])
        self.resent, self.auth = data["resent"], Counter(data["auth"])

    def __exit__(self, *exc) -> None:
        try:
            self.stats()
        finally:
            self._process.terminate()
            self._process.wait(timeout=10)


class ProxyServer:
    """A threaded HTTP/1.1 proxy to ``upstream_url`` that applies ``faults``."""

    def __init__(self, upstream_url: str, faults: list[Fault]):
        self.upstream = urllib.parse.urlsplit(upstream_url).netloc
        self.faults = faults
        self.fired: Counter = Counter()
        self.requests: Counter = Counter()
        self.resent = 0
        self.auth: Counter = Counter()
        self._answered: set[str] = set()  # bodies (SHA-256) already answered with a 2xx
        self._matched: Counter = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def claim(self, method: str, path: str, body: bytes, authorization: str) -> Fault | None:
        """The fault this request gets, if any."""
        with self._lock:
            self.requests[method] += 1
            self.resent += _digest(body) in self._answered
            self.auth[_digest(authorization.encode())] += 1
            claimed = None
            for fault in self.faults:
                if not fault.matches(method, path, body):
                    continue
                self._matched[fault.name] += 1
                n = self._matched[fault.name] - fault.start
                if claimed is None and n >= 0 and n % fault.every == 0 and self.fired[fault.name] < fault.count:
                    self.fired[fault.name] += 1
                    claimed = fault
        return claimed

    def answered(self, body: bytes) -> None:
        with self._lock:
            self._answered.add(_digest(body))

    def serve_forever(self) -> None:
        self._server.serve_forever()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and Expect: 100-continue answered by the base class
    owner: ProxyServer

    def log_message(self, *args) -> None:
        pass

    def _handle(self) -> None:
        body = self._read_body()
        if self.path == _STATS_PATH:
            owner = self.owner
            stats = {"fired": owner.fired, "requests": owner.requests, "resent": owner.resent, "auth": owner.auth}
            return self._reply(200, [("Content-Type", "application/json")], json.dumps(stats).encode())
        fault = self.owner.claim(self.command, self.path, body, self.headers.get("Authorization", ""))
        kind = fault.kind if fault else None
        if kind == "reset":
            return self._reset()
        if kind in _ANSWERS:
            status, content_type, data = _ANSWERS[kind]
            retry_after = {"slowdown": [("Retry-After", "0")], "too_many": [("Retry-After", f"{fault.delay:g}")]}
            return self._reply(status, [("Content-Type", content_type), *retry_after.get(kind, [])], data)
        if kind == "slow":
            time.sleep(fault.delay)
        status, headers, data = self._forward(body)
        if kind == "reset_after":
            return self._reset()
        self._reply(status, headers, data)
        if 200 <= status < 300:
            self.owner.answered(body)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
                if size == 0:
                    return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.owner.upstream, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in ("transfer-encoding", "content-length", "connection", "expect"):
                    conn.putheader(name, value)
            if body or self.command in _WRITES:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            data = response.read()
            headers = [
                (k, v)
                for k, v in response.getheaders()
                if k.lower() not in ("transfer-encoding", "connection", "content-length")
            ]
            if self.command == "HEAD":
                headers.append(("Content-Length", response.getheader("Content-Length", "0")))
            return response.status, headers, data
        finally:
            conn.close()

    def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        self.send_response_only(status)
        for name, value in headers:
            self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    def _reset(self) -> None:
        # SO_LINGER 0 turns close() into a TCP RST: the client sees "connection reset by peer".
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True


if __name__ == "__main__":
    config = json.loads(sys.argv[1])
    server = ProxyServer(config["upstream"], [Fault(**f) for f in config["faults"]])
    print(server.endpoint_url, flush=True)
    server.serve_forever()
