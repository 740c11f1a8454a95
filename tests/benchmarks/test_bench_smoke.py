"""The benchmark harness end to end at toy size: every figure it reports is there and sane (not timed)."""

from __future__ import annotations

import json

import pytest

from benchmarks.bench import main, stage_split, tree_rss

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


def test_tree_rss_counts_child_processes():
    import subprocess
    import sys

    alone = tree_rss(999_999_999)  # no such process: nothing to count
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(200 << 20); time.sleep(30)"])
    try:
        import time

        deadline = time.monotonic() + 20
        while tree_rss(child.pid) < 150 << 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        import os

        assert alone == 0
        assert tree_rss(os.getpid()) >= tree_rss(child.pid) >= 150 << 20
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_tiny_benchmark_reports_every_figure(tmp_path, tiny_clip_dir, tiny_blip_captioner_dir, ray_cluster, capsys):
    out = tmp_path / "out" / "bench.json"
    main([
        "--tiny", "--clip-model", str(tiny_clip_dir), "--caption-model", str(tiny_blip_captioner_dir),
        "--clip-images", "16", "--caption-images", "8", "--scale-images", "16",
        "--max-new-tokens", "4", "--work-dir", str(tmp_path / "work"), "--out", str(out),
    ])
    report = json.loads(out.read_text())

    assert report["machine"]["cpus"] >= 1 and len(report["machine"]["load_average_end"]) == 3
    for workload, n in (("clip", 16), ("caption", 8)):
        result = report[workload]
        for mode in ("limit", "naive", "vlpipe"):
            figures = result[mode]
            assert figures["images"] == n
            assert figures["seconds"] > 0 and figures["images_per_s"] == pytest.approx(n / figures["seconds"], rel=0.01)
            assert figures["peak_rss_mb"] > 100  # at least this Python process with torch loaded
        vl = result["vlpipe"]
        assert result["vlpipe_over_limit"] == pytest.approx(vl["images_per_s"] / result["limit"]["images_per_s"], rel=0.01)
        assert result["vlpipe_over_naive"] == pytest.approx(vl["images_per_s"] / result["naive"]["images_per_s"], rel=0.01)
        assert 0 <= vl["rows_kept"] <= n
        stages = " ".join(vl["stages"])
        assert "Decode" in stages and "Clip" in stages
        assert all(s["wall_s"] >= 0 for s in vl["stages"].values() if "wall_s" in s)
    assert "Caption" in " ".join(report["caption"]["vlpipe"]["stages"])
    # A scale point at the CLIP run's size reuses that run rather than paying for another.
    assert report["scale"] == [{
        "rows": 16, "model": str(tiny_clip_dir), "seconds_per_1k_rows": report["clip"]["vlpipe"]["seconds_per_1k_rows"],
        "peak_rss_mb": report["clip"]["vlpipe"]["peak_rss_mb"], "images_per_s": report["clip"]["vlpipe"]["images_per_s"],
    }]

    printed = capsys.readouterr().out
    assert "v/limit" in printed and "tiny-clip" in printed and str(out) in printed
