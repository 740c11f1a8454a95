"""The run configuration: a YAML file validated by typed models.

Unknown or misspelt keys fail at load time with the key's dotted path, before
any work starts. ``--set a.b=c`` overrides are applied to the YAML before
validation, so they are checked the same way.
"""

from __future__ import annotations

import datetime as dt
import difflib
import hashlib
import importlib.util
import json
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from operators.decisions.duplicates import DedupConfig
from operators.decisions.filter import FilterConfig
from operators.image.decode import DecodeConfig
from operators.input.fetch import FetchConfig
from operators.input.prepare import ColumnMapping, check_extra_names
from operators.input.webdataset import WDS_CAPTION, WDS_IMAGE, WDS_KEY, WebDatasetConfig
from operators.models.ask import AskConfig
from operators.models.caption import CaptionConfig
from operators.models.classify import ClassifierConfig
from operators.models.clip import ClipConfig, TagConfig, check_tag_names
from operators.models.heads import HeadsConfig
from operators.models.image_nsfw import ImageNsfwConfig
from operators.models.itm import ItmConfig
from operators.models.language import LanguageConfig, check_language_codes
from operators.models.load import ModelLoadError, check_weights
from operators.models.ocr import OcrConfig
from operators.storage import StorageOptions, is_remote, local_path
from pipelines.errors import ConfigError

# The config sections that each name a model (``<section>.model``).
MODEL_SECTIONS = ("clip", "caption", "itm", "classifier", "ask")
# A served model's settings that change how fast its answers come, not what they are: not in the config hash.
ENDPOINT_TUNING = (
    "api_key_env",
    "concurrency",
    "requests_per_second",
    "tokens_per_minute",
    "timeout_s",
    "max_retries",
    "max_backoff_s",
    "unreachable_s",
    "prices",
    "workers",
    "batch_size",
)
# Below this many rows a run goes faster without Ray than Ray takes to start (docs/guide/running.md#in-process).
IN_PROCESS_MAX_ROWS = 10_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputColumns(_Strict):
    """Input column names; defaults follow img2dataset."""

    key: str = "key"
    caption: str = "caption"
    image: str = "jpg"
    # A column of image references (s3://, gs://, file://, paths, http(s)://) fetched while decoding,
    # for inputs that keep the images beside the table; ``image`` is then not read.
    image_uri: str | None = None
    # img2dataset's download outcome: a row without image bytes whose status is not "success" is
    # counted as download_failed (with this error column's text), not as a missing image. Used when
    # the shards have the column.
    download_status: str | None = "status"
    download_error: str = "error_message"


class InputConfig(_Strict):
    """Where the shards are (a prefix, a directory or a glob) and how their rows map onto vlpipe's columns."""

    uri: str
    format: Literal["parquet", "webdataset"] | None = None  # None: from the listed files' extensions
    columns: InputColumns = InputColumns()
    webdataset: WebDatasetConfig = WebDatasetConfig()
    fetch: FetchConfig = FetchConfig()
    # Input columns (WebDataset: fields of each sample's json member) copied to the output; a
    # mapping renames them on the way in ({status: download_status}).
    extra_columns: tuple[str, ...] | dict[str, str] = ()

    @field_validator("extra_columns")
    @classmethod
    def _extras_do_not_collide(cls, extra: tuple[str, ...] | dict[str, str]) -> tuple[str, ...] | dict[str, str]:
        pairs = list(extra.items()) if isinstance(extra, dict) else [(name, name) for name in extra]
        check_extra_names(pairs)
        return extra

    @property
    def extra_pairs(self) -> tuple[tuple[str, str], ...]:
        """(input column, output column) of each pass-through column."""
        extra = self.extra_columns
        return tuple(extra.items()) if isinstance(extra, dict) else tuple((name, name) for name in extra)

    def mapping_for(self, format_: str) -> ColumnMapping:
        """The columns read from the shards (before the shard schema says which optional ones exist)."""
        if format_ == "webdataset":
            return ColumnMapping(WDS_KEY, WDS_CAPTION, WDS_IMAGE, self.extra_pairs)
        columns = self.columns
        return ColumnMapping(
            columns.key,
            columns.caption,
            None if columns.image_uri else columns.image,
            self.extra_pairs,
            image_uri=columns.image_uri,
        )

    @property
    def mapping(self) -> ColumnMapping:
        return self.mapping_for(self.format or "parquet")


