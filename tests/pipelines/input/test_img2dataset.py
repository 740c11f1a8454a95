"""What the real img2dataset writes, run as a new user would: its Parquet and its WebDataset output.

img2dataset downloads from a loopback HTTP server (two of its URLs are 404s), in a
subprocess, as its command line runs.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from operators import schema as col
from pipelines.config import validate_config
from pipelines.run import run_pipeline
from tests.http_server import ImageServer
from tests.images import encode, noise

pytestmark = pytest.mark.slow

IMAGES, MISSING = 8, 2


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> dict[str, Path]:
    """img2dataset's output folders by format, from the same 10 URLs."""
    root = tmp_path_factory.mktemp("img2dataset")
    routes = {f"/img{i}.jpg": encode(noise(seed=i), "JPEG") for i in range(IMAGES)}
    with ImageServer(routes) as server:
        urls = [f"{server.url}/img{i}.jpg" for i in range(IMAGES + MISSING)]
        pq.write_table(
            pa.table({"url": urls, "caption": [f"noise picture {i}" for i in range(len(urls))]}), root / "urls.parquet"
        )
        jobs = {
            fmt: subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("img2dataset")),
                    f"--url_list={root / 'urls.parquet'}",
                    "--input_format=parquet",
                    "--url_col=url",
                    "--caption_col=caption",
                    f"--output_folder={root / fmt}",
                    f"--output_format={fmt}",
                    "--processes_count=1",
                    "--thread_count=4",
                    "--image_size=64",
                    "--resize_mode=no",
                    "--number_sample_per_shard=6",
                    "--timeout=5",
                    "--retries=0",
                    "--enable_wandb=False",
                    "--disallowed_header_directives=[]",
                ],
                env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for fmt in ("parquet", "webdataset")
        }
        for job in jobs.values():
            output = job.communicate(timeout=120)[0]
            assert job.returncode == 0, output.decode()[-2000:]
    return {fmt: root / fmt for fmt in jobs}


def run(folder: Path, tiny_clip_dir: Path, out: Path, extra) -> tuple:
    config = validate_config(
        {
            "input": {"uri": str(folder), "extra_columns": extra},
            "clip": {"model": {"source": str(tiny_clip_dir)}},
            "filter": {"min_clip_score": -1.0},
            "output": {"uri": str(out)},
            "run_date": "2026-11-01",
            "executor": "in_process",
        }
    )
    record = run_pipeline(config)
    return record, {r[col.KEY]: r for r in DeltaTable(str(out)).to_pyarrow_table().to_pylist()}


def test_img2dataset_parquet_output(downloads, tiny_clip_dir, tmp_path):
    source = pa.concat_tables(pq.read_table(p) for p in sorted(downloads["parquet"].glob("*.parquet")))
    record, rows = run(
        downloads["parquet"],
        tiny_clip_dir,
        tmp_path / "out",
        {"status": "download_status", "url": "url", "sha256": "sha256"},
    )
    assert record.rows_in == IMAGES + MISSING == len(rows) and record.status == "succeeded"
    assert record.rejected_by_reason == {col.DOWNLOAD_FAILED: MISSING}  # not decode errors, not missing images
    for sample in source.to_pylist():
        row = rows[sample["key"]]
        assert (row["url"], row["download_status"], row["sha256"]) == (
            sample["url"],
            sample["status"],
            sample["sha256"],
        )
        if sample["status"] == "success":  # img2dataset's sha256 is of the download, before it re-encoded
            assert row[col.STATUS] == col.OK and row[col.IMAGE_SHA256] == hashlib.sha256(sample["jpg"]).hexdigest()
        else:
            assert row[col.STATUS] == col.DOWNLOAD_FAILED and "HTTP Error 404" in row[col.ERROR]


def test_img2dataset_webdataset_output_counts_every_url(downloads, tiny_clip_dir, tmp_path):
    """The tars hold the 8 downloads; the 2 failures are only in the metadata Parquet beside each tar."""
    record, rows = run(downloads["webdataset"], tiny_clip_dir, tmp_path / "out", ["url", "sha256", "width"])
    assert record.rows_in == IMAGES + MISSING == len(rows)
    assert record.rejected_by_reason == {col.DOWNLOAD_FAILED: MISSING}
    assert {r[col.SOURCE_SHARD].rsplit("/", 1)[-1] for r in rows.values()} == {"00000.tar", "00001.tar"}
    ok = [r for r in rows.values() if r[col.STATUS] == col.OK]
    assert len(ok) == IMAGES and all(r["sha256"] and r["width"] == 64 == r[col.IMAGE_WIDTH] for r in ok)
    metadata = pa.concat_tables(pq.read_table(p) for p in sorted(downloads["webdataset"].glob("*.parquet")))
    assert {s["key"]: (s["url"], s["caption"]) for s in metadata.to_pylist()} == {
        key: (r["url"], r[col.CAPTION]) for key, r in rows.items()
    }
