"""End to end with captioning, caption selection, ITM and a visual question: real Ray, real S3, tiny models."""

from __future__ import annotations

import io

import numpy as np
import pytest
from deltalake import DeltaTable
from PIL import Image

from operators import schema as col
from pipelines.run import run_pipeline
from pipelines.table.records import read_run_records
from tests.operators.models.test_ask import reference_answers, reference_yes_prob
from tests.operators.models.test_caption import reference as reference_captions
from tests.operators.models.test_itm import reference as reference_itm
from tests.pipelines.conftest import s3_config

pytestmark = pytest.mark.slow

QUESTION = "Does this image show {caption_best}?"
MIN_YES = 0.5


def test_captions_selection_itm_and_answers_are_committed_for_every_ok_row(
    s3, s3_input, local_shards, tiny_clip_dir, tiny_blip_captioner_dir, tiny_blip_itm_dir, tiny_llava_dir
):
    _, _, manifest, rows = local_shards
    s3.create_bucket("captioned")
    config = s3_config(
        s3,
        tiny_clip_dir,
        # Three model actors and decoding share the 2-core test machine.
        caption={
            "model": {"source": str(tiny_blip_captioner_dir)},
            "max_new_tokens": 12,
            "resources": {"num_cpus": 0.3},
        },
        clip={"resources": {"num_cpus": 0.3}},
        decode={"jpeg_draft": False, "resources": {"num_cpus": 0.5}},
        itm={"model": {"source": str(tiny_blip_itm_dir)}, "text": "caption_best", "resources": {"num_cpus": 0.3}},
        # Asks about the caption the CLIP stage selected; its pixels are CLIP's (the same geometry).
        ask={
            "model": {"source": str(tiny_llava_dir)},
            "template": QUESTION,
            "yes_no": True,
            "generate": True,
            "max_new_tokens": 4,
            "resources": {"num_cpus": 0.1},
        },
        filter={"caption": "best", "min_clip_score": 0.0, "min_itm_score": 0.5, "min_answer_yes_prob": MIN_YES},
        output={"uri": "s3://captioned/t"},
        executor="in_process",  # the same operators as on Ray; test_run.py has the model actors on Ray
    )
    record = run_pipeline(config)
    table = DeltaTable("s3://captioned/t", storage_options=s3.delta_storage_options()).to_pyarrow_table()
    got = {r[col.KEY]: r for r in table.to_pylist()}
    assert sorted(got) == sorted(rows)

    broken = set(manifest["broken_keys"])
    ok_keys = sorted(k for k in rows if k not in broken)
    images = [Image.open(io.BytesIO(rows[k]["jpg"])).convert("RGB") for k in ok_keys]
    captions = dict(zip(ok_keys, reference_captions(tiny_blip_captioner_dir, images, max_new_tokens=12)))
    best = [got[k][col.CAPTION_BEST] for k in ok_keys]
    itm = dict(zip(ok_keys, reference_itm(tiny_blip_itm_dir, images, best)))
    questions = [QUESTION.format(caption_best=b) for b in best]
    answers = dict(zip(ok_keys, reference_answers(tiny_llava_dir, images, questions, max_new_tokens=4)))
    yes = dict(zip(ok_keys, reference_yes_prob(tiny_llava_dir, images, questions)))
    for key, row in got.items():
        if key in broken:
            for name in (
                col.CAPTION_GENERATED,
                col.CLIP_SCORE_GENERATED,
                col.CAPTION_BEST,
                col.ITM_SCORE,
                col.ANSWER,
                col.ANSWER_YES_PROB,
            ):
                assert row[name] is None
            assert row[col.REJECT_REASON] == row[col.STATUS] != col.OK
            continue
        assert row[col.CAPTION_GENERATED] == captions[key]  # the same text plain generate returns
        expected_source = (
            col.SOURCE_GENERATED
            if row[col.CLIP_SCORE] is None or row[col.CLIP_SCORE_GENERATED] > row[col.CLIP_SCORE]
            else col.SOURCE_ORIGINAL
        )
        assert row[col.CAPTION_SOURCE] == expected_source
        assert row[col.CLIP_SCORE_BEST] == max(
            s for s in (row[col.CLIP_SCORE], row[col.CLIP_SCORE_GENERATED]) if s is not None
        )
        assert row[col.ITM_SCORE] == pytest.approx(itm[key], abs=1e-5)
        assert row[col.ANSWER] == answers[key]
        assert row[col.ANSWER_YES_PROB] == pytest.approx(yes[key], abs=1e-5)
        if row[col.CLIP_SCORE_BEST] < 0.0:
            assert row[col.REJECT_REASON] == col.LOW_CLIP_SCORE
        elif row[col.ITM_SCORE] < 0.5:
            assert row[col.REJECT_REASON] == col.LOW_ITM_SCORE
        elif row[col.ANSWER_YES_PROB] < MIN_YES:
            assert row[col.REJECT_REASON] == col.LOW_ANSWER_YES_PROB
        else:
            assert row[col.KEEP]
    # Empty original captions were replaced by generated ones instead of being rejected.
    for key in manifest["empty_caption_keys"]:
        assert got[key][col.CAPTION_SOURCE] == col.SOURCE_GENERATED

    assert record.rows_in == len(rows) == record.rows_kept + record.rows_rejected
    assert sum(record.rejected_by_reason.get(s, 0) for s in col.IMAGE_STATUSES[1:]) == len(broken)
    models = DeltaTable("s3://captioned/t", storage_options=s3.delta_storage_options()).history(1)[0]["vlpipe.models"]
    assert all(str(path) in models for path in (tiny_blip_captioner_dir, tiny_blip_itm_dir, tiny_llava_dir))
    assert np.isfinite([r[col.CLIP_SCORE_GENERATED] for k, r in got.items() if k not in broken]).all()


def test_model_actors_that_leave_no_cpu_for_decoding_fail_before_any_work(
    ray_cluster, local_shards, tiny_clip_dir, tiny_blip_captioner_dir, tmp_path
):
    from pipelines.config import ConfigError, validate_config

    config = validate_config(
        {
            "input": {"uri": str(local_shards[0])},
            "clip": {"model": {"source": str(tiny_clip_dir)}},
            "caption": {"model": {"source": str(tiny_blip_captioner_dir)}},
            "output": {"uri": str(tmp_path / "t")},
            "executor": "ray",
        }
    )
    with pytest.raises(ConfigError, match="the model actors hold 2 CPUs and decoding needs 0.5 more"):
        run_pipeline(config)
    assert not (tmp_path / "t" / "_delta_log").exists()  # nothing committed, nothing read
    record = read_run_records(str(tmp_path / "t" / "_vlpipe_runs")).to_pylist()[-1]
    assert record["status"] == "failed" and "caption/clip.resources.num_cpus" in record["error"]