RUN_RECORDS_DIR = "_vlpipe_runs"


def default_run_records_uri(output_uri: str) -> str:
    """The run-record table; hidden inside the output so Delta readers and VACUUM skip it."""
    return output_uri.rstrip("/") + "/" + RUN_RECORDS_DIR


class OutputConfig(_Strict):
    """Where and how the enriched table is committed."""

    uri: str
    mode: Literal["overwrite_partition", "append"] = "overwrite_partition"
    kept_only: bool = False
    include_image_bytes: bool = False
    rows_per_file: int = Field(50_000, ge=1)
    runs_uri: str | None = None

    @property
    def run_records_uri(self) -> str:
        return self.runs_uri or default_run_records_uri(self.uri)


class ReportConfig(_Strict):
    """The HTML run report written beside the run records (``pipelines.report.report``)."""

    enabled: bool = True
    samples: int = Field(12, ge=0, le=500)  # gallery rows shown per side (kept, rejected)


class PipelineConfig(_Strict):
    """Everything one run needs."""

    input: InputConfig
    clip: ClipConfig
    output: OutputConfig
    caption: CaptionConfig | None = None
    itm: ItmConfig | None = None
    classifier: ClassifierConfig | None = None
    ask: AskConfig | None = None
    storage: StorageOptions = StorageOptions()
    decode: DecodeConfig = DecodeConfig()
    heads: HeadsConfig = HeadsConfig()
    image_nsfw: ImageNsfwConfig | None = None  # open_nsfw on the image (the nsfw extra)
    ocr: OcrConfig | None = None  # text in the image (the ocr extra)
    tags: Mapping[str, TagConfig] = {}
    language: LanguageConfig | None = None
    filter: FilterConfig = FilterConfig()
    dedup: DedupConfig = DedupConfig()
    run_date: dt.date | None = None
    ray_address: str | None = None
    # 0: a plan that needs more than the cluster has fails at once. On an autoscaling cluster,
    # the seconds to wait for the nodes that would provide it.
    ray_resource_timeout_s: float = Field(0.0, ge=0.0)
    # Only for a Ray that vlpipe starts itself: its dashboard costs start time and a few
    # hundred MB of processes that a batch run rarely looks at.
    ray_dashboard: bool = False
    # auto: a run of at most in_process_max_rows rows (from the shards' footers) runs in this
    # process, without Ray, unless a Ray cluster is given or already connected (pipelines.execute.local).
    executor: Literal["auto", "ray", "in_process"] = "auto"
    in_process_max_rows: int = Field(IN_PROCESS_MAX_ROWS, ge=0)
    # Keep the rows the models are done with in staging files as the run goes, so that a run
    # that stops before its commit resumes there (pipelines.execute.progress). Off: a run that
    # stops starts again from its first row, and a run without dedup or a top fraction writes
    # its output in one pass.
    resume: bool = True
    # Rows per staged file: a stopped run does again at most this many rows per staging writer,
    # plus the model batches in flight. Each file is one write (one PUT on S3).
    staging_rows: int = Field(1024, ge=1, le=1 << 20)
    report: ReportConfig = ReportConfig()

    @field_validator("tags")
    @classmethod
    def _tag_names(cls, tags: Mapping[str, TagConfig]) -> Mapping[str, TagConfig]:
        return check_tag_names(tags)

    @model_validator(mode="after")
    def _filters_name_what_exists(self) -> PipelineConfig:
        unknown = [t for t in self.filter.tags if t not in self.tags]
        if unknown:
            raise ValueError(
                f"filter.tags: no tag {', '.join(map(repr, unknown))} in tags: "
                f"({', '.join(self.tags) or 'none configured'})"
            )
        scores = self.classifier.scores if self.classifier else {}
        unknown = [name for name in self.filter.classifier_scores if name not in scores]
        if unknown:
            raise ValueError(
                f"filter.classifier_scores: no score {', '.join(map(repr, unknown))} in classifier.scores: "
                f"({', '.join(scores) or 'no classifier configured'})"
            )
        if self.filter.caption_languages:
            detector = self.language.detector if self.language else "lingua"
            check_language_codes(self.filter.caption_languages, detector)  # a ValueError names the codes
        candidates = self.language.candidates if self.language else None
        if candidates and self.filter.caption_languages:
            outside = [c for c in self.filter.caption_languages if c not in candidates]
            if outside:
                raise ValueError(
                    f"filter.caption_languages {', '.join(outside)} not in language.candidates "
                    f"({', '.join(candidates)}): no caption could ever match"
                )
        return self

    @property
    def language_on(self) -> bool:
        """The language stage runs when configured, or when the filter needs it (with its defaults)."""
        return self.language is not None or bool(self.filter.caption_languages)

    def models(self) -> dict[str, dict[str, str | None]]:
        """Each stage's model id and revision (a served model's endpoint), as recorded with every commit."""
        models = {}
        for name in MODEL_SECTIONS:
            stage = getattr(self, name)
            served = getattr(stage, "endpoint", None)
            if served is not None:  # a served model: its name and where it was served from
                models[name] = {"source": served.model, "revision": None, "endpoint": served.base_url}
            elif stage is not None:
                models[name] = {"source": stage.model.source, "revision": stage.model.revision}
        for name, head in self.heads.configured().items():
            models[f"heads.{name}"] = {"source": head.source, "revision": head.revision}
        return models

    def hash(self) -> str:
        """Identifies what the run computes: storage credentials and the date are not part of it."""
        exclude: dict[str, Any] = dict.fromkeys(
            (
                "storage",
                "run_date",
                "ray_address",
                "ray_resource_timeout_s",
                "ray_dashboard",
                "executor",
                "in_process_max_rows",
                "resume",
                "staging_rows",
                "report",
            ),
            True,
        )
        for name in ("caption", "ask"):  # how hard a served model is driven changes no answer
            if getattr(getattr(self, name), "endpoint", None) is not None:
                exclude[name] = {"endpoint": dict.fromkeys(ENDPOINT_TUNING, True)}
        payload = self.model_dump(mode="json", exclude=exclude)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def with_absolute_paths(self) -> PipelineConfig:
        """Local paths resolved against the driver's working directory.

        Ray workers run in their own directories (on other nodes, too), so a
        relative path in the config would silently point somewhere else there.
        """
        update = {
            "input": self.input.model_copy(update={"uri": _absolute(self.input.uri)}),
            "output": self.output.model_copy(
                update={
                    "uri": _absolute(self.output.uri),
                    "runs_uri": self.output.runs_uri and _absolute(self.output.runs_uri),
                }
            ),
        }
        for name in MODEL_SECTIONS:
            stage = getattr(self, name)
            source = stage and stage.model and stage.model.source
            if source and not is_remote(source) and Path(source).expanduser().is_dir():
                model = stage.model.model_copy(update={"source": str(Path(source).expanduser().resolve())})
                update[name] = stage.model_copy(update={"model": model})
        heads = {}
        for name, head in self.heads.configured().items():
            if not is_remote(head.source) and Path(head.source).expanduser().exists():
                heads[name] = head.model_copy(update={"source": str(Path(head.source).expanduser().resolve())})
        if heads:
            update["heads"] = self.heads.model_copy(update=heads)
        return self.model_copy(update=update)

    def public_dump(self) -> dict[str, Any]:
        """The config as plain data with secrets masked, safe for logs and run records."""
        return json.loads(self.model_dump_json())


