"""A real HTTP server on loopback, in a thread, serving fixed routes (images, 404s, slow and flaky answers)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ImageServer:
    """``routes`` maps a path to bytes; ``/slow/...`` answers after ``slow_s``, ``/flaky/...`` fails once with 503."""

    def __init__(self, routes: dict[str, bytes], slow_s: float = 3.0):
        self.routes, self.slow_s, self.hits = routes, slow_s, Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits[self.path] += 1
                if self.path.startswith("/slow/"):
                    time.sleep(server.slow_s)
                if self.path.startswith("/flaky/") and server.hits[self.path] == 1:
                    return self._answer(503, b"try again")
                body = server.routes.get(self.path.replace("/slow/", "/").replace("/flaky/", "/"))
                return self._answer(404, b"not found") if body is None else self._answer(200, body)

            def _answer(self, code: int, body: bytes):
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    pass

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> ImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
