"""WebDataset tars and image references, end to end: real Ray, real SeaweedFS, a real HTTP server."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from operators import schema as col
from operators.storage import Location
from pipelines.export.export import ExportRequest, export
from pipelines.input.nightly import plan_nightly
from pipelines.input.shards import choose_format, list_shards
from pipelines.run import run_pipeline
from pipelines.table.records import read_run_records
from tests.http_server import ImageServer
from tests.images import encode, noise
from tests.pipelines.conftest import s3_config
from tests.tars import tar_bytes

pytestmark = pytest.mark.slow

ANY_SCORE = {"min_clip_score": -1.0}  # the tiny CLIP's random scores; what is checked here is the input side
JPGS = [encode(noise(seed=i), "JPEG") for i in range(8)]


def read_table(s3, uri: str) -> dict[str, dict]:
    table = DeltaTable(uri, storage_options=s3.delta_storage_options()).to_pyarrow_table()
    return {r[col.KEY]: r for r in table.to_pylist()}


def test_tar_shards_from_two_writers_and_a_corrupt_one(s3, tiny_clip_dir, tmp_path):
    import webdataset as wds

    folder = tmp_path / "tars"
    folder.mkdir()
    with wds.TarWriter(str(folder / "00000.tar")) as sink:  # what open_clip and img2dataset users have
        for i in range(4):
            sink.write(
                {
                    "__key__": f"w{i}",
                    "jpg": JPGS[i],
                    "txt": f"noise picture {i}",
                    "json": {"url": f"http://example.com/{i}.jpg", "width": 64},
                }
            )
    (folder / "00001.tar").write_bytes(
        tar_bytes(
            [  # by hand: members apart, gaps, a stray member
                ("p0.jpg", JPGS[4]),
                ("p1.png", encode(noise(seed=9))),
                ("p0.txt", "far from its image"),
                ("p2.txt", "a caption without an image"),
                ("p1.txt", "png sample"),
                ("p3.jpg", JPGS[5]),
                ("p4.cls", "7"),
                ("p5.jpg", JPGS[6]),
                ("p5.jpg", JPGS[7]),
                ("p5.txt", "two images, one key"),
            ]
        )
    )
    whole = tar_bytes([("c0.jpg", JPGS[0]), ("c0.txt", "cut short")])
    (folder / "00002.tar").write_bytes(whole[:1536])  # an interrupted upload: cut inside the image
    s3.upload(sorted(folder.iterdir()), "wds/night")
    config = s3_config(
        s3,
        tiny_clip_dir,
        input={"uri": "s3://wds/night/", "extra_columns": {"url": "source_url"}},
        output={"uri": "s3://wds-out/t"},
        filter=ANY_SCORE,
        executor="in_process",  # a tar's rows are unknown until read: auto would pick Ray
    )
    s3.create_bucket("wds-out")
    record = run_pipeline(config)

    rows = read_table(s3, "s3://wds-out/t")
    assert sorted(rows) == sorted(["w0", "w1", "w2", "w3", "p0", "p1", "p2", "p3", "p4", "p5"])
    assert record.status == "partial" and [f["uri"] for f in record.failed_shards] == ["s3://wds/night/00002.tar"]
    assert "truncated tar" in record.failed_shards[0]["error"]
    assert record.rows_in == 10 and record.rows_kept == 6  # w0-3, p0, p1
    assert record.rejected_by_reason == {col.MISSING_IMAGE: 2, col.INVALID_SAMPLE: 1, col.EMPTY_CAPTION: 1}
    assert rows["p0"][col.CAPTION] == "far from its image" and rows["p0"][col.STATUS] == col.OK
    assert rows["p3"][col.REJECT_REASON] == col.EMPTY_CAPTION and rows["p3"][col.IMAGE_EMBEDDING] is not None
    assert "it has: cls" in rows["p4"][col.ERROR] and "2 'p5.jpg' members" in rows["p5"][col.ERROR]
    assert rows["w2"]["source_url"] == "http://example.com/2.jpg" and rows["p0"]["source_url"] is None
    assert rows["w1"][col.SOURCE_SHARD] == "s3://wds/night/00000.tar"
    assert rows["w3"][col.IMAGE_SHA256] == hashlib.sha256(JPGS[3]).hexdigest()

    # Exported for training, the images are read back from the tars: the bytes the tars hold.
    export("s3://wds-out/t", "s3://wds-out/train", ExportRequest(all_rows=True), storage=config.storage)
    fs = s3.filesystem()
    with fs.open_input_stream("wds-out/train/00000.tar") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        images = {m.name: tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")}
    assert images == {
        "w0.jpg": JPGS[0],
        "w1.jpg": JPGS[1],
        "w2.jpg": JPGS[2],
        "w3.jpg": JPGS[3],
        "p0.jpg": JPGS[4],
        "p3.jpg": JPGS[5],
    }

    # The next night sees the same tars: only the one that failed is new to it (fingerprints are per tar).
    listed = choose_format(list_shards(Location.resolve("s3://wds/night/", config.storage)), None)[1]
    records = read_run_records(config.output.run_records_uri, config.storage)
    plan = plan_nightly(listed, records, dt.date(2026, 11, 2), config.hash(), force=False)
    assert [s.uri for s in plan.new] == ["s3://wds/night/00002.tar"]


def test_image_references_over_http_s3_and_relative_paths(s3, tiny_clip_dir, tmp_path):
    s3.create_bucket("pics")
    fs = s3.filesystem()
    for i in (0, 1):
        with fs.open_output_stream(f"pics/img/{i}.jpg") as out:
            out.write(JPGS[i])
    with ImageServer({"/a.jpg": JPGS[2], "/b.jpg": JPGS[3]}, slow_s=3.0) as server:
        uris = {
            "h-ok": f"{server.url}/a.jpg",
            "h-flaky": f"{server.url}/flaky/b.jpg",
            "h-404": f"{server.url}/x.jpg",
            "h-slow": f"{server.url}/slow/a.jpg",
            "s3-ok": "s3://pics/img/0.jpg",
            "rel-ok": "img/1.jpg",
            "s3-gone": "s3://pics/img/9.jpg",
        }
        table = pa.table({"key": list(uris), "caption": [f"picture {k}" for k in uris], "url": list(uris.values())})
        sink = io.BytesIO()
        pq.write_table(table, sink)
        with fs.open_output_stream("pics/refs/00000.parquet") as out:
            out.write(sink.getvalue())
        config = s3_config(
            s3,
            tiny_clip_dir,
            input={
                "uri": "s3://pics/refs/",
                "columns": {"image_uri": "url"},
                "fetch": {"base": "s3://pics", "timeout_s": 1.0, "retries": 1},
            },
            output={"uri": "s3://pics/out"},
            filter=ANY_SCORE,
            executor="in_process",
        )
        record = run_pipeline(config)
    rows = read_table(s3, "s3://pics/out")
    assert record.rows_in == 7 and record.status == "succeeded"
    assert {k for k, r in rows.items() if r[col.STATUS] == col.OK} == {"h-ok", "h-flaky", "s3-ok", "rel-ok"}
    assert {k: r[col.STATUS] for k, r in rows.items() if r[col.STATUS] != col.OK} == {
        "h-404": col.FETCH_ERROR,
        "h-slow": col.FETCH_ERROR,
        "s3-gone": col.FETCH_ERROR,
    }
    assert "HTTP 404" in rows["h-404"][col.ERROR] and "timed out" in rows["h-slow"][col.ERROR]
    assert record.rejected_by_reason[col.FETCH_ERROR] == 3
    assert rows["rel-ok"][col.IMAGE_SHA256] == hashlib.sha256(JPGS[1]).hexdigest()
