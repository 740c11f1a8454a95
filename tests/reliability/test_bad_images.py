"""The hazard corpus through decode, filter and CLIP: every bad input is a row with a status, never a crash."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import ImageFile

from operators import schema as col
from operators.decisions.filter import FilterConfig, ScoreFilter
from operators.image.decode import DecodeConfig, DecodeImages, PixelSpec, decode_captions
from tests.reliability.corpus import CAPTION, Case, corpus

CASES = corpus()
BY_NAME = {case.name: case for case in CASES}
SOLID = PixelSpec(resize=(8, 8))


def spec_for(case: Case) -> PixelSpec:
    """Pixels at the upright size for a reference picture (no resampling), else a small square."""
    if isinstance(case.expected, np.ndarray):
        return PixelSpec(resize=case.expected.shape[:2])
    return SOLID


def caption_column(captions) -> pa.ChunkedArray:
    """Captions as a crawler that keeps raw bytes writes them: a binary column."""
    raw = [c.encode() if isinstance(c, str) else c for c in captions]
    return pa.chunked_array([pa.array(raw, pa.binary())])


def table_of(cases: list[Case]) -> pa.Table:
    return pa.table(
        {
            col.KEY: [c.name for c in cases],
            col.CAPTION: decode_captions(caption_column([c.caption for c in cases])),
            col.IMAGE: pa.array([c.image for c in cases], pa.binary()),
        }
    )


def decode_and_filter(cases: list[Case], spec: PixelSpec = SOLID) -> pa.Table:
    decoded = DecodeImages(DecodeConfig(), spec)(table_of(cases))
    # No CLIP here: the filter sees no scores, and no threshold is set, so only status and caption decide.
    return ScoreFilter(FilterConfig())(decoded.append_column(col.CLIP_SCORE, pa.nulls(len(cases), pa.float32())))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_hazard_gets_its_exact_status_and_reason(case):
    row = decode_and_filter([case], spec_for(case)).to_pylist()[0]
    assert (row[col.STATUS], row[col.REJECT_REASON]) == (case.status, case.reject_reason)
    assert row[col.KEEP] == (case.reject_reason is None)
    if case.status == col.OK:
        assert row[col.ERROR] is None and row[col.PIXELS] is not None
        assert row[col.IMAGE_WIDTH] >= 1 and row[col.IMAGE_HEIGHT] >= 1
    else:
        assert row[col.ERROR] and row[col.PIXELS] is None and row[col.IMAGE_WIDTH] is None


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.expected is not None], ids=[c.name for c in CASES if c.expected is not None]
)
def test_decoded_pixels_are_upright_and_the_right_colour(case):
    spec = spec_for(case)
    row = DecodeImages(DecodeConfig(), spec)(table_of([case])).to_pylist()[0]
    height, width = spec.out_size
    got = np.frombuffer(row[col.PIXELS], np.uint8).reshape(height, width, 3).astype(int)
    expected = np.broadcast_to(np.asarray(case.expected, int), got.shape)
    assert np.abs(got - expected).max() <= case.tolerance
    if isinstance(case.expected, np.ndarray):  # the reported size is the upright one too
        assert (row[col.IMAGE_WIDTH], row[col.IMAGE_HEIGHT]) == (width, height)


def test_the_whole_corpus_in_one_batch_loses_no_row_and_counts_add_up():
    out = decode_and_filter(CASES)
    assert out.column(col.KEY).to_pylist() == [c.name for c in CASES]  # every row, in order, once
    kept = sum(out.column(col.KEEP).to_pylist())
    rejected = Counter(r for r in out.column(col.REJECT_REASON).to_pylist() if r is not None)
    assert len(CASES) == kept + sum(rejected.values())
    assert rejected == Counter(c.reject_reason for c in CASES if c.reject_reason)
    widths = dict(zip(out.column(col.KEY).to_pylist(), out.column(col.IMAGE_WIDTH).to_pylist()))
    assert widths["aspect_10000x10"] == 10_000 and widths["one_by_one"] == 1


def test_format_errors_say_what_the_bytes_were():
    errors = dict(zip([c.name for c in CASES], decode_and_filter(CASES).column(col.ERROR).to_pylist()))
    for name, what in (
        ("pdf", "PDF"),
        ("psd", "PSD"),
        ("fits", "FITS"),
        ("eps", "EPS"),
        ("svg_text", "SVG"),
        ("gzip_named_jpeg", "gzip"),
        ("html_error_page", "HTML"),
    ):
        assert what in errors[name] and "not an allowed image format" in errors[name]
    assert "64000000 pixels" in errors["huge_dimensions_tiny_file"]
    assert "decompression bomb" in errors["decompression_bomb"]


def test_truncated_images_stay_errors_once_the_model_libraries_are_loaded():
    import transformers.image_utils  # noqa: F401

    import operators.models.clip  # noqa: F401  (what a worker imports before decoding)

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # True would turn half an image into grey "ok" pixels
    out = decode_and_filter([BY_NAME["truncated_jpeg"], BY_NAME["truncated_png"]])
    assert out.column(col.STATUS).to_pylist() == [col.DECODE_ERROR] * 2


def test_invalid_utf8_captions_are_repaired_in_binary_and_in_string_columns(tmp_path):
    bad = BY_NAME["caption_invalid_utf8"].caption
    expected = bad.decode("utf-8", "replace")
    assert decode_captions(caption_column([bad, None, "ok"])).to_pylist() == [expected, None, "ok"]
    # A non-Arrow writer can put invalid bytes into a UTF-8 column; Parquet readers do not check.
    pq.write_table(pa.table({"caption": pa.array([bad, b"ok"], pa.binary()).view(pa.string())}), tmp_path / "s.parquet")
    column = pq.read_table(tmp_path / "s.parquet").column("caption")
    with pytest.raises(UnicodeDecodeError):
        column.to_pylist()
    assert decode_captions(column).to_pylist() == [expected, "ok"]


def test_captions_through_clip_are_truncated_or_skipped_never_an_error(tiny_clip_dir):
    from operators.models.clip import ClipConfig, ClipScorer
    from operators.refs import ModelRef
    from operators.storage import StorageOptions

    scorer = ClipScorer(ClipConfig(model=ModelRef(source=str(tiny_clip_dir))), StorageOptions())
    cases = [c for c in CASES if c.name.startswith("caption_")]
    decoded = DecodeImages(DecodeConfig(), scorer.geometry)(table_of(cases))
    out = ScoreFilter(FilterConfig(min_clip_score=-1.0))(scorer(decoded))
    rows = {r[col.KEY]: r for r in out.to_pylist()}
    for case in cases:
        row = rows[case.name]
        assert row[col.REJECT_REASON] == case.reject_reason
        assert (row[col.CLIP_SCORE] is None) == (case.reject_reason == col.EMPTY_CAPTION)
        assert (row[col.TEXT_EMBEDDING] is None) == (case.reject_reason == col.EMPTY_CAPTION)
    assert "\ufffd" in rows["caption_invalid_utf8"][col.CAPTION]
    # 100 kB is cut to the model's context: the same embedding as any other text with those first tokens.
    long = BY_NAME["caption_100kB"].caption
    assert len(scorer.tokenizer(long)["input_ids"]) > scorer.max_text_tokens
    np.testing.assert_allclose(
        rows["caption_100kB"][col.TEXT_EMBEDDING], scorer.embed_texts([long[:2000]])[0], atol=1e-6
    )
    assert rows["caption_non_latin"][col.CAPTION] == BY_NAME["caption_non_latin"].caption


@pytest.mark.slow
def test_the_corpus_as_a_crawled_shard_end_to_end(tiny_clip_dir, tmp_path):
    from pipelines.config import validate_config
    from pipelines.run import run_pipeline
    from pipelines.table.read import read_output

    shard = pa.table(
        {
            "key": [c.name for c in CASES],
            "caption": caption_column([c.caption for c in CASES]),
            "jpg": pa.array([c.image for c in CASES], pa.binary()),
        }
    )
    (tmp_path / "in").mkdir()
    pq.write_table(shard, tmp_path / "in" / "00000.parquet")
    config = validate_config(
        {
            "input": {"uri": str(tmp_path / "in")},
            "clip": {"model": {"source": str(tiny_clip_dir)}},
            "output": {"uri": str(tmp_path / "out")},
            "executor": "in_process",
            "run_date": "2026-11-01",
        }
    )
    record = run_pipeline(config)

    rows = {r[col.KEY]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    assert sorted(rows) == sorted(c.name for c in CASES)
    for case in CASES:
        row = rows[case.name]
        assert (row[col.STATUS], row[col.REJECT_REASON]) == (case.status, case.reject_reason), case.name
        assert (row[col.ERROR] is None) == (case.status == col.OK)
    assert rows["caption_invalid_utf8"][col.CAPTION] == BY_NAME["caption_invalid_utf8"].caption.decode(
        "utf-8", "replace"
    )
    assert rows["one_by_one"][col.CAPTION] == CAPTION
    expected = Counter(c.reject_reason for c in CASES if c.reject_reason)
    assert record.rows_in == len(CASES) == record.rows_kept + record.rows_rejected
    assert record.rejected_by_reason == dict(expected) and record.rows_kept == sum(r[col.KEEP] for r in rows.values())
