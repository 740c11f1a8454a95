"""vlpipe export: shards read back with the real webdataset library and pyarrow, against the table and its inputs."""

from __future__ import annotations

import datetime as dt
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from deltalake import write_deltalake

from jobs.cli import main
from operators import schema as col
from operators.storage import Location, StorageOptions
from pipelines import hooks, logs
from pipelines.config import default_run_records_uri, validate_config
from pipelines.export.export import ExportRequest, export, split
from pipelines.export.files import MANIFEST, STATS, read_manifest
from pipelines.export.samples import image_ext, json_row, key_of, occurrences, sample_name
from pipelines.input.images import MissingSourceError
from pipelines.table.records import RunRecord, append_run_record
from tests.images import encode, noise
from tests.pipelines.conftest import s3_config

OCT31, NOV01 = dt.date(2026, 10, 31), dt.date(2026, 11, 1)
ODD_KEYS = ("a.b", "dir/x.y", "100%", "snow~man", "", "é")


# ---------------------------------------------------------------- pure parts, no Ray


def test_sample_names_survive_webdataset_key_rule_and_give_the_key_back():
    from webdataset.tariterators import base_plus_ext

    keys = [*ODD_KEYS, "000000001", "plain_key-2"]
    names = [sample_name(k, n) for k in keys for n in (0, 1, 2)]
    assert len(set(names)) == len(names)
    for key in keys:
        for n in (0, 1, 2):
            name = sample_name(key, n)
            assert "." not in name and "/" not in name
            assert base_plus_ext(f"{name}.jpg") == (name, "jpg")
            assert key_of(name) == key
    assert sample_name("000000001") == "000000001" and sample_name("a.b") == "a%2Eb"
    assert sample_name("a.b", 1) == "a%2Eb~1" and sample_name("") == "~0"


def test_occurrences_count_earlier_rows_with_the_same_key():
    assert occurrences(pa.array(["b", "a", "b", "c", "b", "a"])).tolist() == [0, 0, 1, 0, 2, 1]
    assert occurrences(pa.chunked_array([["x"], ["x", "y"]])).tolist() == [0, 1, 0]


def test_image_ext_from_the_bytes_signature():
    image = noise((16, 12))
    for fmt, ext in (
        ("JPEG", "jpg"),
        ("PNG", "png"),
        ("WEBP", "webp"),
        ("GIF", "gif"),
        ("BMP", "bmp"),
        ("TIFF", "tiff"),
    ):
        assert image_ext(encode(image, fmt)) == ext
    assert image_ext(b"%PDF-1.4 ...") == "bin" and image_ext(b"") == "bin"


def test_shards_are_full_but_the_last():
    assert split(25, 10) == [(0, 10), (10, 20), (20, 25)]
    assert split(20, 10) == [(0, 10), (10, 20)] and split(3, 10000) == [(0, 3)]


def test_json_rows_hold_plain_values():
    row = {
        "run_date": OCT31,
        "clip_score": float("nan"),
        "tag_scores": [("red", 0.5)],
        "keep": True,
        "duplicate_of": {"key": "k", "run_date": NOV01},
    }
    assert json.loads(json.dumps(json_row(row))) == {
        "run_date": "2026-10-31",
        "clip_score": None,
        "tag_scores": {"red": 0.5},
        "keep": True,
        "duplicate_of": {"key": "k", "run_date": "2026-11-01"},
    }


# ---------------------------------------------------------------- a table written by hand, keys of every kind


def _hand_rows(day: dt.date) -> list[dict]:
    """Odd keys, a key both days share, a selected caption, a rejected row, mixed image formats."""
    out = []
    for i, key in enumerate((*ODD_KEYS, "shared", f"{day:%m%d}-plain")):
        image = encode(noise((20 + i, 16), seed=i + day.day), ("JPEG", "PNG", "WEBP")[i % 3])
        out.append(
            {
                "key": key,
                "caption": f"caption {i} of {day}",
                "image": image,
                "keep": i != 2,
                "best": f"better caption {i}" if i % 2 else None,
                "embedding": [float(i), float(day.day), 1.0, 0.5],
            }
        )
    return out


