"""Request and token rate limits for one worker's requests, and the server's own pause (429 Retry-After).

Everything runs on the worker's one event loop, so no locks beyond the asyncio one that keeps
requests in the order they asked.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

WINDOW_S = 60.0  # tokens_per_minute is counted over the last minute


@dataclass
class Spend:
    """The tokens one request is charged: an estimate when it is sent, what ``usage`` says once answered."""

    at: float
    tokens: int


class RateLimits:
    """Waits so that requests keep under ``requests_per_second`` and ``tokens_per_minute``.

    A request's tokens are unknown until its answer: it is charged the average of the answers so far
    (``first_estimate`` before any), then what it really used. A pause the server asks for (429 with
    ``Retry-After``) holds every request, not just the one that got it.
    """

    def __init__(
        self,
        requests_per_second: float | None,
        tokens_per_minute: int | None,
        first_estimate: int,
        window_s: float = WINDOW_S,
    ):
        self.window_s = window_s
        self.interval = 1.0 / requests_per_second if requests_per_second else 0.0
        self.tokens_per_minute = tokens_per_minute
        self.next_start = 0.0
        self.paused_until = 0.0
        self.spent: deque[Spend] = deque()
        self.answered_tokens, self.answered = 0, 0
        self.first_estimate = first_estimate
        self._order = asyncio.Lock()

    async def acquire(self) -> Spend:
        """Wait for this request's turn; the returned charge is settled with ``settle``."""
        async with self._order:
            while True:
                now = time.monotonic()
                wait = max(self.paused_until, self.next_start) - now
                wait = max(wait, self._token_wait(now))
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            self.next_start = now + self.interval
            spend = Spend(now, self._estimate())
            if self.tokens_per_minute:
                self.spent.append(spend)
            return spend

    def settle(self, spend: Spend, tokens: int | None) -> None:
        """The request's real tokens (from ``usage``); its estimate stays where the answer had none."""
        if tokens is None:
            return
        spend.tokens = tokens
        self.answered_tokens += tokens
        self.answered += 1

    def pause(self, seconds: float) -> None:
        """Hold every request for ``seconds`` (the server said so)."""
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)

    def _estimate(self) -> int:
        return round(self.answered_tokens / self.answered) if self.answered else self.first_estimate

    def _token_wait(self, now: float) -> float:
        if not self.tokens_per_minute:
            return 0.0
        while self.spent and self.spent[0].at <= now - self.window_s:
            self.spent.popleft()
        used = sum(s.tokens for s in self.spent)
        # An empty window always lets one request through, however large its estimate.
        if not self.spent or used + self._estimate() <= self.tokens_per_minute:
            return 0.0
        return self.spent[0].at + self.window_s - now + 0.001
