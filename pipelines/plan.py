"""Config to Ray Data plan: read -> prepare -> decode -> CLIP -> filter."""

from __future__ import annotations

from typing import Any

import ray.data

import pyarrow as pa
import pyarrow.compute as pc

from operators import schema as col
from operators.clip import ClipConfig, ClipScorer
from operators.decode import DecodeImages, PixelSpec
from operators.models import resolve_model_dir
from operators.resources import Resources
from operators.storage import StorageOptions
from pipelines.config import InputConfig, PipelineConfig


ACTOR_MAX_RESTARTS = 3


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
    elif resources.concurrency:
        args["compute"] = ray.data.TaskPoolStrategy(size=resources.concurrency)
    return args


def image_geometry(clip: ClipConfig, storage: StorageOptions) -> PixelSpec:
    """The CLIP model's input geometry, read from its processor config alone (no weights)."""
    from transformers import AutoImageProcessor

    model_dir = resolve_model_dir(clip.model, storage, config_only=True)
    processor = AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=clip.model.trust_remote_code)
    return PixelSpec.from_image_processor(processor)


class PrepareInput:
    """Rename the configured input columns to vlpipe's names and normalise their types."""

    def __init__(self, config: InputConfig, shard_prefix: str):
        self.config = config
        self.shard_prefix = shard_prefix

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns = self.config.columns
        key = batch.column(columns.key)
        caption = batch.column(columns.caption)
        if not pa.types.is_string(caption.type):
            caption = caption.cast(pa.string())
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


class ClipStage:
    """The CLIP scorer, dropping the pixels afterwards so they never travel further."""

    def __init__(self, config: ClipConfig, storage: StorageOptions):
        self.scorer = ClipScorer(config, storage)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.scorer(batch).drop_columns([col.PIXELS])


def read_columns(config: InputConfig) -> list[str]:
    """The only columns read from the shards (projection pushdown)."""
    c = config.columns
    return list(dict.fromkeys([c.key, c.caption, c.image, *config.extra_columns]))


def build_scored_dataset(config: PipelineConfig, paths: list[str], filesystem, shard_prefix: str):
    """The lazy dataset up to and including CLIP scores."""
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0))
    pixels = image_geometry(config.clip, config.storage)
    ds = ray.data.read_parquet(paths, filesystem=filesystem, columns=read_columns(config.input), include_paths=True)
    cpu_task = map_batches_args(config.decode.resources, actor=False, cluster_gpus=gpus)
    ds = ds.map_batches(PrepareInput(config.input, shard_prefix), **cpu_task)
    ds = ds.map_batches(DecodeImages(config.decode, pixels), **cpu_task)
    ds = ds.map_batches(
        ClipStage,
        fn_constructor_kwargs={"config": config.clip, "storage": config.storage},
        **map_batches_args(config.clip.resources, actor=True, cluster_gpus=gpus),
    )
    return ds