@pytest.fixture(scope="module")
def hand_table(tmp_path_factory):
    """Two days' rows written as the pipeline commits them, source shards under each run's own column names."""
    root = tmp_path_factory.mktemp("export-hand")
    out, shards = root / "table", root / "shards"
    shards.mkdir()
    for day, names in (
        (OCT31, {"key": "key", "caption": "caption", "image": "jpg"}),
        (NOV01, {"key": "id", "caption": "text", "image": "image"}),
    ):
        rows, run_id = _hand_rows(day), f"run-{day}"
        for part, chunk in enumerate((rows[:4], rows[4:])):
            pq.write_table(
                pa.table(
                    {
                        names["key"]: [r["key"] for r in chunk],
                        names["caption"]: [r["caption"] for r in chunk],
                        names["image"]: [r["image"] for r in chunk],
                    }
                ),
                shards / f"{day}-{part}.parquet",
            )
        n = len(rows)
        written = {
            col.KEY: [r["key"] for r in rows],
            col.CAPTION: [r["caption"] for r in rows],
            col.SOURCE_SHARD: [str(shards / f"{day}-{int(i >= 4)}.parquet") for i in range(n)],
            col.STATUS: ["ok"] * n,
            col.CAPTION_BEST: [r["best"] for r in rows],
            col.IMAGE_EMBEDDING: [r["embedding"] for r in rows],
            col.TEXT_EMBEDDING: [r["embedding"][::-1] for r in rows],
            col.CLIP_SCORE: [0.25 + i / 100 for i in range(n)],
            col.KEEP: [r["keep"] for r in rows],
            col.REJECT_REASON: [None if r["keep"] else "low_clip_score" for r in rows],
            col.RUN_ID: [run_id] * n,
            col.RUN_DATE: [day] * n,
        }
        schema = col.output_schema()
        full = pa.table({f.name: written.get(f.name, pa.nulls(n, f.type)) for f in schema}, schema=schema)
        write_deltalake(str(out), full, mode="append", partition_by=[col.RUN_DATE])
        config = validate_config(
            {
                "input": {"uri": str(shards), "columns": names},
                "output": {"uri": str(out)},
                "clip": {"model": {"source": "org/clip"}},
                "run_date": day.isoformat(),
            }
        )
        at = dt.datetime.combine(day, dt.time(2), dt.timezone.utc)
        append_run_record(
            default_run_records_uri(str(out)),
            StorageOptions(),
            RunRecord(
                run_id=run_id,
                run_date=day,
                status="succeeded",
                started_at=at,
                finished_at=at,
                config_hash="h",
                config_json=json.dumps(config.public_dump()),
                output_uri=str(out),
                table_version=0,
            ),
        )
    rows = {
        (r["key"], day): {**r, "source": str(shards / f"{day}-{int(i >= 4)}.parquet")}
        for day in (OCT31, NOV01)
        for i, r in enumerate(_hand_rows(day))
    }
    return {"uri": str(out), "root": root, "shards": shards, "rows": rows}


@pytest.fixture
def cli():
    """``vlpipe``'s main; its log handler (on the test's captured stderr) is gone after the test."""
    yield main
    root = logging.getLogger()
    for handler in [h for h in root.handlers if any(isinstance(f, logs.RunIdFilter) for f in h.filters)]:
        root.removeHandler(handler)


def _samples(urls: list[str]) -> list[dict]:
    import webdataset as wds

    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def _export_order(rows: dict) -> list[tuple[str, dt.date]]:
    return sorted(rows, key=lambda kd: (kd[1], rows[kd]["source"], kd[0]))


@pytest.mark.slow
def test_odd_and_repeated_keys_are_samples_webdataset_reads_back_in_export_order(ray_cluster, hand_table, tmp_path):
    to = tmp_path / "wds"
    manifest = export(hand_table["uri"], str(to), ExportRequest(samples_per_shard=5, embeddings=True))
    kept = {kd: r for kd, r in hand_table["rows"].items() if r["keep"]}
    assert manifest.samples == len(kept) == 14 and [s.samples for s in manifest.shards] == [5, 5, 4]
    assert manifest.table_version == 1 and manifest.run_dates == (OCT31, NOV01)
    samples = _samples([str(to / f"{n:05d}.tar") for n in range(3)])
    records = [json.loads(s["json"]) for s in samples]
    assert [(r["key"], dt.date.fromisoformat(r["run_date"])) for r in records] == _export_order(kept)
    names = [s["__key__"] for s in samples]
    assert names.count("shared") == 1 and names.count("shared~1") == 1 and "a%2Eb" in names and "~0" in names
    for sample, record in zip(samples, records):
        row = kept[(record["key"], dt.date.fromisoformat(record["run_date"]))]
        assert key_of(sample["__key__"]) == record["key"]
        assert [sample[ext] for ext in ("jpg", "png", "webp") if ext in sample] == [row["image"]]
        assert sample["txt"].decode() == (row["best"] if row["best"] is not None else row["caption"])
        assert record["source_shard"] == row["source"] and record["keep"] is True
        assert col.IMAGE_EMBEDDING not in record and col.IMAGE_BYTES not in record
    for n in range(3):  # the shard's metadata and the clip-retrieval files: the tar's rows, in its order
        metadata = pq.read_table(to / f"{n:05d}.parquet")
        emb_metadata = pq.read_table(to / f"metadata/metadata_{n:05d}.parquet")
        assert (
            metadata.column("key").to_pylist()
            == emb_metadata.column("key").to_pylist()
            == [r["key"] for r in records[5 * n : 5 * n + 5]]
        )
        image, text = np.load(to / f"img_emb/img_emb_{n:05d}.npy"), np.load(to / f"text_emb/text_emb_{n:05d}.npy")
        days = [d.isoformat() for d in emb_metadata.column("run_date").to_pylist()]
        expected = [
            kept[(k, dt.date.fromisoformat(d))]["embedding"] for k, d in zip(emb_metadata["key"].to_pylist(), days)
        ]
        assert image.dtype == np.float32 and image.tolist() == expected and text.tolist() == [e[::-1] for e in expected]


