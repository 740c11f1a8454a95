"""Vector index and search: built from a table written as the pipeline commits, checked against brute force."""

from __future__ import annotations

import datetime as dt
import json
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from deltalake import CommitProperties, DeltaTable, write_deltalake

from jobs.cli import main
from jobs.demo import build_tiny_clip
from operators import schema as col
from operators.image.decode import DecodeConfig, DecodeImages
from operators.models.clip import ClipConfig, ClipScorer
from operators.refs import ModelRef
from operators.storage import Location, StorageOptions
from pipelines.search import vectors as vi
from pipelines.search.files import MANIFEST, read_manifest
from pipelines.search.index import IndexRequest, build_index
from pipelines.search.query import Searcher
from tests.images import encode, noise, solid
from tests.processors import reference_processor

OCT31, NOV01 = dt.date(2026, 10, 31), dt.date(2026, 11, 1)
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
# The second day's shards do not use img2dataset's names: thumbnails must follow the run's own config.
NOV01_COLUMNS = {"key": "id", "caption": "text", "image": "image"}


def _rows(day: dt.date) -> list[tuple[str, str, bytes, bool]]:
    """(key, caption, JPEG, keep): noise and solid images, every fourth row rejected."""
    out = []
    for i in range(16):
        colour = ((30 * i + 50 * day.day) % 256, 90, 200 - 10 * i)
        image = noise((48 + i, 40), seed=100 * day.day + i) if i % 2 else solid(colour, (44, 36))
        out.append(
            (
                f"{day:%m%d}-{i:02d}",
                f"a photo of a {COLOURS[i % 8]} thing number {i}",
                encode(image, "JPEG"),
                i % 4 != 3,
            )
        )
    return out


@pytest.fixture(scope="module")
def table(tiny_clip_dir, tmp_path_factory):
    """Two days' rows with the tiny CLIP's embeddings (decode + ClipScorer, as the pipeline runs them), source
    shards of real JPEGs, commits that record the model as the pipeline's do, and the runs' records."""
    from pipelines.config import default_run_records_uri, validate_config
    from pipelines.table.records import RunRecord, append_run_record

    root = tmp_path_factory.mktemp("index")
    out, shards = root / "table", root / "shards"
    shards.mkdir()
    scorer = ClipScorer(ClipConfig(model=ModelRef(source=str(tiny_clip_dir))), StorageOptions())
    decode = DecodeImages(DecodeConfig(), scorer.geometry)
    for day, names in ((OCT31, {"key": "key", "caption": "caption", "image": "jpg"}), (NOV01, NOV01_COLUMNS)):
        rows, run_id, shard = _rows(day), f"run-{day}", shards / f"{day}.parquet"
        pq.write_table(
            pa.table(
                {
                    names["key"]: [r[0] for r in rows],
                    names["caption"]: [r[1] for r in rows],
                    names["image"]: [r[2] for r in rows],
                }
            ),
            shard,
        )
        scored = scorer(decode(pa.table({col.IMAGE: [r[2] for r in rows], col.CAPTION: [r[1] for r in rows]})))
        written = pa.table(
            {
                col.KEY: [r[0] for r in rows],
                col.CAPTION: [r[1] for r in rows],
                col.SOURCE_SHARD: [str(shard)] * 16,
                col.STATUS: scored.column(col.STATUS),
                col.IMAGE_EMBEDDING: scored.column(col.IMAGE_EMBEDDING),
                col.TEXT_EMBEDDING: scored.column(col.TEXT_EMBEDDING),
                col.CLIP_SCORE: scored.column(col.CLIP_SCORE),
                col.KEEP: [r[3] for r in rows],
                col.RUN_ID: [run_id] * 16,
                col.RUN_DATE: [day] * 16,
            }
        )
        full = pa.table(
            {
                f.name: written.column(f.name) if f.name in written.column_names else pa.nulls(16, f.type)
                for f in col.output_schema()
            },
            schema=col.output_schema(),
        )
        models = {"clip": {"source": str(tiny_clip_dir), "revision": None}}
        write_deltalake(
            str(out),
            full,
            mode="append",
            partition_by=[col.RUN_DATE],
            commit_properties=CommitProperties(
                custom_metadata={"vlpipe.run_id": run_id, "vlpipe.models": json.dumps(models)}
            ),
        )
        config = validate_config(
            {
                "input": {"uri": str(shards), "columns": names},
                "output": {"uri": str(out)},
                "clip": {"model": {"source": str(tiny_clip_dir)}},
                "run_date": day.isoformat(),
            }
        )
        started = dt.datetime.combine(day, dt.time(2), dt.timezone.utc)
        append_run_record(
            default_run_records_uri(str(out)),
            StorageOptions(),
            RunRecord(
                run_id=run_id,
                run_date=day,
                status="succeeded",
                started_at=started,
                finished_at=started,
                config_hash="h",
                config_json=json.dumps(config.public_dump()),
                output_uri=str(out),
                table_version=0,
                rows_in=16,
                rows_kept=12,
                rejected_by_reason={"low_clip_score": 4},
                rows_written=16,
                models=models,
            ),
        )
    return {"uri": str(out), "root": root, "images": {r[0]: r[2] for day in (OCT31, NOV01) for r in _rows(day)}}


