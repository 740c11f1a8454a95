"""Small heads on the CLIP image embedding: the LAION aesthetic predictor v2 and NSFW detector.

A head is a directory: ``config.json`` (``arch``, ``embedding_dim``, ``clip_model``:
the CLIP model it was trained on) and ``model.safetensors`` with the original
implementation's key names. ``convert_head`` makes one from a released ``.pth``
state dict, read with ``torch.load(weights_only=True)``: never unrestricted pickle.

The heads run fused into the CLIP step, on its device: no second image pass, and
the embeddings never leave the actor (docs/guide/models.md#heads has the measurement).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from operators import schema as col
from operators.models.load import ModelLoadError, model_config, pick_device_and_dtype, resolve_model_dir
from operators.refs import ModelRef
from operators.stage import Stage
from operators.storage import StorageOptions, is_remote
from operators.tensors import embedding_rows

HeadArch = Literal["aesthetic-v2", "nsfw"]
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")

# Config key -> the architecture it takes and the column it writes.
HEAD_ARCH: dict[str, HeadArch] = {"aesthetic": "aesthetic-v2", "nsfw": "nsfw"}
HEAD_COLUMN = {"aesthetic": col.AESTHETIC_SCORE, "nsfw": col.NSFW_SCORE}


log = logging.getLogger(__name__)


class HeadRef(BaseModel):
    """Where a head directory is: a local path, an object-store URI or a hub id (with revision)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str
    revision: str | None = None

    def model_ref(self) -> ModelRef:
        # Pickle files are let through resolution only so the check below can name them and the way out;
        # a head loads model.safetensors and nothing else.
        return ModelRef(source=self.source, revision=self.revision, allow_pickle_weights=True)


class HeadsConfig(BaseModel):
    """Which heads run on the image embedding (each writes its own column)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    aesthetic: HeadRef | None = None
    nsfw: HeadRef | None = None

    def configured(self) -> dict[str, HeadRef]:
        """Config key -> head, for the heads that are set."""
        return {name: ref for name in HEAD_ARCH if (ref := getattr(self, name)) is not None}


class HeadSpec(BaseModel):
    """A head directory's ``config.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: HeadArch
    embedding_dim: int = Field(ge=1)
    clip_model: str


def check_head_dir(head_dir: Path, name: str, source: str) -> HeadSpec:
    """The head's spec, once its directory holds what a head needs; ``ModelLoadError`` naming what is wrong."""
    if head_dir.is_file():
        raise ModelLoadError(_convert_hint(name, source, head_dir.name, head_dir))
    if not head_dir.is_dir():
        raise ModelLoadError(f"heads.{name}.source: head directory not found: {source}")
    if not (head_dir / "model.safetensors").is_file():
        pickles = sorted(p.name for p in head_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise ModelLoadError(_convert_hint(name, source, pickles[0], head_dir / pickles[0]))
        raise ModelLoadError(
            f"heads.{name}.source: no model.safetensors in {source} (a head directory is "
            "config.json + model.safetensors, as `vlpipe convert-head` writes it)"
        )
    spec = read_head_spec(head_dir, name, source)
    if spec.arch != HEAD_ARCH[name]:
        raise ModelLoadError(
            f"heads.{name}.source: {source} is a {spec.arch} head, heads.{name} takes {HEAD_ARCH[name]}"
        )
    return spec


def read_head_spec(head_dir: Path, name: str, source: str) -> HeadSpec:
    """``config.json`` of a head directory, validated."""
    try:
        raw = json.loads((head_dir / "config.json").read_text())
    except FileNotFoundError:
        raise ModelLoadError(
            f"heads.{name}.source: no config.json in {source} (a head directory is "
            "config.json + model.safetensors, as `vlpipe convert-head` writes it)"
        ) from None
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"heads.{name}.source: cannot read {source}/config.json: {err}") from None
    try:
        return HeadSpec.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in err.errors())
        raise ModelLoadError(f"heads.{name}.source: {source}/config.json is not a head config: {problems}") from None


