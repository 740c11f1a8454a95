"""The benchmark harness end to end at toy size: every figure it reports is there and sane (not timed)."""

from __future__ import annotations

import json

import pytest

from benchmarks.bench import format_cpu_split, format_report, load_rows, main, stage_split
from benchmarks.measure import DRIVER, Usage, sample_tree
from benchmarks.whole import parse_timings

STATS = """Operator 3 MapBatches(PrepareInput)->MapBatches(DecodeImages): 2 tasks executed, 2 blocks produced in 0.09s
* Remote wall time: 40.5ms min, 50.2ms max, 45.35ms mean, 90.7ms total
* Remote cpu time: 30ms min, 43.82ms max, 36.91ms mean, 73.82ms total

Operator 4 MapBatches(ClipStage): 1 tasks executed, 1 blocks produced in 12.5s
* Remote wall time: 12.5s min, 12.5s max, 12.5s mean, 12.5s total
* Remote cpu time: 11.2s min, 11.2s max, 11.2s mean, 11.2s total
"""


def test_stage_split_reads_total_wall_and_cpu_seconds_per_operator():
    assert stage_split(STATS) == {
        "MapBatches(PrepareInput)->MapBatches(DecodeImages)": {"wall_s": 0.091, "cpu_s": 0.074},
        "MapBatches(ClipStage)": {"wall_s": 12.5, "cpu_s": 11.2},
    }


def test_tree_memory_counts_child_processes_and_shared_pages_once():
    import os
    import subprocess
    import sys
    import time

    # The child writes 200 MB of private pages, then forks: the two share them copy-on-write.
    script = "import os, time; b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096]); os.fork(); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 20
        while len(open(f"/proc/{child.pid}/task/{child.pid}/children").read().split()) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        tree = sample_tree(child.pid)
        assert sample_tree(999_999_999).rss == 0  # no such process: nothing to count
        assert tree.rss >= 400 << 20  # RSS counts the shared 200 MB in each of the two processes
        assert 200 << 20 <= tree.pss < 300 << 20  # PSS counts it once
        assert sample_tree(os.getpid()).pss >= tree.pss
    finally:
        subprocess.run(["pkill", "-P", str(child.pid)])
        child.kill()
        child.wait()