@pytest.mark.slow
def test_a_failed_export_leaves_no_manifest_and_the_next_one_replaces_every_earlier_file(
    ray_cluster, hand_table, tmp_path, capsys, cli
):
    to = tmp_path / "wds"
    export(hand_table["uri"], str(to), ExportRequest(samples_per_shard=3, embeddings=True, all_rows=True))
    (to / "README.txt").write_text("the user's own file")
    assert (to / MANIFEST).exists() and (to / "00005.tar").exists()

    def dies(point):
        if point == "export:written":
            raise RuntimeError("killed after the shards")

    hooks.install(dies)
    try:
        with pytest.raises(RuntimeError, match="killed after the shards"):
            export(hand_table["uri"], str(to), ExportRequest(samples_per_shard=4))
    finally:
        hooks.install(None)
    assert not (to / MANIFEST).exists() and read_manifest(Location.resolve(str(to), StorageOptions())) is None

    gone = hand_table["shards"] / f"{NOV01}-1.parquet"
    moved = gone.rename(gone.with_suffix(".moved"))
    try:  # a task's failure ends the command with its one line and exit 4, and still no manifest
        assert cli(["-q", "export", hand_table["uri"], "--to", str(to), "--samples-per-shard", "20"]) == 4
    finally:
        moved.rename(gone)
    # The last line: a handler that an earlier test's CLI run left on its (now closed) captured stream may
    # print "--- Logging error ---" before it.
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"vlpipe: source shard {gone} is gone: 4 row(s) need their image from it; restore it, or export "
        "a table written with output.include_image_bytes"
    ), err
    assert not (to / MANIFEST).exists()

    manifest = export(hand_table["uri"], str(to), ExportRequest(samples_per_shard=8))
    files = sorted(str(p.relative_to(to)) for p in to.rglob("*") if p.is_file())
    assert files == sorted([MANIFEST, STATS, "README.txt", "00000.tar", "00000.parquet", "00001.tar", "00001.parquet"])
    assert read_manifest(Location.resolve(str(to), StorageOptions())) == manifest
    assert json.loads((to / STATS).read_text())["rows_per_shard"] == [8, 6]


@pytest.mark.slow
def test_an_earlier_version_and_chosen_run_dates_export_only_their_rows(ray_cluster, hand_table, tmp_path):
    def exported(request: ExportRequest) -> list[tuple[str, dt.date]]:
        to = tmp_path / "x"
        manifest = export(hand_table["uri"], str(to), request)
        records = [json.loads(s["json"]) for s in _samples([str(to / "00000.tar")])]
        assert manifest.samples == len(records)
        return [(r["key"], dt.date.fromisoformat(r["run_date"])) for r in records]

    kept = {kd: r for kd, r in hand_table["rows"].items() if r["keep"]}
    assert exported(ExportRequest(version=0)) == [kd for kd in _export_order(kept) if kd[1] == OCT31]
    assert exported(ExportRequest(run_dates=(NOV01,))) == [kd for kd in _export_order(kept) if kd[1] == NOV01]
    assert exported(ExportRequest(version=0, all_rows=True)) == [
        kd for kd in _export_order(hand_table["rows"]) if kd[1] == OCT31
    ]