def check_models(config: PipelineConfig) -> None:
    """Refuse, on the driver, local model directories the actors would refuse after Ray started.

    Missing directories, pickle-only weights and model code the config does not
    trust would otherwise surface only once the input is being read. Hub ids and
    object-store models are checked where they are fetched. Not part of
    ``validate_config``: ``vlpipe submit`` validates configs whose paths exist only on the cluster.
    """
    for name in MODEL_SECTIONS:
        stage = getattr(config, name)
        ref = stage.model if stage else None  # None too for a served model (caption.endpoint, ask.endpoint)
        if ref is None or is_remote(ref.source):
            continue
        path = Path(ref.source.removeprefix("file://")).expanduser()
        if not path.is_dir():
            if ref.source.startswith(("/", ".", "~", "file://")):
                raise ConfigError(f"{name}.model.source: model directory not found: {ref.source}")
            continue  # a hub id
        try:
            check_weights(path, ref)
        except ModelLoadError as err:
            raise ConfigError(f"{name}.model: {err}") from None
        code = _custom_code(path)
        if code and not ref.trust_remote_code:
            raise ConfigError(
                f"{name}.model: {ref.source} can only be loaded by running Python code shipped with it ({code}); "
                f"vlpipe runs model code only with {name}.model.trust_remote_code: true"
            )


