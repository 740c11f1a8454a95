import socket
import time

import pytest

from operators.storage import StorageOptions, filesystem_for


def _refused_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_max_attempts_survives_credentials_taken_from_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "example-secret")
    resolved = StorageOptions(max_attempts=2).resolved()
    assert resolved.max_attempts == 2 and resolved.access_key_id.get_secret_value() == "AKIAEXAMPLE"


def test_one_attempt_fails_a_refused_endpoint_at_once_instead_of_after_the_backoff():
    # With the default 8 attempts pyarrow backs off for ~47 s before it gives up.
    options = StorageOptions(
        endpoint_url=_refused_endpoint(), region="us-east-1", access_key_id="a", secret_access_key="b", max_attempts=1
    )
    filesystem, path = filesystem_for("s3://bucket/shards/", options)
    start = time.monotonic()
    with pytest.raises(OSError):
        filesystem.get_file_info(path)
    assert time.monotonic() - start < 10


def test_max_attempts_below_one_is_refused():
    with pytest.raises(ValueError, match="max_attempts"):
        StorageOptions(max_attempts=0)