def test_missing_rows_of_a_source_shard_are_named(hand_table):
    from pipelines.config import InputColumns
    from pipelines.input.images import ImageSource, source_images

    shard = Location.resolve(str(hand_table["shards"] / f"{OCT31}-0.parquet"), StorageOptions())
    found = source_images(shard, ImageSource(), {"a.b", "100%"})
    assert found == {k: hand_table["rows"][(k, OCT31)]["image"] for k in ("a.b", "100%")}
    with pytest.raises(MissingSourceError, match="lacks 1 of the 2 key"):
        source_images(shard, ImageSource(), {"a.b", "not-there"})
    with pytest.raises(MissingSourceError, match="has no column 'id'"):
        source_images(shard, ImageSource(columns=InputColumns(key="id")), {"a.b"})


def test_cli_refuses_what_it_cannot_export(hand_table, tmp_path, capsys, cli):
    assert cli(["export", str(tmp_path / "no-table"), "--to", str(tmp_path / "x")]) == 4
    assert "no Delta table at" in capsys.readouterr().err
    assert cli(["export", hand_table["uri"], "--to", str(tmp_path / "x"), "--samples-per-shard", "0"]) == 2
    assert "--samples-per-shard: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert cli(["export", hand_table["uri"], "--to", hand_table["uri"] + "/exports"]) == 2
    assert "inside the table" in capsys.readouterr().err
    assert cli(["export", hand_table["uri"], "--to", str(tmp_path / "x"), "--run-date", "2020-01-01"]) == 4
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- after real pipeline runs, on SeaweedFS


@pytest.fixture(scope="module")
def runs(ray_cluster, s3, s3_input, local_shards, tiny_clip_dir):
    """The tiny-CLIP run on the sample shards; and its table as output.include_image_bytes writes it, with
    source_shard pointing where nothing is (written here, not by a second run: ~10 s on 2 cores)."""
    from pipelines.run import run_pipeline
    from pipelines.table.read import read_output

    _, _, _, rows = local_shards
    s3.create_bucket("lake")
    s3.create_bucket("exports")
    # The tiny CLIP's scores say nothing: short captions are what the filter rejects, besides broken images.
    plain = run_pipeline(
        s3_config(
            s3,
            tiny_clip_dir,
            input={"extra_columns": ["url"]},
            output={"uri": "s3://lake/export-plain"},
            report={"enabled": False},
            filter={"min_clip_score": -1.0, "min_caption_words": 5},
            executor="in_process",  # the export runs on Ray; the run it exports need not
        )
    )
    storage = StorageOptions(
        endpoint_url=s3.endpoint_url,
        region=s3.region,
        access_key_id=s3.access_key_id,
        secret_access_key=s3.secret_access_key,
    )
    table = read_output(plain.output_uri, storage=storage)
    keys = table.column(col.KEY).to_pylist()
    schema = col.output_schema([table.schema.field("url")], include_image_bytes=True)
    columns = {
        col.IMAGE_BYTES: pa.array([rows[k]["jpg"] for k in keys], pa.binary()),
        col.SOURCE_SHARD: pa.array(
            [s.replace("s3://raw/crawl/", "s3://raw/gone/") for s in table.column(col.SOURCE_SHARD).to_pylist()]
        ),
    }
    with_bytes = pa.table(
        {f.name: columns.get(f.name, table.column(f.name) if f.name in table.column_names else None) for f in schema},
        schema=schema,
    )
    write_deltalake(
        "s3://lake/export-bytes", with_bytes, partition_by=[col.RUN_DATE], storage_options=s3.delta_storage_options()
    )
    return {"plain": plain, "storage": storage, "inputs": rows, "bytes_uri": "s3://lake/export-bytes"}


def _table(uri: str, storage: StorageOptions) -> dict[str, dict]:
    from pipelines.table.read import read_output

    return {r["key"]: r for r in read_output(uri, storage=storage).to_pylist()}


def _download(s3, prefix: str, to) -> None:
    pafs.copy_files(prefix, str(to), source_filesystem=s3.filesystem(), destination_filesystem=pafs.LocalFileSystem())


