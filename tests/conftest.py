"""Session fixtures: tiny models, one local Ray cluster, one real S3 server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobs.demo_assets import build_tiny_clip
from tests.s3_server import S3Server, seaweedfs

# Model caches of the tests stay inside the test session, never in ~/.cache.
os.environ.setdefault("VLPIPE_CACHE", "/tmp/vlpipe-test-cache")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny CLIP (random weights) saved as an ordinary Hugging Face directory."""
    return build_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session, with token authentication as Ray 2.60 defaults to."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> S3Server:
    """A real S3 server (SeaweedFS) on loopback, with signed requests."""
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server
