"""Two model stages sharing one GPU through fractional ``num_gpus``, end to end on a real local Ray.

Marked ``gpu`` (skipped without CUDA). Local shards and a local Delta table, so the GPU machine
needs no S3 server. With ``VLPIPE_GPU_TESTS_ON_CPU=1`` Ray is given one logical GPU, so the
scheduling (both halves held at once) is checked on the CPU too; the models then run in fp32.
"""

from __future__ import annotations

import io
import os
import threading

import numpy as np
import pytest
import torch
from deltalake import DeltaTable
from PIL import Image

from operators import schema as col
from operators.models.caption import CaptionConfig, Captioner
from operators.models.clip import ClipConfig, ClipScorer
from operators.refs import ModelRef
from operators.storage import StorageOptions
from pipelines.config import validate_config
from pipelines.run import run_pipeline
from tests.operators.models.test_caption import caption as run_captioner
from tests.operators.models.test_clip import run as run_clip
from tests.operators.models.test_gpu import (
    AUTO_DTYPE,
    CLIP_SCORE_ATOL,
    LOGIT_TIE,
    ON_GPU,
    assert_near_tie,
    cpu_reference,
    decoded_rows,
)

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def one_gpu_ray():
    """A local Ray with one GPU: the machine's, or a logical one for the CPU dry run."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local",
            num_cpus=max(4, os.cpu_count() or 1),
            num_gpus=None if ON_GPU else 1,
            include_dashboard=False,
            log_to_driver=False,
        )
        ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the running Ray cluster has no GPU")
    yield ray
    if started:
        ray.shutdown()


def gpu_memory_used() -> int:
    """Bytes in use on the GPU by every process (the actors' included), not only this one."""
    free, total = torch.cuda.mem_get_info()
    return total - free


class ResourceWatch:
    """Samples, while a run goes on, how much of the GPU Ray has left and how much memory the GPU uses."""

    def __init__(self, ray, interval: float = 0.1):
        self._ray, self._interval = ray, interval
        self.min_free_gpu = float("inf")
        self.peak_used_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.min_free_gpu = min(self.min_free_gpu, self._ray.available_resources().get("GPU", 0.0))
            if ON_GPU:
                self.peak_used_bytes = max(self.peak_used_bytes, gpu_memory_used())
            self._stop.wait(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_caption_and_clip_share_one_gpu_with_half_each(
    one_gpu_ray, tmp_path, local_shards, tiny_clip_dir, tiny_blip_captioner_dir
):
    folder, _, manifest, rows = local_shards
    # concurrency 1: one actor per stage, so "no GPU left" means both stages hold their halves at once.
    half = {"num_gpus": 0.5, "num_cpus": 0.5, "concurrency": 1}
    config = validate_config(
        {
            "input": {"uri": str(folder) + "/"},
            # Two decode tasks leave CPU room for both actors on the 2-core dry-run machine.
            "decode": {"jpeg_draft": False, "resources": {"concurrency": 2}},
            "caption": {"model": {"source": str(tiny_blip_captioner_dir)}, "max_new_tokens": 12, "resources": half},
            "clip": {"model": {"source": str(tiny_clip_dir)}, "resources": half},
            "filter": {"min_clip_score": -1.0},
            "output": {"uri": str(tmp_path / "table")},
            "run_date": "2026-11-01",
        }
    )
    baseline = gpu_memory_used() if ON_GPU else 0
    with ResourceWatch(one_gpu_ray) as watch:
        record = run_pipeline(config)

    assert record.status == "succeeded" and record.rows_in == len(rows)
    assert watch.min_free_gpu == 0.0, "the two half-GPU actors never ran at the same time"
    if ON_GPU:
        # Two models and their CUDA contexts: far more than nothing, so the actors did use the GPU.
        assert watch.peak_used_bytes - baseline > 256 << 20
    got = {r[col.KEY]: r for r in DeltaTable(str(tmp_path / "table")).to_pyarrow_table().to_pylist()}
    assert sorted(got) == sorted(rows)
    ok = sorted(k for k in rows if k not in set(manifest["broken_keys"]))
    assert_matches_cpu_reference(got, rows, ok, tiny_clip_dir, tiny_blip_captioner_dir)


def assert_matches_cpu_reference(got: dict, rows: dict, keys: list[str], clip_dir, captioner_dir) -> None:
    """Scores and captions of the GPU run against the operators on the CPU in fp32, row by row."""
    captioner = cpu_reference(
        lambda: Captioner(CaptionConfig(model=ModelRef(source=str(captioner_dir)), max_new_tokens=12), StorageOptions())
    )
    scorer = cpu_reference(lambda: ClipScorer(ClipConfig(model=ModelRef(source=str(clip_dir))), StorageOptions()))
    images = [Image.open(io.BytesIO(rows[k]["jpg"])).convert("RGB") for k in keys]
    captions = dict(zip(keys, run_captioner(captioner, images)))
    pixels = decoded_rows(captioner, [rows[k]["jpg"] for k in keys])
    for i, key in enumerate(keys):
        if got[key][col.CAPTION_GENERATED] != captions[key]:
            assert_near_tie(captioner, pixels[i], captions[key], got[key][col.CAPTION_GENERATED], LOGIT_TIE[AUTO_DTYPE])
    reference = run_clip(scorer, [rows[k]["jpg"] for k in keys], [rows[k]["caption"] for k in keys])
    want = reference.column(col.CLIP_SCORE).to_numpy(zero_copy_only=False)
    score = np.array([np.nan if got[k][col.CLIP_SCORE] is None else got[k][col.CLIP_SCORE] for k in keys], np.float32)
    np.testing.assert_array_equal(np.isnan(score), np.isnan(want))  # empty captions are null on both
    np.testing.assert_allclose(score[~np.isnan(want)], want[~np.isnan(want)], atol=CLIP_SCORE_ATOL[AUTO_DTYPE], rtol=0)
