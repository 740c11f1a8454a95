"""Fetch images that the input only references (``input.columns.image_uri``, Hugging Face ``path``s).

Runs inside the decode tasks, before decoding: each batch's references are fetched
by a small thread pool (the waits overlap; the decoding that follows needs the CPU).
A reference that cannot be fetched is a ``fetch_error`` row with the reason; the
batch and the run go on.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field

from operators import schema as col
from operators.stage import Stage
from operators.storage import StorageOptions, filesystem_for

_HTTP = ("http", "https")
_STORAGE = ("s3", "s3a", "gs", "gcs", "file")
# Answers that another try cannot change; everything else (5xx, 429, resets, timeouts) is retried.
_FINAL_HTTP_CODES = (400, 401, 403, 404, 405, 410, 414, 451)
_CHUNK = 1 << 16


class FetchConfig(BaseModel):
    """How referenced images are fetched."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str | None = None  # relative references resolve against this URI or directory
    concurrency: int = Field(16, ge=1, le=256)  # fetches in flight per decode task
    retries: int = Field(2, ge=0, le=10)
    timeout_s: float = Field(10.0, gt=0, le=600)  # per attempt, the whole body included
    max_bytes: int = Field(64 << 20, ge=1)


class FetchFailure(Exception):
    """A reference that cannot be fetched; ``final`` when another try would not help."""

    def __init__(self, message: str, final: bool):
        super().__init__(message)
        self.final = final


def fetch_stage(config: FetchConfig, storage: StorageOptions, source: str) -> Stage:
    """The fetch stage's contract: fused into the decode tasks, before decode."""
    return Stage(
        name="fetch",
        kind="fused",
        config_key="input.fetch",
        build=partial(FetchImages, config, storage),
        reads=(col.IMAGE, col.IMAGE_URI, col.INPUT_STATUS, col.INPUT_ERROR),
        adds=(col.IMAGE, col.INPUT_STATUS, col.INPUT_ERROR),
        details=(
            f"images from {source}" + (f" (relative to {config.base})" if config.base else ""),
            f"{config.concurrency} in flight per task, {config.retries} retries, {config.timeout_s:g} s timeout",
        ),
    )


def resolve_reference(reference: str, base: str | None) -> str:
    """An absolute URI or path for ``reference``; relative ones need ``base``."""
    scheme = urlparse(reference).scheme
    if (scheme and len(scheme) > 1) or reference.startswith("/"):
        return reference
    if base is None:
        raise FetchFailure(f"relative image reference {reference!r} needs input.fetch.base", final=True)
    return base.rstrip("/") + "/" + reference.removeprefix("./")