def test_cpu_split_credits_each_process_by_what_it_runs(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "burn.py"
    # It then idles a while: a sample must see it after its work (the sampler slows itself to stay cheap).
    # It burns more than the 0.5 s asserted: /proc counts in clock ticks, user and system time each
    # rounded down (a 0.5 s burn once read 0.49 s).
    script.write_text(
        "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\ntime.sleep(2)\n"
    )
    with Usage(interval=0.05) as usage:
        subprocess.Popen([sys.executable, str(script)]).wait()
    figures = usage.figures()
    split = figures["cpu_split_s"]
    assert split["burn.py"] >= 0.5
    # Anything else is what this test process already had running (a session's Ray, where an earlier
    # test started one): none of the burn is credited to it.
    assert sum(seconds for name, seconds in split.items() if name != "burn.py") < 0.5
    assert sum(split.values()) <= figures["busy_cpu_s"] + 0.1  # the tree is part of the machine


def test_cpu_split_names_actors_by_class_and_idle_workers_by_their_last_task():
    from benchmarks.measure import TreeSample

    usage = Usage()
    decode, clip = "ray::MapBatches(Decode)", "ray::MapWorker(MapBatches(Clip))"
    for cpu in (
        {1: (DRIVER, 5.0), 2: ("ray::IDLE", 1.0), 3: (clip + ".__init__", 2.0)},  # baseline
        {1: (DRIVER, 5.5), 2: (decode, 3.0), 3: (clip + ".submit", 4.0), 4: ("ray::IDLE", 0.5)},
        {1: (DRIVER, 6.0), 2: ("ray::IDLE", 4.0), 3: (clip, 4.5), 4: ("ray::IDLE", 0.7)},
    ):
        usage.add_sample(TreeSample(0, 0, 0, cpu))
    assert usage.cpu_split == {DRIVER: 1.0, decode: 3.0, clip: 2.5, "ray::IDLE": 0.7}


def test_cpu_split_line_shows_the_largest_shares_of_the_machine():
    split = {
        "ray::MapBatches(Decode)": 76.0,
        "ray::MapWorker(MapBatches(Clip)).submit": 12.0,
        DRIVER: 3.0,
        "raylet": 1.0,
        "gcs_server": 1.0,
    }
    assert format_cpu_split(split, 100.0, shown=2) == (
        "             cpu: ray::MapBatches(Decode) 76%, ray::MapWorker(MapBatches(Clip)).submit 12%, "
        "other processes of the run 5%, not in the run (or missed between samples) 7%"
    )


def test_run_timings_are_read_back_from_the_run_log():
    stderr = (
        "2026-12-01 12:43:01,901 INFO pipelines.run run=x: timings: list_and_check_shards 0.07 s, "
        "plan 1.60 s, execute 8.21 s\nvlpipe run x (succeeded) in 15.4s\n"
    )
    assert parse_timings(stderr) == {"list_and_check_shards": 0.07, "plan": 1.6, "execute": 8.21}
    with pytest.raises(RuntimeError):
        parse_timings("no such line")


def test_signal_costs_are_measured_on_the_operators_without_ray(tmp_path, tiny_clip_dir):
    from benchmarks.data import write_shards
    from benchmarks.signals import signals

    table = load_rows(write_shards(tmp_path / "shards", 6))
    result = signals(table, tmp_path / "models", tiny_clip_dir, tiny=True, clip_batch=4)
    h, c = result["heads_tags"], result["classifier"]
    assert h["images"] == c["images"] == 6 and h["heads"] == ["aesthetic", "nsfw"] and h["prompts"] >= 2 * h["tags"]
    assert h["with_signals_s"] > 0 and h["ratio"] == pytest.approx(h["with_signals_s"] / h["clip_s"], rel=0.01)
    assert 0 < h["heads_s"] < h["with_signals_s"] and 0 < h["tags_s"] < h["with_signals_s"]
    assert c["ratio"] == pytest.approx(c["bare_s"] / c["operator_s"], rel=0.01) and c["bare_images_per_s"] > 0
    printed = format_report(
        {
            "machine": {"cpus": 1, "platform": "p", "torch": "t", "device": "cpu", "load_average_start": [0, 0, 0]},
            "signals": result,
        }
    )
    assert "(target <= 1.05)" in printed and "(target >= 0.9)" in printed and "tiny-vit-classifier" in printed


@pytest.mark.slow
def test_tiny_benchmark_reports_every_figure(tmp_path, tiny_clip_dir, tiny_blip_captioner_dir, ray_cluster, capsys):
    out = tmp_path / "out" / "bench.json"
    main(
        [
            "--tiny",
            "--clip-model",
            str(tiny_clip_dir),
            "--caption-model",
            str(tiny_blip_captioner_dir),
            "--clip-images",
            "16",
            "--caption-images",
            "8",
            "--scale-images",
            "16",
            "--signals-images",
            "8",
            "--max-new-tokens",
            "4",
            "--whole-repeats",
            "0",
            "--work-dir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ]
    )
    report = json.loads(out.read_text())

    assert report["machine"]["cpus"] >= 1 and len(report["machine"]["load_average_end"]) == 3
    for workload, n in (("clip", 16), ("caption", 8)):
        result = report[workload]
        for mode in ("limit", "naive", "vlpipe", "vlpipe_in_process"):
            figures = result[mode]
            assert figures["images"] == n
            assert figures["seconds"] > 0 and figures["images_per_s"] == pytest.approx(n / figures["seconds"], rel=0.01)
            assert figures["peak_pss_mb"] > 100  # at least this Python process with torch loaded
            assert figures["peak_rss_mb"] >= figures["peak_pss_mb"]
            assert 0 < figures["cores_busy"] <= 1
        for mode in ("vlpipe", "vlpipe_in_process"):
            vl = result[mode]
            assert result[f"{mode}_over_limit"] == pytest.approx(
                vl["images_per_s"] / result["limit"]["images_per_s"], rel=0.01
            )
            assert result[f"{mode}_over_naive"] == pytest.approx(
                vl["images_per_s"] / result["naive"]["images_per_s"], rel=0.01
            )
        # The same rows and decisions with or without Ray.
        assert 0 <= result["vlpipe"]["rows_kept"] == result["vlpipe_in_process"]["rows_kept"] <= n
        vl = result["vlpipe"]
        stages = " ".join(vl["stages"])
        assert "Decode" in stages and "Clip" in stages
        assert all(s["wall_s"] >= 0 for s in vl["stages"].values() if "wall_s" in s)
    assert "Caption" in " ".join(report["caption"]["vlpipe"]["stages"])
    # A scale point at the CLIP run's size reuses that run rather than paying for another.
    clip_run = report["clip"]["vlpipe"]
    assert clip_run["peak_ray_workers"] >= 2 and clip_run["spilled_mb"] == 0
    assert {"plan", "execute", "commit"} <= set(clip_run["timings"])
    [scale] = report["scale"]
    assert scale["rows"] == 16 and scale["seconds_per_1k_rows"] == clip_run["seconds_per_1k_rows"]
    assert scale["peak_pss_mb"] == clip_run["peak_pss_mb"]
    # At toy size decode tasks end between samples; the CLIP actor lives through the run.
    assert any("Clip" in t for t in scale["cpu_split_s"]) and DRIVER in scale["cpu_split_s"]
    assert 0 < sum(scale["cpu_split_s"].values()) <= scale["busy_cpu_s"] + 0.5
    decode = report["decode_limit"]
    assert decode["rows"] == 16 and decode["images_per_s"] > 0
    assert scale["vlpipe_over_decode_limit"] == pytest.approx(scale["images_per_s"] / decode["images_per_s"], rel=0.01)

    assert report["signals"]["heads_tags"]["images"] == report["signals"]["classifier"]["images"] == 8
    printed = capsys.readouterr().out
    assert "v/limit" in printed and "tiny-clip" in printed and str(out) in printed and "cpu: " in printed
    assert "clip/here" in printed and "caption/here" in printed


def test_whole_commands_print_both_executors_against_the_naive_script():
    from benchmarks.bench import _format_whole

    def spread(median, images=512):
        return {
            "runs": 3,
            "min_s": median - 1,
            "median_s": median,
            "max_s": median + 1,
            "images": images,
            "images_per_s": images / median,
        }

    def phases(execute):
        return {"wall": spread(execute + 4), "phases_s": {"plan": 0.0, "execute": execute}, "outside_run_s": 3.0}

    result = {
        "clip": {
            "vlpipe_auto": spread(40.0),
            "vlpipe_ray": spread(55.0),
            "naive": spread(44.0),
            "vlpipe_auto_over_naive": 1.1,
            "vlpipe_ray_over_naive": 0.8,
        },
        "fixed_cost": {"imports_s": 1.5, "auto": phases(2.0), "ray": phases(11.0)},
    }
    printed = "\n".join(_format_whole(result))
    assert "whole commands, 512 rows (s, min/median/max of 3):" in printed
    assert "  vlpipe_auto      39.0    40.0    41.0   12.8 img/s" in printed
    assert "vlpipe_auto / naive: 1.10, vlpipe_ray / naive: 0.80" in printed
    assert (
        "executor auto  median 6.0 s (min 5.0, max 7.0); outside run_pipeline 3.0 s; phases: plan 0.00, execute 2.00"
        in printed
    )
    assert "executor ray   median 15.0 s" in printed