def _custom_code(model_dir: Path) -> str | None:
    """Where a model directory asks for its own code, unless transformers has the architecture built in."""
    configs = {}
    for name in ("config.json", "preprocessor_config.json", "processor_config.json", "tokenizer_config.json"):
        try:
            configs[name] = json.loads((model_dir / name).read_text())
        except (OSError, ValueError):
            continue
    if _built_in(configs.get("config.json", {}).get("model_type")):
        return None  # transformers then uses its own classes and never imports the shipped code
    return next((f"auto_map in {name}" for name, data in configs.items() if data.get("auto_map")), None)


def _built_in(model_type: str | None) -> bool:
    """Whether transformers ships this architecture: its package has the model's folder (importing
    transformers to ask CONFIG_MAPPING cost the driver 3.6 s); a name not found there is asked properly."""
    if not model_type:
        return False
    spec = importlib.util.find_spec("transformers")
    roots = list(spec.submodule_search_locations or []) if spec else []
    if any((Path(root) / "models" / model_type.replace("-", "_") / "__init__.py").is_file() for root in roots):
        return True
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def _absolute(uri: str) -> str:
    if is_remote(uri):
        return uri
    path = local_path(uri)
    return path + "/" if uri.endswith("/") and not path.endswith("/") else path


def load_config(path: str | Path, overrides: list[str] = ()) -> PipelineConfig:
    """Read, override and validate a YAML config."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw, source=str(path))


def validate_config(raw: dict[str, Any], source: str = "config") -> PipelineConfig:
    """Validate plain data, turning pydantic's errors into one readable message."""
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"invalid {source}:\n" + "\n".join(_describe(e) for e in err.errors())) from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply ``a.b.c=value``; the value is parsed as a YAML scalar (numbers, bools, null)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    dotted, value = item.split("=", 1)
    keys = dotted.strip().split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
    node[keys[-1]] = yaml.safe_load(value) if value.strip() else None


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"  - unknown key '{where}'{_suggestion(error['loc'])}"
    if error["type"] == "missing":
        return f"  - missing required key '{where}'"
    # Never echo the rejected value: it might be a credential.
    message = error["msg"].removeprefix("Value error, ")
    return f"  - {where}: {message}" if where else f"  - {message}"


def _suggestion(loc: tuple) -> str:
    model: type[BaseModel] = PipelineConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        # Optional sections (``X | None``) suggest from X's fields.
        annotation = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
