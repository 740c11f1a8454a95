"""The retrieval benchmark measures what it prints (small and narrow here; `--retrieval` runs 100k x 512)."""

from __future__ import annotations

from benchmarks.retrieval import format_retrieval, retrieval


def test_the_retrieval_benchmark_reports_recall_build_time_and_latency(tmp_path):
    result = retrieval(tmp_path, rows=60_000, dim=16, end_to_end=False)
    assert result["index"] == "IVF1024,Flat" and 1 <= result["params"]["nprobe"] <= 1024
    assert set(result["recall_at_10"]) == {"image", "text"} and all(0 < r <= 1 for r in result["recall_at_10"].values())
    assert result["build"]["total"] >= result["build"]["train"] > 0
    assert set(result["latency_ms"]) == {"exact 50000", "exact 60000", "IVF1024,Flat"}
    assert all(0 < v["p50"] <= v["p99"] for v in result["latency_ms"].values())
    printed = "\n".join(format_retrieval(result))
    assert "recall@10 vs exact on held-out queries: image" in printed and "(target >= 0.95)" in printed
