"""Object-store access: URIs to pyarrow filesystems and deltalake options.

Credentials come from config or the standard AWS environment variables. They are
held as ``SecretStr`` so that reprs, logs and config dumps show ``**********``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field, SecretStr

_REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs")


class StorageOptions(BaseModel):
    """Where and how to reach object storage (S3 or S3-compatible, GCS)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    # Tries per S3 request, for pyarrow (shards, data files) and deltalake (the table, the run
    # records). None keeps their own: 8 for pyarrow, which absorbs throttling (503 SlowDown) and
    # resets but takes ~47 s to give up on an endpoint that refuses connections; 11 for deltalake.
    max_attempts: int | None = Field(None, ge=1, le=50)

    def resolved(self) -> StorageOptions:
        """Fill unset fields from the standard AWS environment variables."""
        env = os.environ

        def secret(value: SecretStr | None, name: str) -> SecretStr | None:
            if value is not None:
                return value
            return SecretStr(env[name]) if env.get(name) else None

        return StorageOptions(
            endpoint_url=self.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            region=self.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            access_key_id=secret(self.access_key_id, "AWS_ACCESS_KEY_ID"),
            secret_access_key=secret(self.secret_access_key, "AWS_SECRET_ACCESS_KEY"),
            session_token=secret(self.session_token, "AWS_SESSION_TOKEN"),
            max_attempts=self.max_attempts,
        )


def is_remote(uri: str) -> bool:
    """True for object-store URIs (s3://, gs://)."""
    return urlparse(uri).scheme in _REMOTE_SCHEMES


def local_path(uri: str) -> str:
    """A plain filesystem path for ``file://`` URIs and plain paths."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return parsed.path
    if parsed.scheme and len(parsed.scheme) > 1:
        raise ValueError(f"not a local path: {uri!r}")
    return os.path.abspath(uri)


def filesystem_for(uri: str, options: StorageOptions) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for ``uri``."""
    parsed = urlparse(uri)
    if parsed.scheme in ("s3", "s3a"):
        opts = options.resolved()
        kwargs: dict[str, object] = {}
        if opts.endpoint_url:
            endpoint = urlparse(opts.endpoint_url)
            kwargs["endpoint_override"] = endpoint.netloc or endpoint.path
            kwargs["scheme"] = endpoint.scheme or "https"
        if opts.region:
            kwargs["region"] = opts.region
        if opts.access_key_id and opts.secret_access_key:
            kwargs["access_key"] = opts.access_key_id.get_secret_value()
            kwargs["secret_key"] = opts.secret_access_key.get_secret_value()
            if opts.session_token:
                kwargs["session_token"] = opts.session_token.get_secret_value()
        # Retries absorb the throttling (503 SlowDown) and resets that S3 gives under load.
        kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=opts.max_attempts or 8)
        return pafs.S3FileSystem(**kwargs), parsed.netloc + parsed.path
    if parsed.scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem(), parsed.netloc + parsed.path
    return pafs.LocalFileSystem(), local_path(uri)


def delta_storage_options(uri: str, options: StorageOptions) -> dict[str, str]:
    """Options for ``deltalake`` to reach ``uri`` safely.

    On S3, commits use conditional puts (``If-None-Match``), so two concurrent
    writers can never both claim the same table version.
    """
    if urlparse(uri).scheme not in ("s3", "s3a"):
        return {}
    opts = options.resolved()
    out = {"conditional_put": "etag"}
    if opts.max_attempts:
        out["max_retries"] = str(opts.max_attempts - 1)  # deltalake counts retries, not attempts
    if opts.endpoint_url:
        out["AWS_ENDPOINT_URL"] = opts.endpoint_url
        if opts.endpoint_url.startswith("http://"):
            out["AWS_ALLOW_HTTP"] = "true"
    if opts.region:
        out["AWS_REGION"] = opts.region
    if opts.access_key_id and opts.secret_access_key:
        out["AWS_ACCESS_KEY_ID"] = opts.access_key_id.get_secret_value()
        out["AWS_SECRET_ACCESS_KEY"] = opts.secret_access_key.get_secret_value()
        if opts.session_token:
            out["AWS_SESSION_TOKEN"] = opts.session_token.get_secret_value()
    return out


@dataclass(frozen=True, eq=False)
class Location:
    """A URI resolved once: its filesystem, the path inside it and deltalake's options.

    A run resolves each of its places (input, output table, run records) once and
    passes this around, instead of re-reading the environment at every use.
    """

    uri: str
    filesystem: pafs.FileSystem
    path: str
    delta_options: dict[str, str]

    @classmethod
    def resolve(cls, uri: str, storage: StorageOptions) -> Location:
        resolved = storage.resolved()
        filesystem, path = filesystem_for(uri, resolved)
        return cls(uri, filesystem, path, delta_storage_options(uri, resolved))

    def child(self, name: str) -> Location:
        """The location ``name`` below this one, on the same filesystem."""
        return Location(
            f"{self.uri.rstrip('/')}/{name}", self.filesystem, f"{self.path.rstrip('/')}/{name}", self.delta_options
        )

    def contains(self, other: Location) -> bool:
        """Whether ``other`` is this location or lies below it."""
        if type(self.filesystem) is not type(other.filesystem):
            return False
        mine, theirs = self.path.rstrip("/") + "/", other.path.rstrip("/") + "/"
        return theirs.startswith(mine)
