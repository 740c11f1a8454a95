"""Runs without Ray: the same rows, decisions and commit as on Ray, and the rule that picks them."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from operators import schema as col
from pipelines import hooks
from pipelines.config import validate_config
from pipelines.execute.batches import rebatch
from pipelines.execute.local import in_process_reason, ordered_map
from pipelines.run import run_pipeline
from pipelines.table.records import read_run_records


def test_rebatch_cuts_across_tables_to_the_step_size_in_order():
    tables = [pa.table({"n": list(range(start, stop))}) for start, stop in ((0, 5), (5, 6), (6, 6), (6, 17))]
    batches = list(rebatch(tables, 4))
    assert [b.num_rows for b in batches] == [4, 4, 4, 4, 1]
    assert [n for b in batches for n in b.column("n").to_pylist()] == list(range(17))
    assert list(rebatch([], 4)) == []


def test_ordered_map_keeps_order_and_bounds_the_batches_in_flight():
    started, running, most = [], [0], [0]
    lock = threading.Lock()

    def items():
        for n in range(12):
            started.append(n)
            yield n

    def slow_square(n):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.01 * (n % 3))  # later items finish first sometimes
        with lock:
            running[0] -= 1
        return n * n

    with ThreadPoolExecutor(3) as pool:
        results = ordered_map(pool, slow_square, items(), ahead=4)
        assert next(results) == 0 and len(started) == 4  # reads no further ahead than asked
        assert list(results) == [n * n for n in range(1, 12)]
    assert most[0] <= 3


def _config(**top):
    return validate_config(
        {"input": {"uri": "in/"}, "clip": {"model": {"source": "m"}}, "output": {"uri": "out/"}, **top}
    )


def test_auto_runs_a_small_run_here_and_a_large_or_clustered_one_on_ray(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("pipelines.execute.local._ray_connected", lambda: False)
    assert "129 rows, at most in_process_max_rows (10,000)" in in_process_reason(_config(), 129)
    assert in_process_reason(_config(), 10_001) is None
    assert in_process_reason(_config(in_process_max_rows=100), 129) is None
    assert in_process_reason(_config(), None) is None  # rows unknown (tar shards): Ray
    assert in_process_reason(_config(ray_address="ray://head:10001"), 129) is None
    assert in_process_reason(_config(executor="ray"), 129) is None
    assert in_process_reason(_config(executor="in_process"), 10**9) == "executor: in_process"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")  # a job on a cluster
    assert in_process_reason(_config(), 129) is None
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr("pipelines.execute.local._ray_connected", lambda: True)  # a notebook's Ray
    assert in_process_reason(_config(), 129) is None


def test_executor_is_checked_and_left_out_of_the_config_hash():
    with pytest.raises(ValueError, match="executor"):
        _config(executor="threads")
    assert _config(executor="in_process", in_process_max_rows=5).hash() == _config().hash()


def _demo_like(folder, models, out, executor):
    """Captioning, CLIP, both dedup methods and a top fraction: two aggregates, three passes."""
    return validate_config(
        {
            "input": {"uri": str(folder)},
            "caption": {
                "model": {"source": str(models["tiny-blip"])},
                "max_new_tokens": 8,
                "resources": {"num_cpus": 0.5, "batch_size": 5},
            },
            "clip": {"model": {"source": str(models["tiny-clip"])}, "resources": {"num_cpus": 0.5, "batch_size": 7}},
            "decode": {"resources": {"batch_size": 6}},
            "dedup": {"exact": True, "near": {"max_distance": 8}, "semantic": {"eps": 0.02}},
            "filter": {"caption": "best", "keep_top_fraction": 0.6},
            "output": {"uri": str(out), "rows_per_file": 8},
            "run_date": "2026-11-01",
            "executor": executor,
        }
    )


_COMPARED = (
    col.STATUS,
    col.ERROR,
    col.CAPTION_GENERATED,
    col.CAPTION_SOURCE,
    col.IMAGE_SHA256,
    col.IMAGE_PHASH,
    col.DUPLICATE_OF,
    col.SEMANTIC_CLUSTER,
    col.KEEP,
    col.REJECT_REASON,
)


@pytest.mark.slow
def test_in_process_run_writes_what_the_ray_run_writes(ray_cluster, local_shards, demo_models, tmp_path):
    folder, _, _, rows = local_shards
    on_ray = run_pipeline(_demo_like(folder, demo_models, tmp_path / "ray", "ray"))
    here = run_pipeline(_demo_like(folder, demo_models, tmp_path / "here", "in_process"))

    assert here.status == on_ray.status == "succeeded"
    assert here.rows_in == on_ray.rows_in == len(rows)
    assert (here.rows_kept, here.rejected_by_reason) == (on_ray.rows_kept, on_ray.rejected_by_reason)
    assert here.rejected_by_reason.get(col.BELOW_TOP_FRACTION)  # the second aggregate decided something
    ray_rows = {r[col.KEY]: r for r in DeltaTable(str(tmp_path / "ray")).to_pyarrow_table().to_pylist()}
    here_table = DeltaTable(str(tmp_path / "here"))
    here_rows = {r[col.KEY]: r for r in here_table.to_pyarrow_table().to_pylist()}
    assert sorted(here_rows) == sorted(ray_rows) == sorted(rows)
    for key, row in here_rows.items():
        assert {c: row[c] for c in _COMPARED} == {c: ray_rows[key][c] for c in _COMPARED}, key
        for score in (col.CLIP_SCORE, col.CLIP_SCORE_GENERATED):
            assert row[score] == pytest.approx(ray_rows[key][score], abs=1e-5)
    files = pa.table(here_table.get_add_actions(flatten=True)).column("num_records").to_pylist()
    assert max(files) <= 8 and sum(files) == len(rows)  # output.rows_per_file holds
    assert not (tmp_path / "here" / "_vlpipe_staging").exists() or not any(
        (tmp_path / "here" / "_vlpipe_staging").iterdir()
    )


@pytest.mark.slow
def test_a_stage_that_fails_in_process_fails_the_run_with_a_record(local_shards, tiny_clip_dir, tmp_path):
    folder, _, _, _ = local_shards

    def fail_in_clip(point: str) -> None:
        if point == "batch:clip":
            raise RuntimeError("clip broke on purpose")

    config = validate_config(
        {
            "input": {"uri": str(folder)},
            "clip": {"model": {"source": str(tiny_clip_dir)}},
            "output": {"uri": str(tmp_path / "out")},
            "executor": "in_process",
        }
    )
    hooks.install(fail_in_clip)
    try:
        with pytest.raises(RuntimeError, match="clip broke on purpose"):
            run_pipeline(config)
    finally:
        hooks.install(None)
    [record] = read_run_records(str(tmp_path / "out" / "_vlpipe_runs")).to_pylist()
    assert record["status"] == "failed" and "clip broke on purpose" in record["error"]
    assert not (tmp_path / "out" / "_delta_log").exists()  # nothing committed


@pytest.mark.slow
def test_a_gpu_this_machine_lacks_fails_an_in_process_run_before_any_work(
    local_shards, tiny_clip_dir, tmp_path, capsys
):
    import torch
    import yaml

    from jobs.cli import main

    if torch.cuda.device_count():
        pytest.skip("this machine has a GPU")
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "input": {"uri": str(local_shards[0])},
                "clip": {"model": {"source": str(tiny_clip_dir)}},
                "output": {"uri": str(tmp_path / "out")},
                "executor": "in_process",
                "report": {"enabled": False},
            }
        )
    )
    assert main(["run", str(config), "--set", "clip.resources.num_gpus=1"]) == 2
    assert (
        "clip.resources asks for 1 GPU(s), but this machine has 0 (the run is in this process: executor: in_process)"
    ) in capsys.readouterr().err
    [record] = read_run_records(str(tmp_path / "out" / "_vlpipe_runs")).to_pylist()
    assert record["status"] == "failed" and not (tmp_path / "out" / "_delta_log").exists()


@pytest.mark.slow
def test_a_decision_that_shuffles_in_process_gets_rays_sort_shuffle(ray_cluster):
    # A dedup too large for one task shuffles with Ray Data from a run in process: with Ray's
    # default hash shuffle each groupby started aggregator actors (1.4-3.5 s each on 2 cores).
    from ray.data.context import DataContext, ShuffleStrategy

    from pipelines.execute.local import LocalExecutor

    executor = LocalExecutor()
    before = DataContext.get_current().shuffle_strategy
    with executor.shuffling():
        assert DataContext.get_current().shuffle_strategy == ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    assert DataContext.get_current().shuffle_strategy == before