@pytest.fixture(scope="module")
def flat(table):
    """An exact index over both days' image embeddings, built in this process."""
    uri = str(table["root"] / "flat-index")
    return uri, build_index(table["uri"], uri, IndexRequest(executor="local"))


def _kept(table_uri: str, column: str, dates=(OCT31, NOV01)) -> tuple[list[str], np.ndarray]:
    data = DeltaTable(table_uri).to_pyarrow_table(columns=[col.KEY, column, col.KEEP, col.RUN_DATE])
    rows = [r for r in data.to_pylist() if r[col.KEEP] and r[col.RUN_DATE] in dates]
    return [r[col.KEY] for r in rows], np.array([r[column] for r in rows], np.float32)


def _reference(model_dir, *, text: str | None = None, image: bytes | None = None) -> np.ndarray:
    """The query embedded by plain transformers (the model's own processor), normalised: brute force's side."""
    import io

    from PIL import Image
    from transformers import CLIPModel

    model, processor = CLIPModel.from_pretrained(model_dir).eval(), reference_processor(model_dir)
    with torch.inference_mode():
        if text is not None:
            features = model.get_text_features(**processor(text=[text], return_tensors="pt", padding=True))
        else:
            inputs = processor(images=[Image.open(io.BytesIO(image)).convert("RGB")], return_tensors="pt")
            features = model.get_image_features(**inputs)
    features = features if isinstance(features, torch.Tensor) else features.pooler_output
    return torch.nn.functional.normalize(features, dim=-1)[0].numpy()


def test_text_and_image_search_return_the_brute_force_top_k(table, flat, tiny_clip_dir):
    uri, manifest = flat
    assert manifest.index_type == "Flat" and manifest.count == 24  # 12 kept rows a day
    keys, vectors = _kept(table["uri"], col.IMAGE_EMBEDDING)
    searcher = Searcher(uri)
    query_key = "1101-05"
    for query in ({"text": "a photo of a red thing"}, {"image": table["images"][query_key]}):
        expected = vectors @ _reference(tiny_clip_dir, **query)
        order = np.argsort(-expected, kind="stable")[:10]
        found = searcher.search(**query, k=10)
        assert found.column("key").to_pylist() == [keys[i] for i in order]
        np.testing.assert_allclose(found.column("score").to_numpy(), expected[order], atol=1e-5)
        assert found.column("rank").to_pylist() == list(range(1, 11))
    assert searcher.search(image=table["images"][query_key], k=1).column("key").to_pylist() == [query_key]


def test_only_kept_rows_of_the_chosen_run_dates_are_indexed_and_the_manifest_says_what(table, tiny_clip_dir):
    uri = str(table["root"] / "text-index")
    manifest = build_index(table["uri"], uri, IndexRequest(embedding="text", run_dates=(NOV01,), executor="local"))
    stored = read_manifest(Location.resolve(uri, StorageOptions()))
    assert stored == manifest
    assert (stored.table_version, stored.run_dates, stored.embedding, stored.dim) == (1, (NOV01,), "text", 32)
    assert stored.model.source == str(tiny_clip_dir) and stored.model.revision is None
    assert set(stored.runs) == {f"run-{NOV01}"} and stored.runs[f"run-{NOV01}"].input_columns.key == "id"
    metadata = pq.read_table(f"{uri}/{stored.files.metadata}")
    keys, _vectors = _kept(table["uri"], col.TEXT_EMBEDDING, dates=(NOV01,))
    assert metadata.column(col.KEY).to_pylist() == keys and len(keys) == 12  # aligned with the faiss ids
    assert set(metadata.column(col.RUN_DATE).to_pylist()) == {NOV01}
    found = Searcher(uri).search(text="a photo of a blue thing number 2", k=30)
    assert found.num_rows == 12 and set(found.column("key").to_pylist()) == set(keys)
    assert found.column("key")[0].as_py() == "1101-02"  # its own caption is the nearest text
    assert sorted(p.name for p in (table["root"] / "text-index").iterdir()) == sorted(
        [MANIFEST, stored.files.index, stored.files.metadata]
    )


