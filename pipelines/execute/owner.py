"""Whether the run that left progress is still running: a resume takes over only a stopped run's.

A run records who it is (host, pid, the process's start time) in its ``run.json`` and, while it
runs, rewrites a small ``alive`` file every ``HEARTBEAT_S`` seconds. A run that stops on its own
(an error, SIGTERM, Ctrl-C) marks itself stopped. One killed (SIGKILL, a lost node) cannot: on
the same host its process is gone, and elsewhere its heartbeat stops.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass

from operators.storage import Location

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
ALIVE = "alive"


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    started: int | None  # the process's start time in clock ticks since boot (/proc), where there is one

    @classmethod
    def this_process(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid(), process_started(os.getpid()))

    def to_dict(self) -> dict:
        return asdict(self)


def process_started(pid: int) -> int | None:
    """The start time of process ``pid`` (None where it does not exist, or without /proc): tells a
    live process from another that got its pid later."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def still_running(header: dict, staging: Location) -> bool:
    """Whether the run that wrote ``header`` (its ``run.json``) is running now."""
    if header.get("state") != "running":
        return False
    owner = header.get("owner") or {}
    if owner.get("host") == socket.gethostname() and owner.get("started") is not None:
        return process_started(int(owner["pid"])) == owner["started"]
    return _beating(staging)


def _beating(staging: Location) -> bool:
    """Whether the ``alive`` file changes within a few heartbeats (another host's run: no clock is compared)."""
    first = _read_alive(staging)
    deadline = time.monotonic() + 2.5 * HEARTBEAT_S
    while time.monotonic() < deadline:
        time.sleep(HEARTBEAT_S / 2)
        if _read_alive(staging) != first:
            return True
    return False


def _read_alive(staging: Location) -> bytes | None:
    try:
        with staging.filesystem.open_input_stream(f"{staging.path}/{ALIVE}") as source:
            return source.read()
    except OSError:
        return None


class Heartbeat:
    """Rewrites ``<staging>/alive`` every ``HEARTBEAT_S`` seconds, from a thread, until ``stop``."""

    def __init__(self, staging: Location):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(staging,), name="vlpipe-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self, staging: Location) -> None:
        beats = 0
        while not self._stop.is_set():
            beats += 1
            try:
                with staging.filesystem.open_output_stream(f"{staging.path}/{ALIVE}") as out:
                    out.write(str(beats).encode())
            except OSError as err:  # a missed beat only makes the run look stopped to another host
                log.debug("heartbeat to %s failed: %s", staging.uri, err)
            self._stop.wait(HEARTBEAT_S)

    def stop(self) -> None:
        """Stop beating, and wait out a beat being written (a staging area removed next stays removed)."""
        self._stop.set()
        self._thread.join(timeout=2 * HEARTBEAT_S)
