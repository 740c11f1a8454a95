"""ClipScorer on small Arrow tables, without Ray, against plain transformers."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from operators import schema as col
from operators.image.decode import DecodeConfig, DecodeImages
from operators.models.clip import ClipConfig, ClipScorer
from operators.refs import ModelRef
from operators.storage import StorageOptions
from tests.images import encode, noise
from tests.processors import reference_processor

CAPTIONS = ["a photo of a red circle", "a blue square on a grey background", "", None, "一只猫坐在垫子上"]


@pytest.fixture(scope="module")
def scorer(tiny_clip_dir) -> ClipScorer:
    return ClipScorer(ClipConfig(model=ModelRef(source=str(tiny_clip_dir))), StorageOptions())


def run(scorer: ClipScorer, images, captions, decode_config=DecodeConfig(jpeg_draft=False)) -> pa.Table:
    table = pa.table(
        {
            col.KEY: [str(i) for i in range(len(images))],
            col.CAPTION: pa.array(captions, pa.string()),
            col.IMAGE: pa.array(images, pa.binary()),
        }
    )
    return scorer(DecodeImages(decode_config, scorer.geometry)(table))


def reference_scores(model_dir, images, captions) -> np.ndarray:
    """Plain transformers: the model's own processor and forward, fp32."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = reference_processor(model_dir)
    inputs = processor(images=images, text=captions, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        out = model(**inputs)
    img = torch.nn.functional.normalize(out.image_embeds, dim=-1)
    txt = torch.nn.functional.normalize(out.text_embeds, dim=-1)
    return (img * txt).sum(-1).numpy()


def test_clip_score_matches_plain_transformers(scorer, tiny_clip_dir):
    images = [noise((64 + 9 * i, 48 + 5 * i), seed=i) for i in range(6)]
    captions = [f"a photo of a {c} circle" for c in ("red", "green", "blue", "yellow", "purple", "orange")]
    out = run(scorer, [encode(im, "PNG") for im in images], captions)
    expected = reference_scores(tiny_clip_dir, images, captions)
    # Same fp32 weights and identical uint8 pixels; only the folded rescale+normalise
    # (one multiply-add instead of two steps) reorders float rounding, ~1e-7 per pixel.
    np.testing.assert_allclose(out.column(col.CLIP_SCORE).to_numpy(), expected, atol=1e-5)


def test_fast_path_with_jpeg_draft_stays_close_to_the_reference(scorer, tiny_clip_dir):
    images = [noise((640, 480), seed=i).resize((80, 60)).resize((640, 480)) for i in range(4)]
    captions = ["a photo of a red circle"] * 4
    out = run(scorer, [encode(im, "JPEG", quality=95) for im in images], captions, DecodeConfig(jpeg_draft=True))
    expected = reference_scores(tiny_clip_dir, images, captions)
    # Draft mode decodes these at 1/8 scale with the JPEG's own DCT filter, so pixels
    # differ by a few levels and the score by a little; the worst case seen is asserted.
    assert np.abs(out.column(col.CLIP_SCORE).to_numpy() - expected).max() < 0.02


def test_embeddings_are_normalised_float32_and_missing_inputs_give_nulls(scorer):
    images = [encode(noise(seed=i)) for i in range(4)] + [b"broken"]
    out = run(scorer, images, CAPTIONS)
    image_emb = out.column(col.IMAGE_EMBEDDING)
    text_emb = out.column(col.TEXT_EMBEDDING)
    assert image_emb.type == pa.list_(pa.float32()) and text_emb.type == pa.list_(pa.float32())
    assert image_emb.to_pylist()[4] is None  # the broken image
    assert [v is None for v in text_emb.to_pylist()] == [False, False, True, True, False]
    assert [v is None for v in out.column(col.CLIP_SCORE).to_pylist()] == [False, False, True, True, True]
    for vector in image_emb.to_pylist()[:4] + [text_emb.to_pylist()[i] for i in (0, 1, 4)]:
        assert len(vector) == scorer.model.config.projection_dim
        assert abs(np.linalg.norm(vector) - 1.0) < 1e-5
    assert col.PIXELS in out.column_names and out.column(col.KEY).to_pylist() == ["0", "1", "2", "3", "4"]


def test_very_long_captions_are_truncated_not_errors(scorer):
    long_caption = "a red circle " * 20_000
    out = run(scorer, [encode(noise())], [long_caption])
    assert out.column(col.CLIP_SCORE)[0].is_valid


def test_geometry_mismatch_between_decode_and_model_is_a_clear_error(scorer):
    from operators.image.decode import PixelSpec

    table = pa.table({col.KEY: ["0"], col.CAPTION: ["x"], col.IMAGE: pa.array([encode(noise())], pa.binary())})
    decoded = DecodeImages(DecodeConfig(), PixelSpec(resize=(16, 16)))(table)
    with pytest.raises(ValueError, match="must use the same image geometry"):
        scorer(decoded)


def test_generated_captions_are_scored_in_the_same_text_pass(scorer, tiny_clip_dir):
    images = [noise(seed=i) for i in range(5)]
    originals = ["a photo of a red circle", "a blue square", "", None, "a green star"]
    generated = ["a photo of a red circle", "a yellow cross", "a purple diamond", "an orange star", None]
    table = pa.table(
        {
            col.KEY: [str(i) for i in range(5)],
            col.CAPTION: pa.array(originals, pa.string()),
            col.IMAGE: pa.array([encode(im, "PNG") for im in images], pa.binary()),
            col.CAPTION_GENERATED: pa.array(generated, pa.string()),
        }
    )
    out = scorer(DecodeImages(DecodeConfig(jpeg_draft=False), scorer.geometry)(table)).to_pydict()

    expected = reference_scores(tiny_clip_dir, images[:4], generated[:4])
    np.testing.assert_allclose(out[col.CLIP_SCORE_GENERATED][:4], expected, atol=1e-5)
    assert out[col.CLIP_SCORE_GENERATED][4] is None
    assert out[col.CLIP_SCORE_GENERATED][0] == pytest.approx(out[col.CLIP_SCORE][0], abs=1e-6)  # same text, same score
    assert col.CAPTION_BEST not in out  # choosing a caption is the selection stage's policy, not CLIP's


def colour_tags():
    """One tag per demo colour: positives name it with every shape, negatives every other colour."""
    from jobs.demo import PALETTE, SHAPES
    from operators.models.clip import TagConfig

    def prompts(colours):
        return [f"a photo of a {c} {s}" for c in colours for s in SHAPES]

    return {c: TagConfig(positives=prompts([c]), negatives=prompts([o for o in PALETTE if o != c])) for c in PALETTE}


def test_tag_scores_match_a_softmax_over_plain_transformers_logits(tiny_clip_dir):
    from transformers import CLIPModel

    from operators.models.clip import TagConfig

    tags = {
        "red": TagConfig(positives=["a red circle", "a red square"], negatives=["a blue circle", "a green star"]),
        "big": TagConfig(positives=["a large shape"], negatives=["a small shape"]),
    }
    scorer = ClipScorer(ClipConfig(model=ModelRef(source=str(tiny_clip_dir))), StorageOptions(), tags)
    images = [noise((40 + 7 * i, 50), seed=i) for i in range(4)]
    out = run(scorer, [encode(im, "PNG") for im in images] + [b"broken"], ["x"] * 5)
    got = out.column(col.TAG_SCORES)
    assert got.type == col.TAG_SCORES_TYPE and got.to_pylist()[4] is None

    model, processor = CLIPModel.from_pretrained(tiny_clip_dir).eval(), reference_processor(tiny_clip_dir)
    for name, tag in tags.items():
        prompts = [*tag.positives, *tag.negatives]
        with torch.inference_mode():
            logits = model(**processor(images=images, text=prompts, padding=True, return_tensors="pt")).logits_per_image
        expected = logits.softmax(dim=-1)[:, : len(tag.positives)].sum(-1).numpy()
        np.testing.assert_allclose([dict(row)[name] for row in got.to_pylist()[:4]], expected, atol=1e-5)


@pytest.mark.slow
def test_colour_tags_on_the_demo_clip_pick_the_right_colour(demo_models):
    from jobs.demo import PALETTE, SHAPES, make_sample_image

    scorer = ClipScorer(
        ClipConfig(model=ModelRef(source=str(demo_models["tiny-clip"]))), StorageOptions(), colour_tags()
    )
    rng = np.random.default_rng(3)
    colours = [list(PALETTE)[i % len(PALETTE)] for i in range(48)]
    images = [
        make_sample_image(SHAPES[int(rng.integers(len(SHAPES)))], c, size=int(rng.integers(48, 200)), rng=rng)
        for c in colours
    ]
    rows = run(scorer, [encode(im, "PNG") for im in images], ["x"] * len(images)).column(col.TAG_SCORES).to_pylist()
    picked = [max(row, key=lambda kv: kv[1])[0] for row in rows]
    # Chance is 1 in 6; the trained tiny CLIP gets about 0.95 of them.
    assert np.mean([p == c for p, c in zip(picked, colours)]) >= 0.75
    assert all(len(row) == len(PALETTE) for row in rows)


def test_a_non_finite_image_embedding_gives_null_scores_and_its_own_reason_not_a_crash(
    tiny_clip_dir, tiny_heads, monkeypatch
):
    from operators.decisions.filter import FilterConfig, ScoreFilter
    from operators.models.heads import HeadRef, HeadsConfig, HeadScorer

    scorer = ClipScorer(ClipConfig(model=ModelRef(source=str(tiny_clip_dir))), StorageOptions(), colour_tags())
    real = scorer.embed_images

    def overflowing(rows):  # what an fp16 overflow in the image tower looks like
        out = real(rows)
        out[1, 0] = np.inf
        out[2, :] = np.nan
        return out

    monkeypatch.setattr(scorer, "embed_images", overflowing)
    out = run(scorer, [encode(noise(seed=i)) for i in range(4)], ["a photo of a red circle"] * 4)
    heads = HeadScorer(HeadsConfig(**{n: HeadRef(source=str(d)) for n, d in tiny_heads.items()}), StorageOptions())
    decided = ScoreFilter(FilterConfig(min_aesthetic_score=-100.0))(heads(out))
    for name in (col.CLIP_SCORE, col.TAG_SCORES, col.AESTHETIC_SCORE, col.NSFW_SCORE):
        assert [v is None for v in decided.column(name).to_pylist()] == [False, True, True, False], name
    assert decided.column(col.REJECT_REASON).to_pylist() == [None, col.INVALID_EMBEDDING, col.INVALID_EMBEDDING, None]
