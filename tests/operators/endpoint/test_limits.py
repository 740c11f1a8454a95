"""Rate limits on one event loop, without a server: when each request may start."""

from __future__ import annotations

import asyncio
import time

import pytest

from operators.endpoint.limits import RateLimits


def start_times(limits: RateLimits, n: int, tokens: int | None = None) -> list[float]:
    """When each of ``n`` requests was let through, each settled at once with ``tokens``."""

    async def run() -> list[float]:
        started, times = time.monotonic(), []
        for _ in range(n):
            spend = await limits.acquire()
            times.append(time.monotonic() - started)
            limits.settle(spend, tokens)
        return times

    return asyncio.run(run())


def test_requests_per_second_spaces_the_requests_out():
    times = start_times(RateLimits(requests_per_second=20, tokens_per_minute=None, first_estimate=1), 6)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= 0.05 - 0.005 and times[-1] < 2.0


def test_tokens_per_window_hold_a_request_until_the_oldest_spend_leaves_the_window():
    # 100 tokens a request, 250 a window: two go at once, the third waits for the window to move.
    limits = RateLimits(None, tokens_per_minute=250, first_estimate=100, window_s=0.5)
    times = start_times(limits, 4, tokens=100)
    assert times[1] < 0.4 and times[2] >= 0.5 and times[3] - times[2] < 0.4


def test_a_request_is_charged_what_the_answers_so_far_cost_on_average():
    limits = RateLimits(None, tokens_per_minute=1000, first_estimate=10_000, window_s=0.5)
    # The first estimate exceeds the limit; an empty window lets one request through anyway.
    assert start_times(limits, 1, tokens=50) == [pytest.approx(0, abs=0.05)]
    assert limits._estimate() == 50


def test_a_pause_the_server_asked_for_holds_every_request():
    limits = RateLimits(None, None, first_estimate=1)
    limits.pause(0.3)
    assert start_times(limits, 2)[0] >= 0.29
