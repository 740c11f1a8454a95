"""End to end: real local Ray, real S3 (SeaweedFS), tiny CLIP, Delta Lake read back row by row."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from deltalake import DeltaTable
from PIL import Image

from operators import schema as col
from pipelines.config import validate_config
from pipelines.run import run_pipeline
from pipelines.table.records import read_run_records
from tests.operators.models.test_clip import reference_scores
from tests.pipelines.conftest import s3_config

pytestmark = pytest.mark.slow


def test_run_on_s3_commits_every_row_with_its_score_and_reason(
    ray_cluster, s3, s3_input, local_shards, tiny_clip_dir, tiny_heads, tiny_vit_classifier_dir
):
    """The CLIP run with every quality signal on: heads fetched from S3, tags, language, an image classifier,
    basic and score filters."""
    from operators.models.heads import HeadSpec, load_head
    from tests.operators.models.test_clip import colour_tags

    _, paths, manifest, rows = local_shards
    s3.create_bucket("lake")
    for name, head_dir in tiny_heads.items():
        s3.upload(head_dir.iterdir(), f"heads/{name}")
    tags = {name: tag.model_dump() for name, tag in colour_tags().items()}
    config = s3_config(
        s3,
        tiny_clip_dir,
        heads={name: {"source": f"s3://heads/{name}"} for name in tiny_heads},
        tags=tags,
        language={"candidates": ["en", "de", "fr"]},
        # Two model actors and decoding share the test's 2 CPUs.
        clip={"model": {"source": str(tiny_clip_dir)}, "resources": {"num_cpus": 0.5}},
        classifier={
            "model": {"source": str(tiny_vit_classifier_dir)},
            "scores": {"watermark": "watermark"},
            "resources": {"num_cpus": 0.5},
        },
        filter={
            "min_image_side": 8,
            "max_aspect_ratio": 10.0,
            "min_caption_words": 1,
            "min_caption_chars": 1,
            "caption_languages": ["en"],
            "max_nsfw_score": 1.0,
            "tags": {"red": {"max": 1.0}},
            "classifier_scores": {"watermark": {"max": 1.0}},
        },
    )
    record = run_pipeline(config)

    table = DeltaTable("s3://lake/enriched", storage_options=s3.delta_storage_options()).to_pyarrow_table()
    got = {r[col.KEY]: r for r in table.to_pylist()}
    assert table.num_rows == len(rows) and sorted(got) == sorted(rows)  # every row, once

    ok_keys = [k for k in rows if k not in manifest["broken_keys"] and k not in manifest["empty_caption_keys"]]
    images = [Image.open(io.BytesIO(rows[k]["jpg"])) for k in ok_keys]
    expected = dict(zip(ok_keys, reference_scores(tiny_clip_dir, images, [rows[k]["caption"] for k in ok_keys])))
    heads = {
        name: load_head(d, HeadSpec.model_validate_json((d / "config.json").read_text()))
        for name, d in tiny_heads.items()
    }
    for key, row in got.items():
        assert row[col.SOURCE_SHARD].startswith("s3://raw/crawl/0000")
        assert str(row[col.RUN_DATE]) == "2026-11-01"
        if key in manifest["broken_keys"]:
            assert row[col.STATUS] in (col.DECODE_ERROR, col.MISSING_IMAGE) and row[col.ERROR]
            assert row[col.REJECT_REASON] == row[col.STATUS] and row[col.IMAGE_EMBEDDING] is None
            assert row[col.AESTHETIC_SCORE] is row[col.NSFW_SCORE] is row[col.TAG_SCORES] is None
            assert row[col.CLASSIFIER_SCORES] is None
            continue
        # Every row with an image has every signal: heads equal the plain module on its embedding.
        with torch.no_grad():
            embedding = torch.tensor([row[col.IMAGE_EMBEDDING]])
            for name, column in (("aesthetic", col.AESTHETIC_SCORE), ("nsfw", col.NSFW_SCORE)):
                assert row[column] == pytest.approx(heads[name](embedding).item(), abs=1e-5)
        assert sorted(dict(row[col.TAG_SCORES])) == sorted(tags)
        assert 0 < dict(row[col.CLASSIFIER_SCORES])["watermark"] < 1
        if key in manifest["empty_caption_keys"]:
            assert row[col.REJECT_REASON] == col.EMPTY_CAPTION and row[col.CLIP_SCORE] is None
            assert row[col.CAPTION_LANGUAGE] is None
        else:
            assert row[col.CAPTION_LANGUAGE] == "en" and 0 < row[col.CAPTION_LANGUAGE_SCORE] <= 1
            assert row[col.CLIP_SCORE] == pytest.approx(expected[key], abs=1e-5)
            assert row[col.KEEP] == (row[col.CLIP_SCORE] >= 0.0)
            assert row[col.REJECT_REASON] == (None if row[col.KEEP] else col.LOW_CLIP_SCORE)

    reasons = {}
    for row in got.values():
        if not row[col.KEEP]:
            reasons[row[col.REJECT_REASON]] = reasons.get(row[col.REJECT_REASON], 0) + 1
    assert record.rows_in == len(rows) == record.rows_kept + record.rows_rejected
    assert record.rejected_by_reason == reasons
    assert record.rows_kept == sum(r[col.KEEP] for r in got.values())

    runs = read_run_records("s3://lake/enriched/_vlpipe_runs", config.storage).to_pylist()
    assert runs[-1]["run_id"] == record.run_id and runs[-1]["rows_in"] == len(rows)
    assert sorted(s["uri"] for s in runs[-1]["input_shards"]) == [f"s3://raw/crawl/{p.name}" for p in paths]
    assert s3.secret_access_key not in json.dumps(runs[-1], default=str)
    commit = DeltaTable("s3://lake/enriched", storage_options=s3.delta_storage_options()).history(1)[0]
    assert commit["vlpipe.config_hash"] == record.config_hash and str(tiny_clip_dir) in commit["vlpipe.models"]
    assert "s3://heads/aesthetic" in commit["vlpipe.models"]


def test_rerunning_a_date_replaces_its_partition_atomically(s3, s3_input, local_shards, tiny_clip_dir):
    s3.create_bucket("rerun")
    config = s3_config(s3, tiny_clip_dir, output={"uri": "s3://rerun/t"}, executor="in_process")
    first = run_pipeline(config)
    # The same shards under another date: the newest processing of a shard wins, whatever its date.
    other_day = run_pipeline(
        s3_config(s3, tiny_clip_dir, output={"uri": "s3://rerun/t"}, run_date="2026-11-02", executor="in_process")
    )
    second = run_pipeline(config)
    table = DeltaTable("s3://rerun/t", storage_options=s3.delta_storage_options())
    assert second.table_version == other_day.table_version + 1 == first.table_version + 2
    data = table.to_pyarrow_table()
    day = data.filter(data.column(col.RUN_DATE) == np.datetime64("2026-11-01")).to_pylist()
    assert len(day) == len(local_shards[3]) == len({r[col.KEY] for r in day})  # same rows, no duplicates
    assert {r[col.RUN_ID] for r in day} == {second.run_id}
    assert data.num_rows == len(local_shards[3])  # the other date's rows of these shards were superseded
    assert other_day.rows_superseded == second.rows_superseded == len(local_shards[3])


def test_top_fraction_kept_only_and_pass_through_columns(local_shards, tiny_clip_dir, tmp_path):
    folder, _, manifest, rows = local_shards
    config = validate_config(
        {
            "input": {"uri": f"file://{folder}/*.parquet", "extra_columns": ["url"]},
            "clip": {"model": {"source": str(tiny_clip_dir)}},
            "filter": {"keep_top_fraction": 0.5},
            "output": {"uri": str(tmp_path / "out"), "kept_only": True, "rows_per_file": 10},
            "executor": "in_process",
        }
    )
    record = run_pipeline(config)
    table = DeltaTable(str(tmp_path / "out")).to_pyarrow_table()
    scorable = len(rows) - len(manifest["broken_keys"]) - len(manifest["empty_caption_keys"])
    assert record.rows_kept == table.num_rows == int(np.ceil(scorable / 2))
    assert (
        record.rows_in == len(rows) and record.rejected_by_reason[col.BELOW_TOP_FRACTION] == scorable - table.num_rows
    )
    assert all(table.column(col.KEEP).to_pylist())
    assert table.column("url").to_pylist() == [rows[k]["url"] for k in table.column(col.KEY).to_pylist()]


def test_the_readme_readers_see_the_same_table(ray_cluster, local_shards, tiny_clip_dir, tmp_path):
    import deltalake
    import duckdb
    import polars as pl

    folder, _, _, rows = local_shards
    uri = str(tmp_path / "out")
    run_pipeline(
        validate_config(
            {
                "input": {"uri": str(folder)},
                "clip": {"model": {"source": str(tiny_clip_dir)}},
                "output": {"uri": uri},
                "executor": "in_process",
            }
        )
    )
    ds = deltalake.DeltaTable(uri).to_pyarrow_dataset()  # noqa: F841 (DuckDB reads it by its name)
    by_reason = dict(duckdb.sql("SELECT coalesce(reject_reason, 'kept'), count(*) FROM ds GROUP BY ALL").fetchall())
    assert sum(by_reason.values()) == len(rows)
    assert pl.read_delta(uri).height == len(rows)
    assert ray_cluster.data.read_delta(uri).count() == len(rows)
