"""Config to Ray Data plan: read -> prepare -> decode -> CLIP -> filter."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import Any

import ray.data

import pyarrow as pa
import pyarrow.compute as pc

from operators import schema as col
from operators.caption import Captioner, caption_geometry
from operators.clip import ClipScorer
from operators.decode import DecodeImages, PixelSpec, decode_captions
from operators.itm import ItmScorer
from operators.models import ModelLoadError, ModelRef, resolve_model_dir
from operators.resources import Resources
from operators.storage import StorageOptions
from pipelines.config import ConfigError, InputConfig, PipelineConfig


ACTOR_MAX_RESTARTS = 3
# A worker that dies (OOM, preemption, a decoder crash) costs a retry, not the run; a batch that
# kills every worker it lands on still fails the run after this many tries instead of looping.
TASK_MAX_RETRIES = 3


def fault_point(name: str) -> None:
    """Test-only fault injection: die here once if a test armed ``$VLPIPE_FAULTS/<name>``.

    Renaming the marker is atomic, so exactly one process fires per arming, and the
    retried task or restarted actor runs normally.
    """
    folder = os.environ.get("VLPIPE_FAULTS")
    if not folder:
        return
    armed = os.path.join(folder, name)
    try:
        os.rename(armed, f"{armed}.fired")
    except OSError:
        return
    os._exit(1)


def map_batches_args(resources: Resources, *, actor: bool, cluster_gpus: float) -> dict[str, Any]:
    """Turn an operator's declared resources into ``map_batches`` arguments."""
    num_gpus = resources.num_gpus
    if num_gpus is None:
        num_gpus = 1.0 if actor and cluster_gpus >= 1 else 0.0
    args: dict[str, Any] = {
        "batch_size": resources.batch_size,
        "batch_format": "pyarrow",
        "zero_copy_batch": True,
        "num_cpus": resources.num_cpus,
    }
    if num_gpus:
        args["num_gpus"] = num_gpus
    if actor:
        # One actor per GPU by default; on CPU one actor, leaving cores for decoding.
        size = resources.concurrency or (max(1, int(cluster_gpus // num_gpus)) if num_gpus else 1)
        args["compute"] = ray.data.ActorPoolStrategy(size=size)
        # Bounded restarts: a model that cannot load fails the run instead of looping. The
        # distinct remote args also keep Ray from fusing CPU decoding into the model actor,
        # so decode tasks and inference overlap on different cores.
        args["max_restarts"] = ACTOR_MAX_RESTARTS
        args["max_task_retries"] = TASK_MAX_RETRIES
    else:
        args["max_retries"] = TASK_MAX_RETRIES
        if resources.concurrency:
            args["compute"] = ray.data.TaskPoolStrategy(size=resources.concurrency)
    return args


def image_geometry(ref: ModelRef, storage: StorageOptions) -> PixelSpec:
    """A model's fixed input geometry, read from its processor config alone (no weights)."""
    return PixelSpec.from_image_processor(_image_processor(ref, storage))


class PrepareInput:
    """Rename the configured input columns to vlpipe's names and normalise their types."""

    def __init__(self, config: InputConfig, shard_prefix: str):
        self.config = config
        self.shard_prefix = shard_prefix

    def __call__(self, batch: pa.Table) -> pa.Table:
        fault_point("decode")  # Ray fuses this step and decoding into one CPU task
        columns = self.config.columns
        key = batch.column(columns.key)
        caption = decode_captions(batch.column(columns.caption))
        paths = pc.binary_join_element_wise(self.shard_prefix, batch.column("path"), "")
        out = {
            col.KEY: key if pa.types.is_string(key.type) else key.cast(pa.string()),
            col.CAPTION: caption,
            col.SOURCE_SHARD: paths,
        }
        for name in self.config.extra_columns:
            out[name] = batch.column(name)
        out[col.IMAGE] = batch.column(columns.image)
        return pa.table(out)


def _image_processor(ref: ModelRef, storage: StorageOptions):
    from transformers import AutoImageProcessor

    model_dir = resolve_model_dir(ref, storage, config_only=True)
    return AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=ref.trust_remote_code)


class ModelStage:
    """A model operator run in an actor, dropping the pixel columns no later stage reads."""

    def __init__(self, build: partial, drop: tuple[str, ...]):
        try:
            self.operator = build()
        except Exception as err:
            # Ray fails the run on the first actor that dies in its constructor (no restart loop);
            # this puts the model's own error in the last line of the message the user sees.
            raise ModelLoadError(f"{build.func.__name__} could not load its model: {type(err).__name__}: {err}") from err
        self.drop = drop

    def __call__(self, batch: pa.Table) -> pa.Table:
        fault_point(type(self.operator).__name__)
        return self.operator(batch).drop_columns(list(self.drop))


# Named subclasses only so Ray's progress bars and stats say which model is which.
class CaptionStage(ModelStage):
    pass


class ClipStage(ModelStage):
    pass


class ItmStage(ModelStage):
    pass


def model_stages(config: PipelineConfig) -> tuple[dict[str, PixelSpec], list[tuple[type[ModelStage], dict, Resources]]]:
    """The extra pixel columns decode must emit, and the model stages in order.

    Models that share an input geometry share one pixel column, so an image is
    resized once per distinct geometry; every pixel column is dropped right after
    its last reader so it never travels further than needed.
    """
    storage = config.storage
    columns = {image_geometry(config.clip.model, storage): col.PIXELS}
    stages: list[tuple[type[ModelStage], Callable, str, Resources]] = []
    if config.caption:
        spec = caption_geometry(_image_processor(config.caption.model, storage), config.caption.image_size)
        column = columns.setdefault(spec, col.CAPTION_PIXELS)
        stages.append((CaptionStage, partial(Captioner, config.caption, storage, column), column, config.caption.resources))
    stages.append((ClipStage, partial(ClipScorer, config.clip, storage), col.PIXELS, config.clip.resources))
    if config.itm:
        spec = image_geometry(config.itm.model, storage)
        column = columns.setdefault(spec, col.ITM_PIXELS)
        stages.append((ItmStage, partial(ItmScorer, config.itm, storage, column), column, config.itm.resources))
    last_reader = {column: stage for stage, _, column, _ in stages}
    plan = []
    for stage, build, _, resources in stages:
        drop = tuple(c for c, last in last_reader.items() if last is stage)
        plan.append((stage, {"build": build, "drop": drop}, resources))
    extra = {column: spec for spec, column in columns.items() if column != col.PIXELS}
    return extra, plan


def read_columns(config: InputConfig) -> list[str]:
    """The only columns read from the shards (projection pushdown)."""
    c = config.columns
    return list(dict.fromkeys([c.key, c.caption, c.image, *config.extra_columns]))


def build_scored_dataset(config: PipelineConfig, paths: list[str], filesystem, shard_prefix: str):
    """The lazy dataset up to and including CLIP scores."""
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0))
    pixels = image_geometry(config.clip.model, config.storage)
    extra_pixels, stages = model_stages(config)
    actor_args = [map_batches_args(resources, actor=True, cluster_gpus=gpus) for _, _, resources in stages]
    check_actors_fit(actor_args, config, float(ray.cluster_resources().get("CPU", 0)))
    _size_footer_reader_pool(len(paths))
    # Read tasks get the same retry bound: a shard that crashes its reader fails the run, not loops.
    ds = ray.data.read_parquet(
        paths, filesystem=filesystem, columns=read_columns(config.input), include_paths=True,
        ray_remote_args={"max_retries": TASK_MAX_RETRIES},
    )
    cpu_task = map_batches_args(config.decode.resources, actor=False, cluster_gpus=gpus)
    ds = ds.map_batches(PrepareInput(config.input, shard_prefix), **cpu_task)
    ds = ds.map_batches(DecodeImages(config.decode, pixels, extra_pixels=extra_pixels), **cpu_task)
    for (stage, kwargs, _), args in zip(stages, actor_args):
        ds = ds.map_batches(stage, fn_constructor_kwargs=kwargs, **args)
    return ds


_FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
_FOOTERS_PER_CALL = 10  # Ray Data's default RAY_DATA_PARQUET_FOOTER_BATCH_SIZE
_user_footer_actors = os.environ.get(_FOOTER_ACTORS_ENV)


def _size_footer_reader_pool(num_files: int) -> None:
    """No more footer-reading actors than batches of footers to read.

    Ray Data starts 32 actor processes for every Parquet listing and hands each
    at most one batch of 10 footers: a 3-shard nightly paid ~1-4 s of process
    start-up on a small node for one batch. An explicit setting is left alone.
    """
    if _user_footer_actors is None:
        os.environ[_FOOTER_ACTORS_ENV] = str(min(32, max(1, -(-num_files // _FOOTERS_PER_CALL))))


# Writing Parquet is mostly waiting on storage; a full core per writer task would idle.
WRITER_NUM_CPUS = 0.25
READ_NUM_CPUS = 1.0


def check_actors_fit(actor_args: list[dict[str, Any]], config: PipelineConfig, cluster_cpus: float) -> None:
    """Refuse a plan whose model actors leave no CPU for the tasks: Ray would wait forever."""
    held = sum(args["num_cpus"] * args["compute"].min_size for args in actor_args)
    # Ray Data lists and reads files with whole-CPU tasks, whatever the stages ask for.
    task = max(READ_NUM_CPUS, config.decode.resources.num_cpus, config.filter.resources.num_cpus, WRITER_NUM_CPUS)
    if held + task > cluster_cpus:
        raise ConfigError(
            f"the model actors hold {held:g} CPUs and reading/decoding needs {task:g} more, but the cluster "
            f"has {cluster_cpus:g}: lower caption/clip/itm.resources.num_cpus or concurrency (fractions are fine)"
        )
