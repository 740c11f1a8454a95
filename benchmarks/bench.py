"""Throughput of vlpipe against the bare model loop and a naive transformers loop.

One process, the same images and the same weights for all three, so the ratios
hold on whatever machine runs it, however busy:

- ``limit``: the model alone, on pre-decoded, pre-resized, pre-normalised tensors (no I/O);
- ``naive``: read Parquet, PIL-decode, the model's own processor, the model, batch 32;
- ``vlpipe``: ``run_pipeline`` end to end on local Ray (read, decode, model, filter, commit),
  actor start-up and model load included.

For CLIP and for captioning, plus a scale check (vlpipe at two sizes: time per
1k rows and peak memory). Run ``python -m benchmarks.bench --help``.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import logging
import os
import pathlib
import platform
import re
import shutil
import sys
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from benchmarks import dedup as dedup_bench
from benchmarks import endpoint, inputs, models, naive_clip, real_signals, resume, retrieval, signals, whole
from benchmarks.data import write_shards
from benchmarks.decode_limit import decode_limit
from benchmarks.measure import measured, spilled_mib
from operators import schema as col
from operators.decisions.duplicates import NearConfig, SemanticConfig
from operators.image.decode import DecodeConfig, DecodeImages, PixelSpec
from operators.models.caption import caption_geometry

log = logging.getLogger(__name__)

NAIVE_BATCH = naive_clip.NAIVE_BATCH
SCALE_FIGURES = (
    "seconds_per_1k_rows",
    "images_per_s",
    "peak_pss_mb",
    "peak_rss_mb",
    "peak_ray_workers",
    "cores_busy",
    "spilled_mb",
    "busy_cpu_s",
    "cpu_split_s",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--clip-images", type=int, default=512, help="rows for the CLIP comparison (0: skip)")
    parser.add_argument("--caption-images", type=int, default=32, help="rows for the captioning comparison (0: skip)")
    parser.add_argument(
        "--scale-images",
        type=int,
        nargs="*",
        default=[512, 2048],
        help="row counts for the vlpipe scale check (none: skip)",
    )
    parser.add_argument(
        "--scale-model",
        default=None,
        help="CLIP directory for the scale check, or 'tiny' so decoding and I/O set the pace "
        "(default: the --clip-model)",
    )
    parser.add_argument(
        "--scale-executor",
        choices=("ray", "in_process"),
        default="ray",
        help="executor of the scale check (default: ray, as for large runs)",
    )
    parser.add_argument(
        "--signals-images",
        type=int,
        default=256,
        help="rows for the cost of heads + tags on CLIP and of the classifier, without Ray (0: skip)",
    )
    parser.add_argument(
        "--dedup", action="store_true", help="dedup quality on the planted corpus and its cost (tiny CLIP)"
    )
    parser.add_argument(
        "--dedup-originals",
        type=int,
        default=40,
        help="originals in the planted corpus (x9 rows; 0: skip the quality runs)",
    )
    parser.add_argument(
        "--dedup-images",
        type=int,
        nargs="*",
        default=[10_000, 100_000],
        help="rows for the dedup cost, with and without dedup; the last is the history for a night of the first size",
    )
    parser.add_argument(
        "--retrieval",
        action="store_true",
        help="vector index: recall@10 of the approximate index against exact search, build time, "
        "query latency, and `build_index` on a Delta table (synthetic vectors, no model)",
    )
    parser.add_argument("--retrieval-rows", type=int, default=100_000, help="vectors for --retrieval")
    parser.add_argument(
        "--inputs",
        type=int,
        default=0,
        metavar="ROWS",
        help="rows for the input readers' comparison: WebDataset tars against Parquet (0: skip)",
    )
    parser.add_argument(
        "--resume",
        type=int,
        default=0,
        metavar="ROWS",
        help="runs of ROWS rows (tiny CLIP, on Ray) with and without progress, killed and resumed (0: skip)",
    )
    parser.add_argument(
        "--endpoint",
        type=int,
        default=0,
        metavar="ROWS",
        help="ROWS rows captioned by a served tiny LLaVA (transformers serve): vlpipe's caption.endpoint "
        "stage against a plain asyncio client at the same concurrency (0: skip)",
    )
    parser.add_argument(
        "--real-signals",
        type=int,
        default=0,
        metavar="ROWS",
        help="the OCR and open_nsfw stages on ROWS rows: alone against each package's API, and inside a "
        "ViT-B/32 CLIP run in process (0: skip)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=20, help="caption length (greedy)")
    parser.add_argument(
        "--clip-batch", type=int, default=None, help="vlpipe and limit CLIP batch (default: the operator's)"
    )
    parser.add_argument(
        "--caption-batch", type=int, default=None, help="vlpipe and limit caption batch (default: the operator's)"
    )
    parser.add_argument(
        "--clip-model", default=None, help="CLIP directory (default: random-weight ViT-B/32, built once)"
    )
    parser.add_argument(
        "--clip-arch",
        choices=tuple(models.CLIP_ARCHS),
        default="vit-b32",
        help="architecture of the random-weight CLIP built when --clip-model is not given",
    )
    parser.add_argument("--caption-model", default=None, help="captioner directory (default: random-weight BLIP-base)")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny 2-layer architectures instead of real sizes (smoke test)"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the limit and naive loops run; vlpipe actors use a GPU when Ray has one",
    )
    parser.add_argument(
        "--storage",
        choices=("local", "seaweedfs"),
        default="local",
        help="shards on local disk or on a SeaweedFS S3 server started for the run",
    )
    parser.add_argument("--work-dir", type=pathlib.Path, default=pathlib.Path(".cache/bench"))
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    parser.add_argument(
        "--whole-repeats",
        type=int,
        default=3,
        help="time `vlpipe run` and the naive script as whole processes this many times each, "
        "and the demo-sized run's fixed cost (0: skip)",
    )
    parser.add_argument(
        "--num-gpus",
        type=int,
        default=None,
        help="GPUs for the local Ray (default: all); on a CPU-only machine a logical GPU "
        "checks the GPU scheduling, the models then run on the CPU",
    )
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/bench/bench.json"))
    return parser.parse_args(argv)


# ---------------------------------------------------------------- measurement helpers


class _RunLogCapture(logging.Handler):
    """Keeps what ``run_pipeline`` logs for the benchmark: Ray Data stats and the phase timings."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.stats = ""
        self.timings: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "timings", None):
            self.timings = dict(record.timings)
        elif "Ray Data stats" in record.getMessage():
            self.stats += record.getMessage() + "\n"  # one per pass


