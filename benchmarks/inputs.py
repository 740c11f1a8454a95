"""``make bench BENCH_ARGS=--inputs``: reading rows from WebDataset tars against the Parquet path.

The same rows (the bench's rendered JPEGs, ~10 kB each) as img2dataset-style Parquet shards
and as tars written by the webdataset library. Each reader runs on one core in this
process, to the point where the rows enter decoding (``PrepareInput``'s output):

- ``parquet``: what a Parquet read task does (``pyarrow`` read of key, caption, jpg), from shards
  written without dictionary encoding so that they hold the tars' bytes;
- ``vlpipe_tar``: vlpipe's tar reader (whole shard grouped by key, so member order never matters);
- ``webdataset_lib``: the webdataset library's own iteration (adjacent members only, no
  decoding): the grouping Ray's ``read_webdataset`` also relies on, as the reference rate.
"""

from __future__ import annotations

import pathlib
import time

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.data import write_shards
from operators.input.prepare import SHARD_PATH, ColumnMapping, PrepareInput
from operators.input.webdataset import WDS_CAPTION, WDS_IMAGE, WDS_KEY, WebDatasetConfig, read_tar

REPEATS = 3


def inputs(work_dir: pathlib.Path, rows: int, rows_per_shard: int = 1000) -> dict:
    """Rows per second per core of each reader (best of ``REPEATS``), and the ratios to Parquet."""
    pooled = write_shards(work_dir / "inputs-pool", rows, rows_per_shard=rows_per_shard)
    shards = _without_dictionary(pooled, work_dir / "inputs-parquet")
    tars = _as_tars(shards, work_dir / "inputs-tar")
    readers = {
        "parquet": lambda: _parquet(shards),
        "vlpipe_tar": lambda: _vlpipe_tar(tars),
        "webdataset_lib": lambda: _webdataset_lib(tars),
    }
    result = {
        "rows": rows,
        "rows_per_shard": rows_per_shard,
        "bytes": {"parquet": sum(p.stat().st_size for p in shards), "tar": sum(p.stat().st_size for p in tars)},
    }
    for name, read in readers.items():
        best = None
        for _ in range(REPEATS):
            start = time.perf_counter()
            count = read()
            seconds = time.perf_counter() - start
            best = seconds if best is None else min(best, seconds)
        if count != rows:
            raise AssertionError(f"{name} read {count} rows of {rows}")
        result[name] = {"seconds": round(best, 4), "rows_per_s_per_core": round(rows / best)}
    base = result["parquet"]["rows_per_s_per_core"]
    for name in ("vlpipe_tar", "webdataset_lib"):
        result[name]["vs_parquet"] = round(result[name]["rows_per_s_per_core"] / base, 3)
    return result


def _without_dictionary(pooled: list[pathlib.Path], out_dir: pathlib.Path) -> list[pathlib.Path]:
    """The shards rewritten without dictionary encoding: the bench's pool repeats each image, which a
    dictionary would store once, and a crawl's images are all distinct. Both formats then hold the same bytes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for shard in pooled:
        path = out_dir / shard.name
        if not path.exists() or path.stat().st_mtime < shard.stat().st_mtime:
            pq.write_table(pq.read_table(shard), path, use_dictionary=False)
        shards.append(path)
    return shards


def _as_tars(shards: list[pathlib.Path], out_dir: pathlib.Path) -> list[pathlib.Path]:
    import webdataset as wds

    out_dir.mkdir(parents=True, exist_ok=True)
    tars = []
    for shard in shards:
        path = out_dir / shard.with_suffix(".tar").name
        if not path.exists() or path.stat().st_mtime < shard.stat().st_mtime:
            table = pq.read_table(shard, columns=["key", "caption", "jpg"])
            with wds.TarWriter(str(path)) as sink:
                for row in table.to_pylist():
                    sink.write({"__key__": row["key"], "jpg": row["jpg"], "txt": row["caption"] or ""})
        tars.append(path)
    return tars


def _parquet(shards: list[pathlib.Path]) -> int:
    prepare = PrepareInput(ColumnMapping("key", "caption", "jpg"), "")
    count = 0
    for shard in shards:
        table = pq.read_table(shard, columns=["key", "caption", "jpg"])
        table = table.append_column(SHARD_PATH, pa.array([str(shard)] * table.num_rows))
        count += prepare(table).num_rows
    return count


def _vlpipe_tar(tars: list[pathlib.Path]) -> int:
    prepare = PrepareInput(ColumnMapping(WDS_KEY, WDS_CAPTION, WDS_IMAGE), "")
    count = 0
    for path in tars:
        with open(path, "rb") as stream:
            for table in read_tar(stream, WebDatasetConfig(), pa.schema([])):
                table = table.append_column(SHARD_PATH, pa.array([str(path)] * table.num_rows))
                count += prepare(table).num_rows
    return count


def _webdataset_lib(tars: list[pathlib.Path]) -> int:
    import webdataset as wds

    return sum(1 for _ in wds.WebDataset([str(p) for p in tars], shardshuffle=False))


def format_inputs(result: dict | None) -> list[str]:
    if not result:
        return []
    lines = [
        "",
        f"Reading rows, one core ({result['rows']:,} rows, {result['rows_per_shard']:,} per shard; "
        f"Parquet {result['bytes']['parquet'] / 1e6:.1f} MB, tars {result['bytes']['tar'] / 1e6:.1f} MB):",
    ]
    for name in ("parquet", "vlpipe_tar", "webdataset_lib"):
        entry = result[name]
        ratio = f"  ({entry['vs_parquet']:.2f}x Parquet)" if "vs_parquet" in entry else ""
        lines.append(f"  {name:<15} {entry['rows_per_s_per_core']:>9,} rows/s{ratio}")
    return lines