def test_an_earlier_table_version_indexes_the_rows_it_held(table, tmp_path):
    manifest = build_index(table["uri"], str(tmp_path / "v0"), IndexRequest(version=0, executor="local"))
    assert (manifest.table_version, manifest.count, set(manifest.runs)) == (0, 12, {f"run-{OCT31}"})
    assert {k[:4] for k in Searcher(str(tmp_path / "v0")).search(text="a thing", k=30).column("key").to_pylist()} == {
        "1031"
    }


def test_an_ivf_index_finds_the_exact_neighbours_of_most_queries():
    """A few thousand clustered unit vectors: the tuned IVF against exact search, as the build tunes it."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 64)).astype(np.float32)
    data = centres[rng.integers(0, 40, 4000)] + 0.6 * rng.normal(size=(4000, 64)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    queries = data[:200] + 0.5 * rng.normal(size=(200, 64)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    template = vi.train("IVF64,Flat", 64, data[:3200])
    assembler = vi.Assembler(template)
    for part in np.array_split(data, 5):  # parts encoded apart, as the blocks of a build are
        assembler.add(vi.Encoder(template)(part))
    tuning = vi.tune(assembler.index, {"image": data[:128], "text": queries[:128]})
    assert tuning.recall["text"] >= vi.TARGET_RECALL and tuning.params["nprobe"] < 64
    exact = np.argsort(-(queries[128:] @ data.T), axis=1)[:, :10]
    assert vi.recall_at_k(assembler.index.search(queries[128:], 10)[1], exact) >= 0.9


def test_the_index_is_chosen_by_size():
    assert vi.choose_index(49_999, 512).key == "Flat"
    assert vi.choose_index(100_000, 512).key == "IVF1024,Flat"
    assert vi.choose_index(5_000_000, 768).key == "IVF16384_HNSW32,Flat"  # 14.3 GiB: still uncompressed
    assert vi.choose_index(50_000_000, 768).key == "IVF65536_HNSW32,PQ64x8"
    assert vi.choose_index(200_000, 32, max_index_bytes=1 << 20).key == "IVF2048,PQ16x8"


def test_a_rebuild_replaces_the_index_whole_and_a_failed_one_leaves_it_as_it_was(table, tmp_path, monkeypatch):
    uri = tmp_path / "index"
    first = build_index(table["uri"], str(uri), IndexRequest(executor="local", run_dates=(OCT31,)))

    def full_disk(*args):
        raise OSError("No space left on device")

    monkeypatch.setattr("pipelines.search.index.write_faiss", full_disk)
    with pytest.raises(OSError, match="No space left"):
        build_index(table["uri"], str(uri), IndexRequest(executor="local", run_dates=(NOV01,)))
    assert read_manifest(Location.resolve(str(uri), StorageOptions())) == first  # its metadata file was removed
    assert sorted(p.name for p in uri.iterdir()) == sorted([MANIFEST, first.files.index, first.files.metadata])
    assert {k[:4] for k in Searcher(str(uri)).search(text="a thing", k=30).column("key").to_pylist()} == {"1031"}

    monkeypatch.undo()
    second = build_index(table["uri"], str(uri), IndexRequest(executor="local", run_dates=(NOV01,)))
    assert sorted(p.name for p in uri.iterdir()) == sorted([MANIFEST, second.files.index, second.files.metadata])
    assert {k[:4] for k in Searcher(str(uri)).search(text="a thing", k=30).column("key").to_pylist()} == {"1101"}


def test_rows_of_two_models_make_no_index():
    from pipelines.search.files import ModelRecord, RunSource
    from pipelines.search.index import MixedModelsError, _one_model

    a, b = ModelRecord(source="openai/clip-vit-base-patch32", revision="3d74acf"), ModelRecord(source="clip-b/32")
    assert _one_model({"r1", "r2"}, {"r1": RunSource(model=a), "r2": RunSource(model=a)}) == a
    with pytest.raises(MixedModelsError, match="different CLIP models") as mixed:
        _one_model({"r1", "r2"}, {"r1": RunSource(model=a), "r2": RunSource(model=b)})
    message = str(mixed.value)
    assert "clip-b/32: run(s) r2" in message and "clip-vit-base-patch32 @ 3d74acf: run(s) r1" in message
    with pytest.raises(MixedModelsError, match="rows of run\\(s\\) r2: neither their commit"):
        _one_model({"r1", "r2"}, {"r1": RunSource(model=a), "r2": RunSource()})


def test_a_faiss_key_that_cannot_be_built_in_parts_is_refused_before_any_work(table, tmp_path):
    from pipelines.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot be built in parts"):
        build_index(table["uri"], str(tmp_path / "i"), IndexRequest(index_key="HNSW32", executor="local"))
    assert not (tmp_path / "i").exists() or not any((tmp_path / "i").iterdir())


def test_vlpipe_search_html_shows_thumbnails_from_both_runs_shards(table, flat, tmp_path, capsys):
    uri, _ = flat
    page = tmp_path / "hits.html"
    assert main(["search", uri, "--text", "a photo of a green thing", "-k", "24", "--html", str(page)]) == 0
    printed = capsys.readouterr().out
    assert "text 'a photo of a green thing': top 24 of 24 image embeddings" in printed
    hits = _Images(page.read_text())
    assert len(hits.cards) == 24 and {key[:4] for key in hits.cards} == {"1031", "1101"}
    assert all(src.startswith("data:image/jpeg;base64,") for src in hits.cards.values())


def test_cli_exit_codes_for_a_missing_index_and_a_model_that_embeds_differently(table, flat, tmp_path, capsys):
    uri, _ = flat
    assert main(["search", str(tmp_path / "nothing"), "--text", "a car"]) == 4
    assert "no index at" in capsys.readouterr().err
    other = build_tiny_clip(tmp_path / "other-clip", seed=1)  # same architecture and width, other weights
    assert main(["search", uri, "--text", "a car", "--model", str(other)]) == 2
    assert "is not the model the index was built with" in capsys.readouterr().err
    assert main(["index", str(tmp_path / "no-table"), "--to", str(tmp_path / "i")]) == 4


@pytest.mark.slow
def test_a_build_on_ray_into_s3_equals_the_build_in_this_process(ray_cluster, s3, table, tmp_path):
    """Same sample (lowest key hashes), so the same trained lists and parameters; only the id order may differ."""
    s3.create_bucket("indexes")
    storage = StorageOptions(
        endpoint_url=s3.endpoint_url,
        region=s3.region,
        access_key_id=s3.access_key_id,
        secret_access_key=s3.secret_access_key,
    )
    places = {"ray": "s3://indexes/demo", "local": str(tmp_path / "local")}
    built = {
        executor: build_index(
            table["uri"], uri, IndexRequest(executor=executor, index_key="IVF4,Flat"), storage=storage
        )
        for executor, uri in places.items()
    }
    assert built["ray"].count == built["local"].count == 24 and built["ray"].train_rows == 24
    assert built["ray"].params == built["local"].params and built["ray"].recall_at_10 == built["local"].recall_at_10
    searchers = {executor: Searcher(uri, storage=storage) for executor, uri in places.items()}
    for text in ("a photo of a red thing", "a photo of a black thing number 7"):
        on_ray, local = (searchers[e].search(text=text, k=10) for e in ("ray", "local"))
        assert on_ray.column("key").to_pylist() == local.column("key").to_pylist()
        np.testing.assert_allclose(on_ray.column("score").to_numpy(), local.column("score").to_numpy(), atol=1e-6)
    assert sorted(i.base_name for i in s3.filesystem().get_file_info(pafs.FileSelector("indexes/demo"))) == sorted(
        [MANIFEST, built["ray"].files.index, built["ray"].files.metadata]
    )


class _Images(HTMLParser):
    """Each hit card's key and image source."""

    def __init__(self, text: str):
        super().__init__()
        self.cards, self._key = {}, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure":
            self._key = a["data-key"]
        elif tag == "img" and self._key:
            self.cards[self._key] = a["src"]
