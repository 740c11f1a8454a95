"""The ``vlpipe`` command line as a user types it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jobs.cli import main
from pipelines.read import read_output

ROOT = Path(__file__).resolve().parents[2]


def test_misspelt_key_exits_2_naming_it_without_echoing_secrets(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(
        "input: {uri: /data/shards}\n"
        "clip: {model: {source: /models/clip}}\n"
        "output: {uri: /out/t}\n"
        "filter: {min_clip_scor: 0.2}\n"
        "storage: {secret_access_key: hunter2-planted-secret}\n"
    )
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "filter.min_clip_scor" in err and "min_clip_score" in err
    assert "hunter2" not in err


def test_bad_override_value_exits_2(tmp_path, capsys):
    assert main(["run", str(ROOT / "configs/demo.yaml"), "--set", "filter.min_clip_score=7"]) == 2
    assert "filter.min_clip_score" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_from_a_fresh_checkout_prints_a_summary_that_matches_the_table(
    tmp_path, monkeypatch, capsys, ray_cluster, demo_models
):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    # The trained models are shared with the tests of their training; shards and the run are this test's own.
    for name, model_dir in demo_models.items():
        shutil.copytree(model_dir, tmp_path / ".cache/demo" / name)
    monkeypatch.chdir(tmp_path)

    assert main(["-q", "demo"]) == 0
    out = capsys.readouterr().out
    manifest = json.loads(Path(".cache/demo/shards/manifest.json").read_text())
    table = read_output("out/demo/enriched")

    assert "rows in           120" in out and "out/demo/enriched" in out
    assert table.num_rows == 120
    rows = {r["key"]: r for r in table.to_pylist()}
    for key in manifest["broken_keys"]:
        assert rows[key]["reject_reason"] in ("decode_error", "missing_image")
    kept = sum(r["keep"] for r in rows.values())
    assert f"kept         {kept:>8}" in out
    # Every planted mismatch is either rejected or rescued by a generated caption that matches better.
    for key in manifest["mismatched_keys"]:
        row = rows[key]
        assert row["reject_reason"] == "low_clip_score" or (
            row["caption_source"] == "generated" and row["clip_score_generated"] > row["clip_score"]
        )
    rescued = sum(rows[k]["caption_source"] == "generated" for k in manifest["mismatched_keys"])
    assert rescued >= len(manifest["mismatched_keys"]) // 2  # the tiny captioner names most images right
    for key in manifest["empty_caption_keys"]:
        assert rows[key]["caption_generated"] and rows[key]["reject_reason"] in (None, "low_clip_score")


def test_a_partial_run_names_its_failed_shards_and_exits_3():
    import datetime as dt

    from jobs.cli import exit_code, format_summary
    from pipelines.runs import RunRecord

    now = dt.datetime(2026, 11, 23, tzinfo=dt.timezone.utc)
    record = RunRecord(run_id="r1", run_date=now.date(), status="partial", started_at=now, finished_at=now,
                       config_hash="h", config_json="{}", output_uri="/out/t", table_version=4, rows_in=10,
                       rows_kept=10, failed_shards=[{"uri": "s3://in/b.parquet", "error": "the shard has no rows"}])
    summary = format_summary(record)
    assert "failed shards       1" in summary and "s3://in/b.parquet: the shard has no rows" in summary
    assert exit_code(record) == 3 and "(partial)" in summary
    record.failed_shards, record.status = [], "succeeded"
    assert exit_code(record) == 0 and "failed shards" not in format_summary(record)
