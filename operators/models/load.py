"""The one place models are found, fetched and checked before loading.

A model is a Hugging Face hub id (with optional revision), a local directory, or
an object-store URI (``s3://bucket/models/clip``) fetched once per node into a
local cache. Only safetensors weights load unless the config opts out, and
``trust_remote_code`` is off unless the config turns it on.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Literal

import pyarrow.fs as pafs

from operators.image.decode import PixelSpec
from operators.refs import ModelRef
from operators.storage import StorageOptions, filesystem_for, is_remote

_CONFIG_SUFFIXES = (".json", ".txt", ".model", ".jinja")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

Precision = Literal["auto", "float32", "bfloat16", "float16"]


class ModelLoadError(RuntimeError):
    """A model could not be found, fetched or accepted."""


def cache_root() -> Path:
    """Per-node cache for models fetched from object storage or the hub."""
    return Path(os.environ.get("VLPIPE_CACHE", Path.home() / ".cache" / "vlpipe")) / "models"


def resolve_model_dir(ref: ModelRef, storage: StorageOptions, *, config_only: bool = False) -> Path:
    """A local directory holding the model (or just its configs)."""
    if is_remote(ref.source):
        local = _fetch_from_object_store(ref.source, storage, config_only=config_only)
    elif Path(ref.source).expanduser().is_dir():
        local = Path(ref.source).expanduser().resolve()
    elif ref.source.startswith(("/", "./", "../", "file://")):
        raise ModelLoadError(f"model directory not found: {ref.source}")
    else:
        local = _fetch_from_hub(ref, config_only=config_only)
    if not config_only:
        check_weights(local, ref)
    return local


def check_weights(model_dir: Path, ref: ModelRef) -> None:
    """Refuse pickle-only checkpoints unless the config allows them."""
    files = [p for p in model_dir.rglob("*") if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files):
        return
    pickles = sorted(p.name for p in files if p.suffix in _PICKLE_SUFFIXES)
    if not pickles:
        raise ModelLoadError(f"no model weights found in {ref.source} ({model_dir})")
    if not ref.allow_pickle_weights:
        raise ModelLoadError(
            f"model {ref.source} has only pickle weights ({', '.join(pickles)}); vlpipe loads "
            "safetensors only. Convert the checkpoint, or set allow_pickle_weights: true "
            "if you trust its origin."
        )


def pick_device_and_dtype(precision: Precision):
    """Device and dtype for this worker: decided where the model runs, never on the driver."""
    import torch

    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        if precision == "auto":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = getattr(torch, precision)
        return device, dtype
    # Ray caps a worker's OpenMP threads at its CPU reservation (1 for num_cpus <= 1); on a
    # CPU-only node the model is the bottleneck, so it gets every core and decode tasks interleave.
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    # Half precision on CPU is slow and inaccurate; fp32 is the only sane choice there.
    return torch.device("cpu"), torch.float32


def _fetch_from_hub(ref: ModelRef, *, config_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = [f"*{s}" for s in _CONFIG_SUFFIXES]
    if not config_only:
        patterns.append("*.safetensors")
        if ref.allow_pickle_weights:
            patterns += [f"*{s}" for s in _PICKLE_SUFFIXES]
    try:
        path = snapshot_download(
            ref.source, revision=ref.revision, allow_patterns=patterns, cache_dir=cache_root() / "hub"
        )
    except Exception as err:  # the hub client raises many unrelated types
        raise ModelLoadError(f"could not fetch model {ref.source!r} from the Hugging Face hub: {err}") from err
    return Path(path)


def _fetch_from_object_store(uri: str, storage: StorageOptions, *, config_only: bool) -> Path:
    fs, root = filesystem_for(uri, storage)
    try:
        infos = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.is_file]
    except (OSError, FileNotFoundError) as err:
        raise ModelLoadError(f"could not list model at {uri}: {err}") from err
    if config_only:
        infos = [i for i in infos if i.path.endswith(_CONFIG_SUFFIXES)]
    if not infos:
        raise ModelLoadError(f"no model files found at {uri}")
    # The key covers sizes and mtimes, so a model rewritten in place is fetched again.
    fingerprint = "|".join(sorted(f"{i.path}:{i.size}:{i.mtime_ns}" for i in infos))
    key = hashlib.sha256(f"{uri}|{fingerprint}".encode()).hexdigest()[:24]
    target = cache_root() / key
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _node_lock(target.with_suffix(".lock")):
        if target.is_dir():
            return target
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".fetch-"))
        try:
            for info in infos:
                dest = staging / os.path.relpath(info.path, root)
                dest.parent.mkdir(parents=True, exist_ok=True)
                with fs.open_input_stream(info.path) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, length=8 << 20)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


@contextlib.contextmanager
def _node_lock(path: Path):
    """Several actors on one node fetch the same model: only one downloads."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ModelOperator:
    """What every model stage sets up once per actor, shared by all of them.

    Finds the model (hub, directory or object store), picks device and dtype where
    the actor runs, and loads weights and preprocessors under the config's trust policy.
    """

    def __init__(self, ref: ModelRef, precision: Precision, storage: StorageOptions, model_class):
        self.ref = ref
        self.model_dir = resolve_model_dir(ref, storage)
        self.device, self.dtype = pick_device_and_dtype(precision)
        self.model = load_model(model_class, ref, self.model_dir, self.device, self.dtype)

    def preprocessor(self, preprocessor_class):
        """A tokenizer, image processor or processor from the model's directory."""
        return load_preprocessor(preprocessor_class, self.ref, self.model_dir)

    def pixel_input(self, image_processor, geometry=None) -> None:
        """Set the decode geometry (the processor's own unless given) and the device transfer."""
        from operators.tensors import DevicePixels

        self.geometry = geometry or PixelSpec.from_image_processor(image_processor)
        self.to_device = DevicePixels(image_processor, self.device, self.dtype)


# ``from_pretrained`` swaps torch's init functions and ``PreTrainedModel.init_weights`` for no-ops
# while it loads, process-wide, and puts back what it found. Two loads at once in one process (two
# runs in process in threads) put back each other's no-ops for good: every later model then kept
# meta tensors ("Cannot copy out of meta tensor"). One load at a time per process.
_LOADING = threading.Lock()


def load_model(model_class, ref: ModelRef, model_dir: Path, device, dtype):
    """``from_pretrained`` with the trust policy of ``ref`` applied, placed on ``device`` in eval mode."""
    from transformers.utils import logging as transformers_logging

    # A run in the vlpipe process would print a weights bar per model between its log lines.
    transformers_logging.disable_progress_bar()
    with _LOADING:
        model = model_class.from_pretrained(
            model_dir,
            dtype=dtype,
            # True refuses pickle checkpoints inside transformers too, not just in check_weights.
            use_safetensors=None if ref.allow_pickle_weights else True,
            trust_remote_code=ref.trust_remote_code,
        )
    return model.to(device).eval()


def load_preprocessor(preprocessor_class, ref: ModelRef, model_dir: Path):
    """A tokenizer, image processor or processor under the same remote-code policy as the model."""
    return preprocessor_class.from_pretrained(model_dir, trust_remote_code=ref.trust_remote_code)


def model_config(ref: ModelRef, storage: StorageOptions) -> dict:
    """A model's config.json, fetched without its weights."""
    return json.loads((resolve_model_dir(ref, storage, config_only=True) / "config.json").read_text())
