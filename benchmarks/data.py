"""Benchmark input: img2dataset-style Parquet shards of realistic JPEGs.

Photo-like content (gradients, a shaded shape, sensor noise) at mixed sizes
256-1024 px, a fifth of them at the large end, so the JPEGs weigh what web
images do and decoding costs what it costs in a real crawl. Rendering dominates
generation, so a pool of distinct images is rendered once and repeated under
fresh keys and captions; decode work per row is unchanged by the repetition.
"""

from __future__ import annotations

import io
import json
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.demo import PALETTE, SHAPES, caption_for, make_sample_image
from jobs.demo.shards import SHARD_SCHEMA

SCHEMA = SHARD_SCHEMA  # img2dataset's columns, as the demo's shards have them
MARKER = "vlpipe_bench_shards.json"
POOL_SIZE = 256


def write_shards(
    out_dir: pathlib.Path, n: int, *, rows_per_shard: int = 500, seed: int = 0, pool_once_per_shard: bool = False
) -> list[pathlib.Path]:
    """Write (or reuse) ``n`` rows as Parquet shards under ``out_dir``; returns the shard paths.

    ``pool_once_per_shard`` stores the image pool once per shard (a dictionary page of ~22 MB
    instead of every row's bytes): what a million rows need to fit on a disk. Readers get the
    same bytes per row either way; Parquet expands the dictionary when it reads.
    """
    out_dir = pathlib.Path(out_dir)
    recipe = {"n": n, "rows_per_shard": rows_per_shard, "seed": seed, "pool": POOL_SIZE, "version": 1}
    if pool_once_per_shard:
        recipe["pool_once_per_shard"] = True
    marker = out_dir / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        return sorted(out_dir.glob("*.parquet"))
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.parquet"):
        old.unlink()
    rng = np.random.default_rng(seed)
    pool = [_render(rng) for _ in range(min(n, POOL_SIZE))]
    paths = []
    for start in range(0, n, rows_per_shard):
        rows = {name: [] for name in SCHEMA.names}
        for i in range(start, min(n, start + rows_per_shard)):
            jpeg, (width, height), shape, color = pool[i % len(pool)]
            key = f"{i:09d}"
            for name, value in zip(
                SCHEMA.names,
                (key, caption_for(shape, color, rng), jpeg, f"https://example.com/{key}.jpg", width, height),
            ):
                rows[name].append(value)
        path = out_dir / f"{start // rows_per_shard:05d}.parquet"
        if pool_once_per_shard:  # Parquet's default 1 MB dictionary limit would fall back to plain pages
            pq.write_table(
                pa.table(rows, schema=SCHEMA), path, use_dictionary=["jpg"], dictionary_pagesize_limit=1 << 28
            )
        else:
            pq.write_table(pa.table(rows, schema=SCHEMA), path)
        paths.append(path)
    marker.write_text(json.dumps(recipe) + "\n")
    return paths


def _render(rng: np.random.Generator) -> tuple[bytes, tuple[int, int], str, str]:
    shape, color = SHAPES[int(rng.integers(len(SHAPES)))], list(PALETTE)[int(rng.integers(len(PALETTE)))]
    size = 1024 if rng.random() < 0.2 else int(rng.integers(256, 1025))
    image = make_sample_image(shape, color, size=size, rng=rng)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(80, 96)))
    return buffer.getvalue(), image.size, shape, color
