"""The requests of one worker: async, bounded in flight, rate limited, retried, each ending as one ``Reply``.

One event loop runs in a thread of its own for the worker's lifetime, so its connections, rate limits
and the server's pauses carry over from batch to batch; ``send`` hands it a batch's requests and waits.

- 429, 408, 409, 425 and 5xx answers, timeouts and dropped connections are tried again, after the
  server's ``Retry-After`` where it gives one (a 429's pauses every request), else after an exponential
  backoff with jitter. Any other 4xx is final: another try cannot change it.
- A request that fails for good is a ``Reply`` with the error (the row's ``endpoint_error``); the
  batch goes on.
- A server that answers nothing for ``unreachable_s`` while a request waits is down:
  ``EndpointDown`` fails the stage. Until then a request that cannot connect keeps trying even past
  ``max_retries``, so a server that restarts costs time, not rows.
- A request that got its answer is never sent again.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import aiohttp

from operators.endpoint.config import EndpointConfig
from operators.endpoint.limits import RateLimits
from operators.stage import StageFailed

RETRIED_STATUSES = (408, 409, 425, 429)  # and every 5xx
ENCODERS = 4  # threads encoding request bodies per worker
_MESSAGE_CHARS = 300


class EndpointDown(StageFailed):
    """The server answered nothing for ``unreachable_s``: the stage, not a row, has failed."""


@dataclass(frozen=True)
class Reply:
    """How one request ended: the answer and its ``usage``, or the error that ended it."""

    text: str | None = None
    # The first answer token's top log-probabilities (token, logprob), where the server returned them.
    top_logprobs: tuple[tuple[str, float], ...] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    attempts: int = 1
    error: str | None = None


@dataclass(frozen=True)
class _Retry:
    """A try that another may fix, and how long the server asked to wait (None: back off)."""

    error: str
    retry_after: float | None = None
    connected: bool = True  # False: no answer at all (refused, dropped, timed out)


class _Loop:
    """The worker's event loop, in a thread of its own, and the HTTP session that lives on it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.session: aiohttp.ClientSession | None = None
        # Images are encoded here, beside the requests in flight (PIL releases the GIL while it works).
        self.encoders = ThreadPoolExecutor(ENCODERS, thread_name_prefix="vlpipe-endpoint-encode")
        self.thread = threading.Thread(target=self.loop.run_forever, name="vlpipe-endpoint", daemon=True)
        self.thread.start()

    def close(self) -> None:
        try:
            if self.session is not None:
                asyncio.run_coroutine_threadsafe(self.session.close(), self.loop).result(timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.encoders.shutdown(wait=False, cancel_futures=True)


class Client:
    """Sends chat-completion bodies to ``config.chat_url``; ``where`` (``caption.endpoint``) names it in errors."""

    def __init__(self, config: EndpointConfig, api_key: str | None, where: str):
        self.config, self.where = config, where
        self._secret = api_key
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._last_answer = 0.0
        self._loop = _Loop()
        # Closed with the worker's operator, or at exit: no unclosed session or connections left behind.
        self._finalizer = weakref.finalize(self, self._loop.close)
        self._limits: RateLimits | None = None
        self._slots: asyncio.Semaphore | None = None

    def send(self, requests: list[Callable[[], dict]]) -> list[Reply]:
        """Each request's ``Reply``, in order; ``EndpointDown`` when the server is down.

        A request is a function that makes its body (encoding its image): they run on a thread pool
        while earlier requests are in flight. One that raises ``OSError`` or ``ValueError`` (an image
        PIL cannot encode) is a ``Reply`` with that error and no attempt.
        """
        future = asyncio.run_coroutine_threadsafe(self._send_all(requests), self._loop.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # a stopped run (SIGTERM) or a down server: nothing more is sent
            raise

    def close(self) -> None:
        self._finalizer()

    async def _send_all(self, requests: list[Callable[[], dict]]) -> list[Reply]:
        if self._loop.session is None:
            c = self.config
            connector = aiohttp.TCPConnector(limit=c.concurrency, limit_per_host=c.concurrency)
            timeout = aiohttp.ClientTimeout(total=c.timeout_s)
            self._loop.session = aiohttp.ClientSession(connector=connector, timeout=timeout)
            self._limits = RateLimits(c.requests_per_second, c.tokens_per_minute, first_estimate=1024)
            self._slots = asyncio.Semaphore(c.concurrency)
        tasks = [asyncio.ensure_future(self._one(request)) for request in requests]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    async def _one(self, request: Callable[[], dict]) -> Reply:
        try:
            data = await self._loop.loop.run_in_executor(self._loop.encoders, _encoded, request)
        except (OSError, ValueError) as err:
            return Reply(attempts=0, error=self._scrub(f"request: {type(err).__name__}: {err}"))
        async with self._slots:
            started, attempts = time.monotonic(), 0
            while True:
                attempts += 1
                spend = await self._limits.acquire()
                outcome = await self._try(data)
                if isinstance(outcome, Reply):
                    tokens = (outcome.prompt_tokens or 0) + (outcome.completion_tokens or 0)
                    self._limits.settle(spend, tokens if outcome.prompt_tokens is not None else None)
                    return _with_attempts(outcome, attempts)
                if not outcome.connected:
                    self._check_alive(started, outcome.error)
                if attempts > self.config.max_retries and (outcome.connected or self._answered_since(started)):
                    return Reply(attempts=attempts, error=f"{outcome.error} (after {attempts} tries)")
                await asyncio.sleep(self._wait(outcome, attempts))

    async def _try(self, data: bytes) -> Reply | _Retry:
        try:
            async with self._loop.session.post(self.config.chat_url, data=data, headers=self._headers) as response:
                payload = await response.read()
                status, retry_after = response.status, _retry_after(response.headers.get("Retry-After"))
        except asyncio.TimeoutError:
            return _Retry(f"timed out after {self.config.timeout_s:g} s", connected=False)
        except aiohttp.ClientError as err:
            return _Retry(self._scrub(f"{type(err).__name__}: {err}"), connected=False)
        self._last_answer = time.monotonic()
        if status == 200:
            return self._reply(payload)
        error = self._scrub(f"HTTP {status}: {_error_message(payload)}")
        if status in RETRIED_STATUSES or status >= 500:
            if status == 429 and retry_after is not None:
                self._limits.pause(min(retry_after, self.config.unreachable_s))
            return _Retry(error, retry_after)
        return Reply(error=error)

    def _reply(self, payload: bytes) -> Reply:
        try:
            return parse_answer(json.loads(payload))
        except (ValueError, KeyError, IndexError, TypeError) as err:
            # Not tried again: the server did answer, and answering again may cost again.
            return Reply(error=self._scrub(f"unreadable answer ({type(err).__name__}: {err}): {payload[:200]!r}"))

    def _wait(self, outcome: _Retry, attempts: int) -> float:
        if outcome.retry_after is not None:
            return min(outcome.retry_after, self.config.unreachable_s)
        return min(self.config.max_backoff_s, 0.5 * 2 ** (attempts - 1)) * random.uniform(0.5, 1.0)

    def _answered_since(self, started: float) -> bool:
        return self._last_answer >= started

    def _check_alive(self, started: float, error: str) -> None:
        silent = time.monotonic() - max(self._last_answer, started)
        if silent >= self.config.unreachable_s:
            raise EndpointDown(
                f"{self.where}: {self.config.base_url} answered nothing for {self.config.unreachable_s:g} s "
                f"({error}); is the server up? (the bound is {self.where}.unreachable_s)"
            )

    def _scrub(self, text: str) -> str:
        """``text`` without the API key, should a server or an exception ever echo it."""
        return text.replace(self._secret, "***") if self._secret else text


def _encoded(request: Callable[[], dict]) -> bytes:
    return json.dumps(request()).encode()


def parse_answer(answer: dict) -> Reply:
    """A chat completion's text, its first token's top log-probabilities and its ``usage``."""
    choice = answer["choices"][0]
    text = choice["message"].get("content")
    usage = answer.get("usage") or {}
    return Reply(
        text=text if isinstance(text, str) else None,
        top_logprobs=_first_top_logprobs(choice.get("logprobs")),
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
    )


def _first_top_logprobs(logprobs: dict | None) -> tuple[tuple[str, float], ...] | None:
    content = (logprobs or {}).get("content") or []
    if not content:
        return None
    first = content[0]
    pairs = first.get("top_logprobs") or [first]
    return tuple((p["token"], float(p["logprob"])) for p in pairs)


def _with_attempts(reply: Reply, attempts: int) -> Reply:
    return Reply(reply.text, reply.top_logprobs, reply.prompt_tokens, reply.completion_tokens, attempts, reply.error)


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _error_message(payload: bytes) -> str:
    """The server's own words: OpenAI-style ``{"error": {"message": ...}}``, FastAPI's ``detail``, or the text."""
    try:
        data = json.loads(payload)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error", data.get("detail", data.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if error is not None:
            payload = error if isinstance(error, str) else json.dumps(error)
    text = payload.decode(errors="replace") if isinstance(payload, bytes) else str(payload)
    return " ".join(text.split())[:_MESSAGE_CHARS] or "(no message)"