def _convert_hint(name: str, source: str, filename: str, path: Path) -> str:
    return (
        f"heads.{name}.source: {source} is a pickle file ({filename}), which vlpipe never loads; convert it once "
        f"with `vlpipe convert-head {path} OUT_DIR --arch {HEAD_ARCH[name]}` and point heads.{name}.source at OUT_DIR"
    )


def check_heads(heads: HeadsConfig, clip: ModelRef, storage: StorageOptions, readable: bool) -> tuple[str, ...]:
    """Each head against the CLIP model, before any work: a dimension mismatch is a ``ValueError``, another
    CLIP model a warning.

    Returns what ``vlpipe plan`` prints about the heads. Where the models exist only on
    the cluster (``vlpipe submit``), the actors check the same when they load.
    """
    details = []
    clip_dim = _embedding_dim(clip, storage) if readable else None
    for name, ref in heads.configured().items():
        spec = _head_spec(name, ref, storage) if readable else None
        if spec is None:
            details.append(f"{HEAD_ARCH[name]} from {ref.source} (checked where it runs)")
            continue
        if clip_dim is not None and spec.embedding_dim != clip_dim:
            raise ValueError(
                f"heads.{name}: {ref.source} takes {spec.embedding_dim}-value embeddings (trained on "
                f"{spec.clip_model}), but clip.model {clip.source} makes {clip_dim}-value embeddings"
            )
        line = f"{spec.arch} from {ref.source} ({spec.embedding_dim}-d, trained on {spec.clip_model})"
        if not _same_model(spec.clip_model, clip.source):
            warning = (
                f"heads.{name} was trained on CLIP model {spec.clip_model}, but clip.model is {clip.source}: "
                "its scores are only meaningful on the embeddings it was trained on"
            )
            log.warning(warning)
            line += f"; WARNING: {warning}"
        details.append(line)
    return tuple(details)


def _head_spec(name: str, ref: HeadRef, storage: StorageOptions) -> HeadSpec:
    """A head's config.json; a local head's weights are checked too (remote ones where they are fetched)."""
    try:
        if not is_remote(ref.source):
            path = Path(ref.source.removeprefix("file://")).expanduser()
            if path.exists() or ref.source.startswith(("/", ".", "~", "file://")):
                return check_head_dir(path, name, ref.source)
        return read_head_spec(resolve_model_dir(ref.model_ref(), storage, config_only=True), name, ref.source)
    except ModelLoadError as err:
        raise ValueError(str(err)) from None


def _embedding_dim(ref: ModelRef, storage: StorageOptions) -> int | None:
    """Width of a CLIP-family model's image embedding, from its config.json alone."""
    try:
        raw = model_config(ref, storage)
    except (OSError, ValueError, ModelLoadError):
        return None  # the CLIP stage reports its own model problems
    dim = raw.get("projection_dim") or raw.get("vision_config", {}).get("hidden_size")
    return int(dim) if dim else None


def _same_model(a: str, b: str) -> bool:
    """Model names match by their last path part: ``openai/clip-vit-large-patch14`` is
    ``/models/clip-vit-large-patch14``."""

    def tail(name: str) -> str:
        return name.rstrip("/").rsplit("/", 1)[-1].lower()

    return tail(a) == tail(b)


def heads_stage(config: HeadsConfig, storage: StorageOptions, details: tuple[str, ...]) -> Stage:
    """The heads' contract: fused into the CLIP step, reading the image embedding."""
    names = config.configured()
    return Stage(
        name="heads",
        kind="fused",
        reads=(col.IMAGE_EMBEDDING,),
        adds=tuple(HEAD_COLUMN[n] for n in names),
        build=partial(HeadScorer, config, storage),
        details=details,
    )


