"""The decode limit: exactly vlpipe's decode (JPEG draft, resize, crop) over the same shards, on
every core with plain multiprocessing, nothing else. A tiny-model run is bound by this."""

from __future__ import annotations

import multiprocessing
import os
import pathlib

import pyarrow.parquet as pq

from benchmarks.measure import measured


def _decode_shard(job: tuple[str, dict, int]) -> int:
    from operators import schema as col
    from operators.image.decode import DecodeConfig, DecodeImages, PixelSpec

    path, spec, batch = job
    decode = DecodeImages(DecodeConfig(), PixelSpec(**spec))
    rows = 0
    for chunk in pq.ParquetFile(path).iter_batches(batch_size=batch, columns=["jpg"]):
        import pyarrow as pa

        rows += decode(pa.Table.from_batches([chunk]).rename_columns([col.IMAGE])).num_rows
    return rows


def decode_limit(paths: list[pathlib.Path], spec, *, processes: int | None = None, batch: int = 64) -> dict:
    """images/s of the bare decode loop over ``paths`` at ``spec``'s geometry, on ``processes`` cores."""
    processes = processes or len(os.sched_getaffinity(0))
    jobs = [(str(p), spec.model_dump(), batch) for p in paths]
    # Spawned, not forked: the benchmark process has Ray's and torch's threads running.
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(_decode_shard, jobs[:processes])  # warm: imports and first-call costs out of the timing
        result: dict = {"processes": processes}
        with measured(result, sum(pq.ParquetFile(p).metadata.num_rows for p in paths)):
            decoded = sum(pool.imap_unordered(_decode_shard, jobs))
    result["rows"] = decoded
    return result
