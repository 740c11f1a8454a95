"""The endpoint client against a scripted chat server on loopback: retries, final answers, pauses, bounds."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from operators.endpoint.client import Client, EndpointDown
from operators.endpoint.config import EndpointConfig

Script = Callable[[int, dict], tuple]  # (request number from 1, body) -> what to do


def completion(text: str, prompt_tokens: int = 7, completion_tokens: int = 2) -> dict:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    return {"choices": [{"message": {"role": "assistant", "content": text}}], "usage": usage}


class ChatServer:
    """Answers each POST as ``script`` says: ("ok", text), ("status", code, headers, message), ("drop",),
    or ("sleep", seconds, text); counts requests and the most in flight at once."""

    def __init__(self, script: Script):
        self.script, self.requests, self.in_flight, self.most_in_flight = script, [], 0, 0
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    owner.requests.append((time.monotonic(), body, self.headers.get("Authorization")))
                    n = len(owner.requests)
                    owner.in_flight += 1
                    owner.most_in_flight = max(owner.most_in_flight, owner.in_flight)
                try:
                    self.act(owner.script(n, body))
                finally:
                    with owner.lock:
                        owner.in_flight -= 1

            def act(self, action: tuple) -> None:
                if action[0] == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if action[0] == "sleep":
                    time.sleep(action[1])
                    action = ("ok", action[2])
                if action[0] == "ok":
                    return self.send(200, {}, json.dumps(completion(action[1])).encode())
                _, code, headers, message = action
                self.send(code, headers, json.dumps({"error": {"message": message}}).encode())

            def send(self, code: int, headers: dict, data: bytes) -> None:
                self.send_response(code)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:  # the client gave up (a timeout)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(script: Script) -> ChatServer:
        servers.append(ChatServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def client(server: ChatServer, key: str | None = None, **settings) -> Client:
    config = EndpointConfig(base_url=server.base_url, model="m", max_backoff_s=0.2, **settings)
    return Client(config, key, "ask.endpoint")


def body(text: str) -> Callable[[], dict]:
    """A request as the stage hands it to the client: a function that makes its body."""
    return lambda: {"model": "m", "messages": [{"role": "user", "content": text}]}


def test_a_429s_retry_after_is_waited_and_holds_the_other_requests_too(serve):
    server = serve(lambda n, b: ("status", 429, {"Retry-After": "0.5"}, "slow down") if n == 1 else ("ok", "fine"))
    replies = client(server, concurrency=1).send([body("a"), body("b")])
    assert [r.text for r in replies] == ["fine", "fine"] and [r.attempts for r in replies] == [2, 1]
    times = [t for t, _, _ in server.requests]
    assert times[1] - times[0] >= 0.5 and len(times) == 3


def test_a_400_is_final_with_the_servers_message_and_the_other_rows_go_on(serve):
    server = serve(lambda n, b: ("status", 400, {}, "image too large") if "bad" in str(b) else ("ok", "yes"))
    replies = client(server).send([body("good"), body("bad"), body("good too")])
    assert [r.error for r in replies] == [None, "HTTP 400: image too large", None]
    assert [r.attempts for r in replies] == [1, 1, 1] and len(server.requests) == 3


def test_5xx_drops_and_timeouts_are_retried_and_a_row_fails_after_max_retries(serve):
    def script(n: int, b: dict) -> tuple:
        text = b["messages"][0]["content"]
        if text == "always 503":
            return ("status", 503, {}, "overloaded")
        if text == "dropped once" and n <= 3:
            return ("drop",)
        if text == "slow once" and n <= 3:
            return ("sleep", 1.0, "late")
        return ("ok", f"answer to {text}")

    replies = client(server := serve(script), max_retries=2, timeout_s=0.5).send(
        [body("always 503"), body("dropped once"), body("slow once")]
    )
    assert replies[0].error == "HTTP 503: overloaded (after 3 tries)" and replies[0].attempts == 3
    assert [(r.text, r.attempts) for r in replies[1:]] == [("answer to dropped once", 2), ("answer to slow once", 2)]
    assert len(server.requests) == 3 + 2 + 2


def test_requests_in_flight_never_exceed_the_concurrency(serve):
    server = serve(lambda n, b: ("sleep", 0.05, "ok"))
    replies = client(server, concurrency=3).send([body(str(i)) for i in range(15)])
    assert len(replies) == 15 and server.most_in_flight == 3


def test_the_key_goes_as_a_bearer_token_and_never_into_an_error(serve):
    key = "PLANTED-key-8c2f"
    server = serve(lambda n, b: ("status", 401, {}, f"bad key Bearer {key}"))
    reply = client(server, key=key).send([body("a")])[0]
    assert server.requests[0][2] == f"Bearer {key}"
    assert reply.error == "HTTP 401: bad key Bearer ***"


def test_a_request_whose_body_cannot_be_made_fails_alone_without_being_sent(serve):
    def broken() -> dict:
        raise OSError("cannot identify image file")

    server = serve(lambda n, b: ("ok", "fine"))
    replies = client(server).send([broken, body("a")])
    assert replies[0].error == "request: OSError: cannot identify image file" and replies[0].attempts == 0
    assert replies[1].text == "fine" and len(server.requests) == 1


def test_a_server_that_never_answers_is_down_after_unreachable_s():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = EndpointConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", unreachable_s=0.5, max_backoff_s=0.1)
    started = time.monotonic()
    with pytest.raises(EndpointDown, match=r"ask.endpoint: http://127.0.0.1:\d+/v1 answered nothing for 0.5 s \("):
        Client(config, None, "ask.endpoint").send([body("a"), body("b")])
    assert time.monotonic() - started < 5