_OPERATOR = re.compile(r"^Operator \d+ (.+?):", re.MULTILINE)
_SECONDS = r"([\d.]+)(us|ms|s)"
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def stage_split(stats: str) -> dict[str, dict[str, float]]:
    """Total remote wall and CPU seconds per Ray Data operator, from ``Dataset.stats()`` text."""
    split = {}
    headers = list(_OPERATOR.finditer(stats))
    for header, following in zip(headers, [*headers[1:], None]):
        body = stats[header.end() : following.start() if following else len(stats)]
        entry = {}
        for key, label in (("wall_s", "Remote wall time"), ("cpu_s", "Remote cpu time")):
            found = re.search(label + r":.*?" + _SECONDS + r" total", body)
            if found:
                entry[key] = round(float(found.group(1)) * _UNIT[found.group(2)], 3)
        split[header.group(1)] = entry
    return split


# ---------------------------------------------------------------- inputs


def load_rows(paths: list[pathlib.Path]) -> pa.Table:
    return pa.concat_tables(pq.read_table(p, columns=["key", "caption", "jpg"]) for p in paths)


def decoded_pixels(table: pa.Table, spec: PixelSpec) -> np.ndarray:
    """The rows as vlpipe's decode step emits them: (n, H, W, 3) uint8 at the model's geometry."""
    from operators.tensors import pixel_rows

    batch = table.select(["jpg"]).rename_columns([col.IMAGE])
    out = DecodeImages(DecodeConfig(), spec)(batch)
    return pixel_rows(out.column(col.PIXELS), spec.out_size).copy()


def _device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    return torch.device(name)


def _dtype(device):
    import torch

    # What vlpipe's actors pick: bf16/fp16 on GPU, fp32 on CPU.
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _sync(device):
    import torch

    return (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)


# ---------------------------------------------------------------- CLIP


# The limit loops run first in the process: a first call on a couple of rows, outside the timing,
# keeps torch's one-time set-up (allocator, kernel choice) out of what the hardware can do.
WARM_UP_ROWS = 2