class HeadScorer:
    """Append one float32 score column per configured head (``aesthetic_score``, ``nsfw_score``).

    Each head runs batched in fp32 on the worker's device (a GPU where the CLIP actor has
    one). Rows without an image embedding, or with NaN/inf in it, get a null score.
    """

    def __init__(self, config: HeadsConfig, storage: StorageOptions):
        import torch

        self.device, _ = pick_device_and_dtype("float32")
        self.heads = {}
        for name, ref in config.configured().items():
            head_dir = resolve_model_dir(ref.model_ref(), storage)
            spec = check_head_dir(head_dir, name, ref.source)
            self.heads[name] = (spec, load_head(head_dir, spec).to(self.device))
        self._torch = torch

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        for name, (spec, module) in self.heads.items():
            rows, usable = embedding_rows(batch.column(col.IMAGE_EMBEDDING), spec.embedding_dim, f"heads.{name}")
            scores = np.full(n, np.nan, np.float32)
            if usable.any():
                with self._torch.inference_mode():
                    out = module(self._torch.from_numpy(rows[usable]).to(self.device))
                scores[usable] = out.float().cpu().numpy()
            finite = np.isfinite(scores)
            batch = batch.append_column(HEAD_COLUMN[name], pa.array(scores, pa.float32(), mask=~finite))
        return batch


def load_head(head_dir: Path, spec: HeadSpec):
    """The head's module with its safetensors weights, in eval mode; every key must match."""
    from safetensors.torch import load_file

    from operators.models.head_models import build

    module = build(spec.arch, spec.embedding_dim)
    state = load_file(head_dir / "model.safetensors")
    _check_keys(state, module.state_dict(), str(head_dir / "model.safetensors"), spec.arch)
    module.load_state_dict(state, strict=True)
    return module


class HeadConversionError(ValueError):
    """A released head file that is not what ``--arch`` says it is."""


def convert_head(
    src: Path, out_dir: Path, arch: HeadArch, clip_model: str = "openai/clip-vit-large-patch14"
) -> HeadSpec:
    """Write a head directory from a released PyTorch state dict (``torch.load(weights_only=True)``)."""
    import pickle

    import torch
    from safetensors.torch import save_file

    from operators.models.head_models import INPUT_WEIGHT, build

    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HeadConversionError(
            f"{src}: not a plain PyTorch state dict (torch.load with weights_only=True refused it: {first})"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HeadConversionError(f"{src}: expected a state dict (names -> tensors), got {type(state).__name__}")
    first_weight = state.get(INPUT_WEIGHT[arch])
    embedding_dim = int(first_weight.shape[1]) if first_weight is not None and first_weight.ndim == 2 else 768
    module = build(arch, embedding_dim)
    _check_keys(state, module.state_dict(), str(src), arch)
    module.load_state_dict(state, strict=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise HeadConversionError(f"{out_dir} is not empty; convert into a new directory")
    save_file(
        {k: v.detach().contiguous() for k, v in module.state_dict().items()},
        out_dir / "model.safetensors",
        metadata={"format": "pt", "vlpipe_head_arch": arch},
    )
    spec = HeadSpec(arch=arch, embedding_dim=embedding_dim, clip_model=clip_model)
    # Written last: a directory with a config.json is a finished head.
    (out_dir / "config.json").write_text(json.dumps(spec.model_dump(), indent=2) + "\n")
    return spec


def _check_keys(state: Mapping, expected: Mapping, where: str, arch: str) -> None:
    unknown = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unknown or missing:
        parts = ([f"unknown key(s) {', '.join(unknown)}"] if unknown else []) + (
            [f"missing key(s) {', '.join(missing)}"] if missing else []
        )
        raise HeadConversionError(
            f"{where} is not an {arch} head: {'; '.join(parts)} (an {arch} head has {', '.join(expected)})"
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise HeadConversionError(f"{where} is not an {arch} head: wrong shape(s) {', '.join(wrong)}")
