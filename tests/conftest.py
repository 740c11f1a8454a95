"""Session fixtures: tiny models, one local Ray cluster, one real S3 server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.demo import (
    build_random_head,
    build_tiny_blip_captioner,
    build_tiny_blip_itm,
    build_tiny_clip,
    build_tiny_git,
    build_tiny_llava,
    write_sample_shards,
)
from jobs.demo.vlm_server import VlmServer
from tests.s3_server import S3Server, seaweedfs

# Model caches of the tests stay inside the test session, never in ~/.cache.
os.environ.setdefault("VLPIPE_CACHE", "/tmp/vlpipe-test-cache")

# The dry run of benchmarks/gpu/run.sh sets this to run the `gpu` tests on the CPU: it checks
# the tests themselves (fixtures, columns, the Ray run) before GPU time is spent on them.
GPU_TESTS_ON_CPU = os.environ.get("VLPIPE_GPU_TESTS_ON_CPU") == "1"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Skip `gpu` tests where torch sees no CUDA device, before any of their fixtures is built."""
    if item.get_closest_marker("gpu") is None or GPU_TESTS_ON_CPU:
        return
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny CLIP (random weights) saved as an ordinary Hugging Face directory."""
    return build_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture(scope="session")
def tiny_blip_captioner_dir(demo_models) -> Path:
    """A tiny BLIP captioner trained so captions are words, not noise: the demo's, trained once per session."""
    return demo_models["tiny-blip"]


@pytest.fixture(scope="session")
def tiny_blip_itm_dir(tmp_path_factory) -> Path:
    """A tiny BLIP image-text matching model (random weights)."""
    return build_tiny_blip_itm(tmp_path_factory.mktemp("models") / "tiny-blip-itm")


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory) -> dict[str, Path]:
    """The demo's trained tiny CLIP and BLIP captioner, trained once per session (~40 s) and shared."""
    from jobs.demo import DEMO_CAPTIONER_TRAIN_STEPS
    from jobs.demo.run import DEMO_TRAIN_STEPS

    root = tmp_path_factory.mktemp("demo-models")
    return {
        "tiny-clip": build_tiny_clip(root / "tiny-clip", train_steps=DEMO_TRAIN_STEPS),
        "tiny-blip": build_tiny_blip_captioner(root / "tiny-blip", train_steps=DEMO_CAPTIONER_TRAIN_STEPS),
    }


@pytest.fixture(scope="session")
def tiny_heads(tmp_path_factory) -> dict[str, Path]:
    """Random-weight aesthetic and NSFW heads for the tiny CLIP's 32-value embeddings, converted from .pth files."""
    root = tmp_path_factory.mktemp("heads")
    return {
        name: build_random_head(root / name, arch, embedding_dim=32, clip_model="tiny-clip", seed=i)
        for i, (name, arch) in enumerate((("aesthetic", "aesthetic-v2"), ("nsfw", "nsfw")))
    }


@pytest.fixture(scope="session")
def tiny_vit_classifier_dir(tmp_path_factory) -> Path:
    """A tiny ViT image classifier (random weights, labels clean/watermark/text) with its own 24x24 bilinear
    geometry."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    out = tmp_path_factory.mktemp("models") / "tiny-vit-watermark"
    labels = {0: "clean", 1: "watermark", 2: "text"}
    config = ViTConfig(
        image_size=24,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    torch.manual_seed(0)
    ViTForImageClassification(config).eval().save_pretrained(out)
    ViTImageProcessor(
        size={"height": 24, "width": 24}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]
    ).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_git_dir(tmp_path_factory) -> Path:
    return build_tiny_git(tmp_path_factory.mktemp("models") / "tiny-git")


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """A tiny chat-style VLM (LLaVA) with a chat template."""
    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava")


@pytest.fixture(scope="session")
def vlm_server(tiny_llava_dir, tmp_path_factory):
    """transformers' OpenAI-compatible server serving the tiny LLaVA on loopback, once per session (~15 s)."""
    with VlmServer(tiny_llava_dir, tmp_path_factory.mktemp("vlm-server")) as server:
        yield server


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session, with token authentication as Ray 2.60 defaults to."""
    import ray

    # address="local": always a fresh Ray of our own, never a cluster another test started with `ray start`.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> S3Server:
    """A real S3 server (SeaweedFS) on loopback, with signed requests."""
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture(scope="session")
def local_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    paths = write_sample_shards(folder, num_shards=3, rows_per_shard=12, broken_per_shard=2, seed=7)
    manifest = json.loads((folder / "manifest.json").read_text())
    rows = {}
    for path in paths:
        for row in pq.read_table(path).to_pylist():
            rows[row["key"]] = row
    return folder, paths, manifest, rows


@pytest.fixture(scope="session")
def s3_input(s3, local_shards):
    _, paths, _, _ = local_shards
    s3.upload(paths, "raw/crawl")
    fs = s3.filesystem()
    with fs.open_output_stream("raw/crawl/_SUCCESS") as out:  # writers' markers are not shards
        out.write(b"")
    return "s3://raw/crawl/"