def clip_limit(model_dir: pathlib.Path, table: pa.Table, device, batch: int) -> dict:
    import torch
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    from operators.models.load import load_model
    from operators.refs import ModelRef
    from operators.tensors import DevicePixels

    ref = ModelRef(source=str(model_dir))
    processor = AutoImageProcessor.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(AutoModel, ref, model_dir, device, _dtype(device))
    rows = decoded_pixels(table, PixelSpec.from_image_processor(processor))
    to_device = DevicePixels(processor, device, _dtype(device))
    captions = table.column("caption").to_pylist()
    batches = []
    for start in range(0, len(rows), batch):
        tokens = tokenizer(captions[start : start + batch], padding=True, truncation=True, return_tensors="pt").to(
            device
        )
        batches.append((to_device(rows[start : start + batch]), tokens))
    result: dict = {}
    with torch.inference_mode():
        pixels, tokens = batches[0]
        model(pixel_values=pixels[:WARM_UP_ROWS], **{k: v[:WARM_UP_ROWS] for k, v in tokens.items()})
        with measured(result, len(rows), _sync(device)):
            for pixels, tokens in batches:
                model(pixel_values=pixels, **tokens)
    return result


def clip_naive(model_dir: pathlib.Path, paths: list[pathlib.Path], device) -> dict:
    result: dict = {}
    n = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    with measured(result, n, _sync(device)):
        naive_clip.score_shards(model_dir, paths, device, _dtype(device))
    return result


# ---------------------------------------------------------------- captioning


