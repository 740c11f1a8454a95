"""A real OpenAI-compatible VLM server on loopback: `transformers serve` on the CPU, for the tests and the bench.

It serves one model directory (the suite's tiny LLaVA), preloaded, under the directory's path as its
model name. ``HF_HUB_CACHE`` points at an empty folder of its own: the server scans the hub cache for
``GET /v1/models`` and answers 500 where none exists (and must never read ~/.cache).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VlmServer:
    """``transformers serve <model_dir>`` in a child process; ``base_url`` is its ``.../v1``."""

    def __init__(self, model_dir: Path, workdir: Path, *, start_timeout_s: float = 120.0):
        self.model_dir, self.workdir, self.start_timeout_s = Path(model_dir), Path(workdir), start_timeout_s
        self.port = free_port()
        self._process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def model(self) -> str:
        return str(self.model_dir)

    def __enter__(self) -> VlmServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "hub").mkdir(exist_ok=True)
        env = {**os.environ, "HF_HUB_CACHE": str(self.workdir / "hub"), "HF_HUB_OFFLINE": "1"}
        env.setdefault("OMP_NUM_THREADS", "1")  # a server thread per core would fight the suite for two cores
        command = shutil.which("transformers", path=str(Path(sys.executable).parent)) or "transformers"
        args = [command, "serve", str(self.model_dir), "--device", "cpu", "--host", "127.0.0.1"]
        log = open(self.workdir / "serve.log", "wb")  # open for the server's lifetime
        self._process = subprocess.Popen([*args, "--port", str(self.port)], env=env, stdout=log, stderr=log)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"transformers serve exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"transformers serve did not start in {self.start_timeout_s:g} s: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return (self.workdir / "serve.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def __exit__(self, *exc) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
