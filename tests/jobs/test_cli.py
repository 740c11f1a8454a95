"""The ``vlpipe`` command line as a user types it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from jobs.cli import main
from pipelines.table.read import read_output

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
def test_demo_from_a_fresh_checkout_prints_a_summary_that_matches_the_table(tmp_path, monkeypatch, capsys, demo_models):
    # A fresh checkout has no Ray connected, whatever ran before this test: the demo runs in process.
    monkeypatch.setattr("pipelines.execute.local._ray_connected", lambda: False)
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    # The trained models are shared with the tests of their training; shards and the run are this test's own.
    for name, model_dir in demo_models.items():
        shutil.copytree(model_dir, tmp_path / ".cache/demo" / name)
    monkeypatch.chdir(tmp_path)

    assert main(["-q", "demo"]) == 0
    out = capsys.readouterr().out
    manifest = json.loads(Path(".cache/demo/shards/manifest.json").read_text())
    table = read_output("out/demo/enriched")

    assert "rows in           141" in out and "out/demo/enriched" in out
    assert table.num_rows == 141  # 129 shape images and 12 photographs and text images
    rows = {r["key"]: r for r in table.to_pylist()}
    # Real weights, real answers: text on the cards, the page and the watermark, none on the photographs.
    photos = {r["url"].rsplit("/", 1)[1].removesuffix(".jpg"): r for r in rows.values() if "/demo/" in r["url"]}
    texts = {"page", "card-sale", "card-sign", "card-terms", "watermarked-chelsea"}
    assert {name for name, r in photos.items() if r["reject_reason"] == "too_much_text"} == texts
    assert all(
        photos[n]["text_area_fraction"] < 0.02 and photos[n]["image_nsfw_score"] < 0.2 for n in photos.keys() - texts
    )
    assert photos["card-sign"]["ocr_text"].replace(" ", "") == "WelcometotheMountainTrailCafe"
    # Every planted copy (exact, re-encoded, resized) and its original: one is the duplicate of the other.
    for copy, original in manifest["duplicate_pairs"]:
        duplicate = rows[copy] if rows[copy]["duplicate_of"] else rows[original]
        assert duplicate["reject_reason"] in ("duplicate_exact", "duplicate_near")
        assert duplicate["duplicate_of"]["key"] in (copy, original)
    assert "duplicate_exact" in out and "duplicate_near" in out
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
    # Quality signals: a head score, the tags and the caption's language on every decodable row.
    for key, row in rows.items():
        if key not in manifest["broken_keys"]:
            assert row["aesthetic_score"] is not None and 0 < row["nsfw_score"] < 1
            assert sorted(dict(row["tag_scores"])) == ["blue", "red"]
            assert row["text_boxes"] is not None and 0 <= row["image_nsfw_score"] < 1
            # The shape captions are all English; a short photo caption may not be told apart (5 candidates).
            assert row["caption_language"] == "en" or "/demo/" in row["url"]


def test_a_partial_run_names_its_failed_shards_and_exits_3():
    import datetime as dt

    from jobs.cli import exit_code, format_summary
    from pipelines.table.records import RunRecord

    now = dt.datetime(2026, 11, 23, tzinfo=dt.timezone.utc)
    record = RunRecord(
        run_id="r1",
        run_date=now.date(),
        status="partial",
        started_at=now,
        finished_at=now,
        config_hash="h",
        config_json="{}",
        output_uri="/out/t",
        table_version=4,
        rows_in=10,
        rows_kept=10,
        failed_shards=[{"uri": "s3://in/b.parquet", "error": "the shard has no rows"}],
    )
    summary = format_summary(record)
    assert "failed shards       1" in summary and "s3://in/b.parquet: the shard has no rows" in summary
    assert exit_code(record) == 3 and "(partial)" in summary
    record.failed_shards, record.status = [], "succeeded"
    assert exit_code(record) == 0 and "failed shards" not in format_summary(record)


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.slow
@pytest.mark.parametrize(
    ("secret", "uri", "code", "message"),
    [
        (
            "wrong-secret",
            "s3://raw/crawl/",
            6,
            "cannot list input s3://raw/crawl/: .*ACCESS_DENIED",
        ),  # refused credentials
        (None, "s3://no-such-bucket/crawl/", 4, "no Parquet shards found at input.uri 's3://no-such-bucket/crawl/'"),
    ],
)
def test_storage_that_refuses_or_lacks_the_input_is_one_line(
    s3, s3_input, tmp_path, capsys, secret, uri, code, message
):
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "input": {"uri": uri},
                "clip": {"model": {"source": "org/clip"}},  # a hub id: never loaded by `plan`
                "output": {"uri": str(tmp_path / "out")},
                "storage": {
                    "endpoint_url": s3.endpoint_url,
                    "region": s3.region,
                    "access_key_id": s3.access_key_id,
                    "secret_access_key": secret or s3.secret_access_key,
                },
            }
        )
    )
    assert main(["plan", str(config)]) == code
    err = capsys.readouterr().err.strip()
    assert re.match(f"vlpipe: {message}", err) and "\n" not in err, err
    assert s3.secret_access_key not in err


def test_an_unreachable_cluster_is_one_line_and_exit_6(capsys):
    address = f"http://127.0.0.1:{closed_port()}"
    assert main(["status", "some-job", "--address", address]) == 6
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vlpipe: cannot reach the Ray cluster {address}: ") and "\n" not in err


def test_verbose_adds_the_traceback(capsys):
    assert main(["-v", "status", "some-job", "--address", f"http://127.0.0.1:{closed_port()}"]) == 6
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith(
        "vlpipe: cannot reach"
    )


def test_convert_head_writes_a_head_directory_and_refuses_what_is_not_a_head(tmp_path, capsys):
    import torch

    from tests.operators.models.test_heads import released

    torch.save(released("nsfw", 768).state_dict(), tmp_path / "clip_autokeras_binary_nsfw.pth")
    assert (
        main(
            ["convert-head", str(tmp_path / "clip_autokeras_binary_nsfw.pth"), str(tmp_path / "nsfw"), "--arch", "nsfw"]
        )
        == 0
    )
    assert "nsfw head, 768-value embeddings, trained on openai/clip-vit-large-patch14" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "nsfw").iterdir()) == ["config.json", "model.safetensors"]
    assert (
        main(
            [
                "convert-head",
                str(tmp_path / "clip_autokeras_binary_nsfw.pth"),
                str(tmp_path / "a"),
                "--arch",
                "aesthetic-v2",
            ]
        )
        == 2
    )
    assert "is not an aesthetic-v2 head: unknown key(s) linear_1.bias" in capsys.readouterr().err


def test_quiet_silences_ray_only_once_something_imports_it():
    import subprocess
    import sys

    # A small run never imports Ray: --quiet must not import it either, yet must still hold where Ray comes in.
    script = (
        "import sys, logging\nfrom jobs.cli import _ray_output\n_ray_output(True)\n"
        "assert 'ray' not in sys.modules\nimport ray.data\n"
        "print(ray.data.DataContext.get_current().enable_progress_bars,"
        " min(h.level for h in logging.getLogger('ray').handlers))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=120
    )
    assert done.stdout.split() == ["False", "30"], done.stderr[-2000:]
