"""FetchImages without Ray: a real HTTP server on loopback and local files; failures are rows, not errors."""

from __future__ import annotations

import pyarrow as pa
import pytest

from operators import schema as col
from operators.input.fetch import FetchConfig, FetchImages
from operators.storage import StorageOptions
from tests.http_server import ImageServer
from tests.images import encode, noise

JPG = encode(noise(seed=3), "JPEG")


def fetch(uris, config=FetchConfig(), images=None) -> pa.Table:
    n = len(uris)
    table = pa.table(
        {
            col.IMAGE: pa.array(images or [None] * n, pa.binary()),
            col.IMAGE_URI: pa.array(uris, pa.string()),
            col.INPUT_STATUS: pa.nulls(n, pa.string()),
            col.INPUT_ERROR: pa.nulls(n, pa.string()),
        }
    )
    return FetchImages(config, StorageOptions())(table)


def test_http_images_are_fetched_and_failures_are_rows_with_the_reason():
    with ImageServer({"/a.jpg": JPG}, slow_s=2.0) as server:
        out = fetch(
            [
                f"{server.url}/a.jpg",
                f"{server.url}/gone.jpg",
                f"{server.url}/slow/a.jpg",
                f"{server.url}/flaky/a.jpg",
                None,
            ],
            FetchConfig(timeout_s=0.5, retries=1),
        )
        hits = dict(server.hits)
    assert out.column(col.IMAGE).to_pylist() == [JPG, None, None, JPG, None]
    statuses, errors = out.column(col.INPUT_STATUS).to_pylist(), out.column(col.INPUT_ERROR).to_pylist()
    assert statuses == [None, col.FETCH_ERROR, col.FETCH_ERROR, None, None]
    assert "HTTP 404" in errors[1] and "gone.jpg" in errors[1]
    assert "timed out after 0.5 s (after 2 tries)" in errors[2]
    assert hits["/gone.jpg"] == 1  # a 404 is final: never retried
    assert hits["/flaky/a.jpg"] == 2  # a 503 is retried


def test_paths_relative_to_the_base_and_file_uris(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(JPG)
    out = fetch(
        ["img/a.jpg", f"file://{tmp_path}/img/a.jpg", str(tmp_path / "img" / "a.jpg"), "img/none.jpg"],
        FetchConfig(base=str(tmp_path)),
    )
    assert out.column(col.IMAGE).to_pylist() == [JPG, JPG, JPG, None]
    assert out.column(col.INPUT_STATUS).to_pylist()[3] == col.FETCH_ERROR


def test_relative_references_without_a_base_say_what_to_set():
    out = fetch(["img/a.jpg"])
    assert "needs input.fetch.base" in out.column(col.INPUT_ERROR)[0].as_py()


def test_rows_that_have_bytes_or_a_status_already_are_left_alone():
    out = fetch(["/nowhere/a.jpg", "/nowhere/b.jpg"], images=[JPG, None])
    assert out.column(col.IMAGE).to_pylist()[0] == JPG and out.column(col.INPUT_STATUS).to_pylist() == [
        None,
        col.FETCH_ERROR,
    ]


def test_an_image_over_the_size_limit_is_refused(tmp_path):
    (tmp_path / "big.jpg").write_bytes(b"x" * 5000)
    out = fetch([str(tmp_path / "big.jpg")], FetchConfig(max_bytes=1000))
    assert "max_bytes" in out.column(col.INPUT_ERROR)[0].as_py()


@pytest.mark.parametrize("bad", [{"concurrency": 0}, {"timeout_s": 0}, {"nope": 1}])
def test_fetch_config_is_checked(bad):
    with pytest.raises(ValueError):
        FetchConfig(**bad)