@pytest.mark.slow
def test_webdataset_export_on_s3_holds_the_kept_rows_input_bytes_and_embeddings(s3, runs, tmp_path):
    table = _table(runs["plain"].output_uri, runs["storage"])
    kept = {k: r for k, r in table.items() if r[col.KEEP]}
    assert 0 < len(kept) < len(table)
    manifest = export(
        runs["plain"].output_uri,
        "s3://exports/wds",
        ExportRequest(samples_per_shard=10, embeddings=True),
        storage=runs["storage"],
    )
    _download(s3, "exports/wds", tmp_path)
    tars = sorted(str(p) for p in tmp_path.glob("*.tar"))
    assert len(tars) == len(manifest.shards) == -(-len(kept) // 10)
    samples = _samples(tars)
    assert [json.loads(s["json"])["key"] for s in samples] == sorted(kept)  # one run date, one order: the key's
    for sample in samples:
        row = kept[sample["__key__"]]
        assert sample["jpg"] == runs["inputs"][row[col.KEY]]["jpg"]
        assert sample["txt"].decode() == (row[col.CAPTION_BEST] or row[col.CAPTION])
        record = json.loads(sample["json"])
        assert record["clip_score"] == pytest.approx(row[col.CLIP_SCORE]) and record["url"] == row["url"]
        assert (record["status"], record["run_date"], record["run_id"]) == ("ok", "2026-11-01", row[col.RUN_ID])
    image = np.concatenate([np.load(p) for p in sorted(tmp_path.glob("img_emb/*.npy"))])
    text = np.concatenate([np.load(p) for p in sorted(tmp_path.glob("text_emb/*.npy"))])
    keys = pa.concat_tables([pq.read_table(p) for p in sorted(tmp_path.glob("metadata/*.parquet"))])["key"].to_pylist()
    assert keys == sorted(kept)  # every kept row has both embeddings
    np.testing.assert_array_equal(image, np.array([kept[k][col.IMAGE_EMBEDDING] for k in keys], np.float32))
    np.testing.assert_array_equal(text, np.array([kept[k][col.TEXT_EMBEDDING] for k in keys], np.float32))
    totals = json.loads((tmp_path / STATS).read_text())
    assert (totals["samples"], totals["images"], totals["embedding_rows"]) == (len(kept),) * 3
    assert totals["shards"] == len(tars) and totals["image_bytes_from"] == {"table": 0, "source": len(kept)}
    assert totals["table_version"] == runs["plain"].table_version and totals["run_dates"] == ["2026-11-01"]
    assert read_manifest(Location.resolve("s3://exports/wds", runs["storage"])) == manifest


@pytest.mark.slow
def test_cli_exports_every_row_as_parquet_shards_with_the_input_bytes(s3, runs, monkeypatch, capsys, cli):
    for name, value in (
        ("AWS_ENDPOINT_URL", s3.endpoint_url),
        ("AWS_REGION", s3.region),
        ("AWS_ACCESS_KEY_ID", s3.access_key_id),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_access_key),
    ):
        monkeypatch.setenv(name, value)
    uri = runs["plain"].output_uri
    assert cli(["-q", "export", uri, "--to", "s3://exports/pq", "--format", "parquet", "--all-rows"]) == 0
    printed = capsys.readouterr().out
    assert f"export s3://exports/pq: {runs['plain'].rows_in} rows in 1 parquet shard(s)" in printed
    shard = pads.dataset("exports/pq", filesystem=s3.filesystem()).to_table()  # the folder is a Parquet dataset
    table = _table(uri, runs["storage"])
    assert shard.column("key").to_pylist() == sorted(table) and shard.num_rows == runs["plain"].rows_in
    for row in shard.to_pylist():
        source = runs["inputs"][row["key"]]["jpg"]
        assert row[col.EXPORT_IMAGE] == (source or None)  # an empty input image is a missing one
        assert row[col.KEEP] == table[row["key"]][col.KEEP] and row[col.STATUS] == table[row["key"]][col.STATUS]
    assert {r[col.REJECT_REASON] for r in shard.to_pylist()} > {None}
    assert col.IMAGE_EMBEDDING not in shard.column_names


@pytest.mark.slow
def test_a_table_with_image_bytes_exports_without_its_source_shards(s3, runs, tmp_path):
    kept = runs["plain"].rows_kept
    manifest = export(
        runs["bytes_uri"],
        "s3://exports/from-table",
        storage=runs["storage"],
        runs_uri=runs["plain"].output_uri + "/_vlpipe_runs",
    )
    assert manifest.samples == kept and sum(s.image_bytes_from.get("table", 0) for s in manifest.shards) == kept
    _download(s3, "exports/from-table", tmp_path)
    samples = _samples(sorted(str(p) for p in tmp_path.glob("*.tar")))
    assert {s["__key__"]: s["jpg"] for s in samples} == {
        k: runs["inputs"][k]["jpg"] for k, r in _table(runs["plain"].output_uri, runs["storage"]).items() if r["keep"]
    }
    assert json.loads(samples[0]["json"])["source_shard"].startswith("s3://raw/gone/")