class FetchImages:
    """Replace null image bytes by the referenced image's bytes, or mark the row ``fetch_error``."""

    def __init__(self, config: FetchConfig, storage: StorageOptions):
        self.config = config
        self.storage = storage
        self._filesystems: dict[tuple[str, str], tuple[pafs.FileSystem, str]] = {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        # Found with Arrow, so a batch whose images are all inline (Hugging Face structs that
        # also carry a path) passes through without its bytes being copied into Python.
        image = batch.column(col.IMAGE)
        empty = pc.or_kleene(pc.is_null(image), pc.equal(pc.binary_length(image), 0))
        wanted = pc.and_kleene(
            pc.and_kleene(empty, pc.is_valid(batch.column(col.IMAGE_URI))), pc.is_null(batch.column(col.INPUT_STATUS))
        )
        todo = np.flatnonzero(pc.fill_null(wanted, False).to_numpy(zero_copy_only=False))
        if not len(todo):
            return batch
        images, uris = image.to_pylist(), batch.column(col.IMAGE_URI).to_pylist()
        statuses = batch.column(col.INPUT_STATUS).to_pylist()
        errors = batch.column(col.INPUT_ERROR).to_pylist()
        with ThreadPoolExecutor(min(self.config.concurrency, len(todo))) as pool:
            for i, (data, error) in zip(todo, pool.map(self.fetch, [uris[i] for i in todo])):
                images[i] = data
                if error is not None:
                    statuses[i], errors[i] = col.FETCH_ERROR, error
        return (
            batch.set_column(batch.schema.get_field_index(col.IMAGE), col.IMAGE, pa.array(images, pa.binary()))
            .set_column(
                batch.schema.get_field_index(col.INPUT_STATUS), col.INPUT_STATUS, pa.array(statuses, pa.string())
            )
            .set_column(batch.schema.get_field_index(col.INPUT_ERROR), col.INPUT_ERROR, pa.array(errors, pa.string()))
        )

    def fetch(self, reference: str) -> tuple[bytes | None, str | None]:
        """(bytes, None) or (None, why), after the configured retries."""
        try:
            uri = resolve_reference(reference, self.config.base)
        except FetchFailure as failure:
            return None, str(failure)
        for attempt in range(self.config.retries + 1):
            try:
                return self._fetch_once(uri), None
            except FetchFailure as failure:
                if failure.final or attempt == self.config.retries:
                    tries = f" (after {attempt + 1} tries)" if attempt else ""
                    return None, f"{reference}: {failure}{tries}"
            time.sleep(min(0.2 * 2**attempt, 2.0))
        raise AssertionError("unreachable")

    def _fetch_once(self, uri: str) -> bytes:
        if urlparse(uri).scheme in _HTTP:
            return self._fetch_http(uri)
        return self._fetch_storage(uri)

    def _fetch_http(self, uri: str) -> bytes:
        deadline = time.monotonic() + self.config.timeout_s
        request = urllib.request.Request(uri, headers={"User-Agent": "vlpipe"})
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                return self._read_within(response.read, deadline)
        except urllib.error.HTTPError as err:
            raise FetchFailure(f"HTTP {err.code} {err.reason}", final=err.code in _FINAL_HTTP_CODES) from None
        except TimeoutError:
            raise FetchFailure(f"timed out after {self.config.timeout_s:g} s", final=False) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, TimeoutError):
                raise FetchFailure(f"timed out after {self.config.timeout_s:g} s", final=False) from None
            raise FetchFailure(f"{type(reason).__name__}: {reason}", final=False) from None

    def _fetch_storage(self, uri: str) -> bytes:
        filesystem, path = self._filesystem(uri)
        deadline = time.monotonic() + self.config.timeout_s
        try:
            with filesystem.open_input_stream(path) as stream:
                return self._read_within(stream.read, deadline)
        except FileNotFoundError:
            raise FetchFailure("not found", final=True) from None
        except PermissionError as err:
            raise FetchFailure(f"access denied: {err}", final=True) from None
        except OSError as err:
            message = " ".join(str(err).split())
            final = any(word in message for word in ("does not exist", "NoSuchKey", "ACCESS_DENIED", "AccessDenied"))
            raise FetchFailure(message, final=final) from None

    def _filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        parsed = urlparse(uri)
        scheme = parsed.scheme if parsed.scheme in _STORAGE else "file"
        cache_key = (scheme, parsed.netloc)
        if cache_key not in self._filesystems:
            self._filesystems[cache_key] = filesystem_for(uri, self.storage)
        filesystem, _ = self._filesystems[cache_key]
        return filesystem, filesystem_for_path(uri)

    def _read_within(self, read, deadline: float) -> bytes:
        """The whole body, refusing one over ``max_bytes`` or one still arriving at the deadline."""
        chunks, size = [], 0
        while chunk := read(_CHUNK):
            size += len(chunk)
            if size > self.config.max_bytes:
                raise FetchFailure(f"larger than input.fetch.max_bytes ({self.config.max_bytes} bytes)", final=True)
            if time.monotonic() > deadline:
                raise FetchFailure(f"timed out after {self.config.timeout_s:g} s", final=False)
            chunks.append(chunk)
        return b"".join(chunks)


def filesystem_for_path(uri: str) -> str:
    """The path inside its filesystem of a storage URI or a plain path (no credentials needed)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("s3", "s3a", "gs", "gcs"):
        return parsed.netloc + parsed.path
    return parsed.path if parsed.scheme == "file" else uri