def caption_limit(model_dir: pathlib.Path, table: pa.Table, device, batch: int, max_new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from operators.models.load import load_model
    from operators.refs import ModelRef
    from operators.tensors import DevicePixels

    processor = AutoProcessor.from_pretrained(model_dir)
    model = load_model(AutoModelForImageTextToText, ModelRef(source=str(model_dir)), model_dir, device, _dtype(device))
    rows = decoded_pixels(table, caption_geometry(processor.image_processor, None))
    to_device = DevicePixels(processor.image_processor, device, _dtype(device))
    batches = [to_device(rows[s : s + batch]) for s in range(0, len(rows), batch)]
    result: dict = {}
    with torch.inference_mode():
        model.generate(
            pixel_values=batches[0][:WARM_UP_ROWS], max_new_tokens=max_new_tokens, num_beams=1, do_sample=False
        )
        with measured(result, len(rows), _sync(device)):
            for pixels in batches:
                model.generate(pixel_values=pixels, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
    return result


def caption_naive(model_dir: pathlib.Path, paths: list[pathlib.Path], device, max_new_tokens: int) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=_dtype(device)).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    result: dict = {}
    n = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    with measured(result, n, _sync(device)):
        for path in paths:
            for chunk in pq.ParquetFile(path).iter_batches(batch_size=NAIVE_BATCH, columns=["jpg"]):
                images = [Image.open(io.BytesIO(b)).convert("RGB") for b in chunk.column("jpg").to_pylist()]
                inputs = processor(images=images, return_tensors="pt").to(device)
                with torch.no_grad():
                    out = model.generate(
                        pixel_values=inputs["pixel_values"].to(_dtype(device)),
                        max_new_tokens=max_new_tokens,
                        num_beams=1,
                        do_sample=False,
                    )
                processor.batch_decode(out, skip_special_tokens=True)
    return result


# ---------------------------------------------------------------- vlpipe


def vlpipe_run(raw_config: dict, images: int) -> dict:
    """``run_pipeline`` on a fresh output table; wall time, stage split and peak memory."""
    from pipelines.config import validate_config
    from pipelines.run import run_pipeline

    shutil.rmtree(raw_config["output"]["uri"], ignore_errors=True)
    config = validate_config(raw_config, source="benchmark config")
    capture = _RunLogCapture()
    loggers = [logging.getLogger("pipelines.execute.ray"), logging.getLogger("pipelines.run")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(capture)
        logger.setLevel(logging.DEBUG)
    result: dict = {}
    spilled_before = spilled_mib()
    try:
        with measured(result, images):
            record = run_pipeline(config)
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(capture)
            logger.setLevel(level)
    if record.rows_in != images:
        raise RuntimeError(f"vlpipe read {record.rows_in} rows, expected {images}")
    result["seconds_per_1k_rows"] = round(result["seconds"] * 1000 / images, 3)
    result["spilled_mb"] = spilled_mib() - spilled_before
    result["stages"] = stage_split(capture.stats)
    result["timings"] = capture.timings
    result["rows_kept"] = record.rows_kept
    return result


def vlpipe_config(
    input_uri: str,
    output_uri: str,
    clip_dir: pathlib.Path,
    *,
    clip_batch: int | None,
    caption: dict | None = None,
    storage: dict | None = None,
    executor: str = "ray",
) -> dict:
    clip: dict = {"model": {"source": str(clip_dir)}}
    resources: dict = {}
    if clip_batch:
        resources["batch_size"] = clip_batch
    if caption:
        # Two model actors and decoding share the machine: each actor holds half a CPU slot.
        resources["num_cpus"] = 0.5
    if resources:
        clip["resources"] = resources
    raw = {
        "input": {"uri": input_uri},
        "clip": clip,
        "filter": {"min_clip_score": 0.0},
        # Files of a few thousand rows: the writer buffers one file's rows, so memory stays flat with N.
        "output": {"uri": output_uri, "rows_per_file": 2000},
        "executor": executor,
    }
    if caption:
        raw["caption"] = caption
    if storage:
        raw["storage"] = storage
    return raw


# ---------------------------------------------------------------- driver


LARGE_SCALE_ROWS = 100_000


def scale_shards(folder: pathlib.Path, n: int) -> list[pathlib.Path]:
    """The scale check's shards. Past 100k rows, 5,000 rows per shard with the image pool stored
    once per shard: a million rows of these images take ~4.4 GB of disk instead of ~45 GB."""
    if n <= LARGE_SCALE_ROWS:
        return write_shards(folder, n)
    return write_shards(folder, n, rows_per_shard=5000, pool_once_per_shard=True)


def _shards(args, n: int, s3) -> tuple[list[pathlib.Path], str, dict | None]:
    """Local shard paths (the loops read these) and the URI vlpipe reads, on local disk or S3."""
    folder = args.work_dir / "shards" / f"n{n}"
    paths = scale_shards(folder, n)
    if s3 is None:
        return paths, str(folder.resolve()) + "/", None
    bucket = "bench"
    s3.upload(paths, f"{bucket}/n{n}")
    storage = {
        "endpoint_url": s3.endpoint_url,
        "region": s3.region,
        "access_key_id": s3.access_key_id,
        "secret_access_key": s3.secret_access_key,
    }
    return paths, f"s3://{bucket}/n{n}/", storage


def _ratio(a: dict, b: dict) -> float:
    return float(f"{a['images_per_s'] / b['images_per_s']:.4g}")


def run(args: argparse.Namespace) -> dict:
    import ray
    import torch

    device = _device(args.device)
    model_root = args.work_dir / "models"
    clip_dir = (
        pathlib.Path(args.clip_model)
        if args.clip_model
        else models.clip_dir(model_root, tiny=args.tiny, arch=args.clip_arch)
    )
    report: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "device": args.device,
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "load_average_start": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
    }
    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
            include_dashboard=False,
            log_to_driver=False,
        )
    ray.data.DataContext.get_current().enable_progress_bars = False
    report["machine"]["ray_cpus"] = ray.cluster_resources().get("CPU")
    report["machine"]["ray_gpus"] = ray.cluster_resources().get("GPU", 0)
    out_root = args.out.parent.resolve()

    with _object_store(args) as s3:
        if args.clip_images:
            report["clip"] = _clip(args, device, s3, clip_dir, out_root)
        if args.caption_images:
            report["caption"] = _caption(args, device, s3, clip_dir if args.tiny else None, out_root)
        if args.signals_images:
            report["signals"] = _signals(args, clip_dir)
        if args.dedup:
            report["dedup"] = _dedup(args)
        for name, part in _parts(args).items():
            report[name] = part()
            log.info("%s: %s", name, report[name])
        report["scale"] = _scale(args, s3, clip_dir, report.get("clip"), out_root)
        report["decode_limit"] = _decode_limit(args, _scale_dir(args, clip_dir), report["scale"])
        if args.whole_repeats:
            ray.shutdown()  # the whole commands start their own Ray, as a user's do
            report["whole"] = _whole(args, s3, clip_dir, out_root)
    report["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def _clip(args, device, s3, clip_dir: pathlib.Path, out_root: pathlib.Path) -> dict:
    paths, uri, storage = _shards(args, args.clip_images, s3)
    table = load_rows(paths)
    from operators.models.clip import ClipConfig

    clip_batch = args.clip_batch or ClipConfig.model_fields["resources"].default.batch_size
    clip = {"model": str(clip_dir), "batch_size": clip_batch}
    clip["limit"] = clip_limit(clip_dir, table, device, clip_batch)
    log.info("CLIP limit: %s", clip["limit"])
    clip["naive"] = clip_naive(clip_dir, paths, device)
    log.info("CLIP naive: %s", clip["naive"])
    gc.collect()
    for mode, executor in (("vlpipe", "ray"), ("vlpipe_in_process", "in_process")):
        config = vlpipe_config(
            uri, str(out_root / "clip"), clip_dir, clip_batch=args.clip_batch, storage=storage, executor=executor
        )
        clip[mode] = vlpipe_run(config, len(table))
        log.info("CLIP %s: %s", mode, clip[mode])
    return _with_ratios(clip)


def _with_ratios(result: dict) -> dict:
    """Each vlpipe run (on Ray, in process) over the limit and the naive loop."""
    for mode in ("vlpipe", "vlpipe_in_process"):
        result[f"{mode}_over_limit"] = _ratio(result[mode], result["limit"])
        result[f"{mode}_over_naive"] = _ratio(result[mode], result["naive"])
    return result


def _parts(args) -> dict[str, Callable[[], dict]]:
    """The comparisons that each need only their own flag and the work folder, by report key."""
    work = args.work_dir
    parts = {
        "inputs": args.inputs and partial(inputs.inputs, work, args.inputs),
        "retrieval": args.retrieval and partial(retrieval.retrieval, work, args.retrieval_rows),
        "resume": args.resume and partial(_resume, args),
        "endpoint": args.endpoint and partial(endpoint.endpoint, work, args.endpoint),
        "real_signals": args.real_signals and partial(real_signals.real_signals, work, args.real_signals),
    }
    return {name: part for name, part in parts.items() if part}


def _resume(args) -> dict:
    import ray

    ray.shutdown()  # each run starts its own Ray, as a user's does
    return resume.resume(args.work_dir, models.clip_dir(args.work_dir, tiny=True), args.resume)


def _signals(args, clip_dir: pathlib.Path) -> dict:
    # The operators run without Ray on local rows, so the shards stay local whatever --storage says.
    paths, _, _ = _shards(args, args.signals_images, None)
    result = signals.signals(
        load_rows(paths), args.work_dir / "models", clip_dir, tiny=args.tiny, clip_batch=args.clip_batch
    )
    log.info("signals: %s", result)
    return result


def _dedup(args) -> dict:
    from jobs.demo import build_tiny_clip
    from jobs.demo.run import DEMO_TRAIN_STEPS

    # The demo's trained tiny CLIP: random weights put distinct images at cosine 0.98.
    clip_dir = args.work_dir / "models" / "tiny-clip-trained"
    if not (clip_dir / "config.json").exists():
        build_tiny_clip(clip_dir, train_steps=DEMO_TRAIN_STEPS)
    defaults = (NearConfig().max_distance, SemanticConfig().eps)
    result = {}
    if args.dedup_originals:
        result["quality"] = dedup_bench.quality(args.work_dir, clip_dir, args.dedup_originals, *defaults)
    if args.dedup_images:
        result["cost"] = dedup_bench.cost(args.work_dir, clip_dir, args.dedup_images, *defaults)
    log.info("dedup: %s", result)
    return result


def _scale_dir(args, clip_dir: pathlib.Path) -> pathlib.Path:
    if args.scale_model == "tiny":
        return models.clip_dir(args.work_dir / "models", tiny=True)
    return pathlib.Path(args.scale_model) if args.scale_model else clip_dir


def _scale(args, s3, clip_dir: pathlib.Path, clip: dict | None, out_root: pathlib.Path) -> list[dict]:
    scale_dir = _scale_dir(args, clip_dir)
    scale = []
    for n in args.scale_images:
        if clip and n == args.clip_images and scale_dir == clip_dir:
            result = clip["vlpipe" if args.scale_executor == "ray" else "vlpipe_in_process"]
        else:
            _, uri_n, storage = _shards(args, n, s3)
            result = vlpipe_run(
                vlpipe_config(
                    uri_n,
                    str(out_root / f"scale-{n}"),
                    scale_dir,
                    clip_batch=args.clip_batch,
                    storage=storage,
                    executor=args.scale_executor,
                ),
                n,
            )
        scale.append(
            {
                "rows": n,
                "model": str(scale_dir),
                "executor": args.scale_executor,
                **{k: result[k] for k in SCALE_FIGURES},
            }
        )
    if len(scale) > 1:
        # Targets of a run that streams: the same cost per row and the same memory at any size.
        first, last = scale[0], scale[-1]
        for entry in scale[1:]:
            entry["time_per_row_vs_first"] = round(entry["seconds_per_1k_rows"] / first["seconds_per_1k_rows"], 3)
            entry["peak_pss_vs_first"] = round(entry["peak_pss_mb"] / first["peak_pss_mb"], 3)
        log.info(
            "scale %d -> %d rows: time per row x%.2f, peak PSS x%.2f",
            first["rows"],
            last["rows"],
            last["time_per_row_vs_first"],
            last["peak_pss_vs_first"],
        )
    return scale


DECODE_LIMIT_ROWS = 20_000  # the shards repeat one image pool, so the rate per row does not depend on N


def _decode_limit(args, scale_dir: pathlib.Path, scale: list[dict]) -> dict | None:
    """The bare decode loop on the largest scale size's first shards; each scale run's ratio to it."""
    if not scale or args.num_cpus == 0:
        return None
    from operators.refs import ModelRef
    from operators.storage import StorageOptions
    from pipelines.plan.build import image_geometry

    spec = image_geometry(ModelRef(source=str(scale_dir)), StorageOptions())
    n = max(s["rows"] for s in scale)
    paths = scale_shards(args.work_dir / "shards" / f"n{n}", n)
    kept, rows = [], 0
    for path in paths:
        if rows >= DECODE_LIMIT_ROWS:
            break
        kept.append(path)
        rows += pq.ParquetFile(path).metadata.num_rows
    result = decode_limit(kept, spec, processes=args.num_cpus)
    log.info("decode limit: %s", result)
    for entry in scale:
        entry["vlpipe_over_decode_limit"] = round(entry["images_per_s"] / result["images_per_s"], 3)
    return result


def _caption(args, device, s3, tiny_clip: pathlib.Path | None, out_root: pathlib.Path) -> dict:
    from operators.models.caption import CaptionConfig

    model_root = args.work_dir / "models"
    caption_dir = (
        pathlib.Path(args.caption_model) if args.caption_model else models.blip_dir(model_root, tiny=args.tiny)
    )
    # The run needs a CLIP stage; the tiny one costs next to nothing beside a captioner.
    scoring_clip = tiny_clip or models.clip_dir(model_root, tiny=True)
    paths, uri, storage = _shards(args, args.caption_images, s3)
    table = load_rows(paths)
    batch = args.caption_batch or CaptionConfig.model_fields["resources"].default.batch_size
    result = {
        "model": str(caption_dir),
        "scoring_clip": str(scoring_clip),
        "batch_size": batch,
        "max_new_tokens": args.max_new_tokens,
    }
    result["limit"] = caption_limit(caption_dir, table, device, batch, args.max_new_tokens)
    log.info("caption limit: %s", result["limit"])
    result["naive"] = caption_naive(caption_dir, paths, device, args.max_new_tokens)
    log.info("caption naive: %s", result["naive"])
    gc.collect()
    caption = {
        "model": {"source": str(caption_dir)},
        "max_new_tokens": args.max_new_tokens,
        "resources": {"num_cpus": 0.5, **({"batch_size": args.caption_batch} if args.caption_batch else {})},
    }
    for mode, executor in (("vlpipe", "ray"), ("vlpipe_in_process", "in_process")):
        config = vlpipe_config(
            uri,
            str(out_root / "caption"),
            scoring_clip,
            clip_batch=None,
            caption=caption,
            storage=storage,
            executor=executor,
        )
        result[mode] = vlpipe_run(config, len(table))
        log.info("caption %s: %s", mode, result[mode])
    return _with_ratios(result)


def _whole(args, s3, clip_dir: pathlib.Path, out_root: pathlib.Path) -> dict:
    """Whole-process timings: the CLIP comparison's rows, and the demo's fixed cost."""
    from jobs.demo.run import prepare_demo_assets

    result: dict = {}
    work = args.work_dir / "whole"
    if args.clip_images:
        paths, uri, storage = _shards(args, args.clip_images, s3)
        config = vlpipe_config(
            uri, str(out_root / "whole-clip"), clip_dir.resolve(), clip_batch=args.clip_batch, storage=storage
        )
        result["clip"] = whole.whole_clip(config, work, clip_dir.resolve(), paths, args.clip_images, args.whole_repeats)
        log.info("whole commands, CLIP: %s", result["clip"])
    prepare_demo_assets()
    demo = yaml.safe_load(pathlib.Path("configs/demo.yaml").read_text())
    demo["output"]["uri"] = str(out_root / "fixed-cost")
    demo["report"] = {"enabled": True}
    result["fixed_cost"] = whole.fixed_cost(demo, work, args.whole_repeats)
    log.info("fixed cost of the demo run: %s", result["fixed_cost"])
    return result


@contextmanager
def _object_store(args):
    if args.storage == "local":
        yield None
        return
    from tests.s3_server import seaweedfs

    with seaweedfs(args.work_dir / "seaweedfs") as server:
        yield server


def format_report(report: dict) -> str:
    """The table docs/performance.md quotes."""
    m = report["machine"]
    lines = [
        f"machine: {m['cpus']} CPUs, {m['platform']}, torch {m['torch']}, device {m['device']}"
        + (f" ({m['gpu']})" if m.get("gpu") else ""),
        f"load average: start {m['load_average_start']}, end {m.get('load_average_end')}",
        "",
        f"{'workload':<10} {'model':<24} {'N':>6} {'limit':>9} {'naive':>9} {'vlpipe':>9} "
        f"{'v/limit':>8} {'v/naive':>8}",
    ]
    for name in ("clip", "caption"):
        r = report.get(name)
        if not r:
            continue
        for mode, label in (("vlpipe", name), ("vlpipe_in_process", f"{name}/here")):
            lines.append(
                f"{label:<12} {pathlib.Path(r['model']).name:<22} {r['limit']['images']:>6} "
                f"{r['limit']['images_per_s']:>9.2f} {r['naive']['images_per_s']:>9.2f} "
                f"{r[mode]['images_per_s']:>9.2f} "
                f"{r[f'{mode}_over_limit']:>8.2f} {r[f'{mode}_over_naive']:>8.2f}"
            )
    lines.append(
        "(images/s; vlpipe is end to end: Ray actors start, model load, read, decode, model, filter, commit;\n"
        " '/here' is the same run in the bench's process without Ray, executor: in_process)"
    )
    for name in ("clip", "caption"):
        r = report.get(name)
        if not r:
            continue
        lines += ["", f"{name} vlpipe stages (Ray Data remote time, summed over workers):"]
        for stage, t in r["vlpipe"]["stages"].items():
            lines.append(f"  {stage[:70]:<70} wall {t.get('wall_s', 0):>8.1f}s  cpu {t.get('cpu_s', 0):>8.1f}s")
        lines.append(
            "  peak PSS: "
            + ", ".join(f"{k} {r[k]['peak_pss_mb']:.0f} MB" for k in ("limit", "naive", "vlpipe", "vlpipe_in_process"))
        )
        if r["vlpipe"].get("timings"):
            lines.append("  run phases: " + ", ".join(f"{k} {v:.2f}s" for k, v in r["vlpipe"]["timings"].items()))
    if report.get("scale"):
        lines += [
            "",
            f"scale (vlpipe CLIP, {pathlib.Path(report['scale'][0]['model']).name}, "
            f"executor {report['scale'][0].get('executor', 'ray')}; memory is the "
            "process tree's PSS, shared pages counted once):",
        ]
        for s in report["scale"]:
            lines.append(
                f"  {s['rows']:>7} rows: {s['seconds_per_1k_rows']:>6.2f} s/1k rows, peak PSS "
                f"{s['peak_pss_mb']:>6.0f} MB (RSS {s['peak_rss_mb']:.0f}), {s['peak_ray_workers']} Ray "
                f"workers, cores busy {s['cores_busy']:.0%}, spilled {s['spilled_mb']} MB"
                + (
                    f"  [x{s['time_per_row_vs_first']:.2f} time/row, x{s['peak_pss_vs_first']:.2f} memory]"
                    if "time_per_row_vs_first" in s
                    else ""
                )
                + (f"  [{s['vlpipe_over_decode_limit']:.2f}x decode limit]" if "vlpipe_over_decode_limit" in s else "")
            )
            lines.append(format_cpu_split(s["cpu_split_s"], s["busy_cpu_s"]))
    if report.get("decode_limit"):
        d = report["decode_limit"]
        lines.append(
            f"  decode limit (bare multiprocessing loop, {d['processes']} processes, {d['images']} rows): "
            f"{d['images_per_s']:.0f} img/s"
        )
    lines += _format_signals(report.get("signals"))
    lines += dedup_bench.format_dedup(report.get("dedup"))
    lines += retrieval.format_retrieval(report.get("retrieval"))
    lines += resume.format_resume(report.get("resume"))
    lines += endpoint.format_endpoint(report.get("endpoint"))
    lines += real_signals.format_real_signals(report.get("real_signals"))
    lines += inputs.format_inputs(report.get("inputs"))
    lines += _format_whole(report.get("whole"))
    return "\n".join(lines)


def format_cpu_split(split: dict[str, float], busy_cpu_s: float, shown: int = 6) -> str:
    """Where the machine's busy CPU time went, by what each process of the run ran (largest first)."""
    if not busy_cpu_s:
        return "             cpu: none measured"
    parts = [f"{title} {seconds / busy_cpu_s:.0%}" for title, seconds in list(split.items())[:shown]]
    rest = sum(list(split.values())[shown:])
    outside = busy_cpu_s - sum(split.values())
    return (
        "             cpu: " + ", ".join(parts) + f", other processes of the run {rest / busy_cpu_s:.0%}, "
        f"not in the run (or missed between samples) {max(outside, 0) / busy_cpu_s:.0%}"
    )


def _format_signals(result: dict | None) -> list[str]:
    if not result:
        return []
    h, c = result["heads_tags"], result["classifier"]
    return [
        "",
        f"signals, {h['images']} rows without Ray (each pair run alternately, batch by batch):",
        f"  heads ({' + '.join(h['heads'])}) + {h['tags']} tags ({h['prompts']} prompts) on CLIP "
        f"{pathlib.Path(h['model']).name}, batch {h['batch_size']}: {h['with_signals_s']:.2f} s vs "
        f"{h['clip_s']:.2f} s, x{h['ratio']:.3f} (target <= 1.05)",
        f"    alone on the same embeddings: heads {h['heads_s'] * 1e3:.1f} ms, tags {h['tags_s'] * 1e3:.1f} ms "
        f"-> x{h['ratio_from_parts']:.4f}; set-up: heads load {h['heads_load_s'] * 1e3:.0f} ms, "
        f"tag prompts {h['tag_prompts_s'] * 1e3:.0f} ms once per actor",
        f"  classifier {pathlib.Path(c['model']).name} ({c['device']}, {c['dtype']}), batch {c['batch_size']}: "
        f"operator {c['operator_images_per_s']:.1f} img/s, bare transformers loop {c['bare_images_per_s']:.1f} img/s, "
        f"{c['ratio']:.3f}x (target >= 0.9)",
    ]


def _format_whole(result: dict | None) -> list[str]:
    if not result:
        return []
    lines = [""]
    names = [f"vlpipe_{e}" for e in whole.EXECUTORS] + ["naive"]
    if result.get("clip"):
        r = result["clip"]
        lines.append(f"whole commands, {r['naive']['images']} rows (s, min/median/max of {r['naive']['runs']}):")
        for name in names:
            t = r[name]
            lines.append(
                f"  {name:<13} {t['min_s']:>7.1f} {t['median_s']:>7.1f} {t['max_s']:>7.1f}   "
                f"{t['images_per_s']:.1f} img/s"
            )
        lines.append("  " + ", ".join(f"{n} / naive: {r[f'{n}_over_naive']:.2f}" for n in names[:-1]))
    f = result["fixed_cost"]
    lines.append(f"fixed cost, `vlpipe run configs/demo.yaml` as a process (imports {f['imports_s']:.1f} s):")
    for executor in whole.EXECUTORS:
        e = f[executor]
        lines.append(
            f"  executor {executor:<5} median {e['wall']['median_s']:.1f} s (min {e['wall']['min_s']:.1f}, "
            f"max {e['wall']['max_s']:.1f}); outside run_pipeline {e['outside_run_s']:.1f} s; phases: "
            + ", ".join(f"{k} {v:.2f}" for k, v in e["phases_s"].items())
        )
    return lines


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    print(f"\nwritten {args.out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
