"""What the quality signals cost, measured on the operators themselves (no Ray), on pre-decoded rows.

- heads + tags: ``ClipScorer`` with zero-shot tags followed by ``HeadScorer`` (aesthetic + NSFW),
  as the CLIP step runs them fused, against ``ClipScorer`` alone; target: at most x1.05 the time.
- classifier: ``ImageClassifier`` against a bare ``AutoModelForImageClassification`` loop on the
  same decoded batches, already normalised on the device; target: at least 0.9x the throughput.

Both sides of a comparison run on the device the operators pick (a GPU where torch sees one),
alternately batch by batch, so load from other processes on a shared machine lands on both alike.
"""

from __future__ import annotations

import functools
import pathlib
import time
from contextlib import contextmanager

import pyarrow as pa

from benchmarks import models
from operators import schema as col
from operators.image.decode import DecodeConfig, DecodeImages, PixelSpec
from operators.refs import ModelRef
from operators.storage import StorageOptions
from operators.tensors import pixel_rows

HEADS = (("aesthetic", "aesthetic-v2"), ("nsfw", "nsfw"))


def _tags() -> dict:
    from operators.models.clip import TagConfig

    # The kind a curation config has: a handful of tags, a few prompts each.
    prompts = {
        "watermark": (("a photo with a watermark", "an image with a logo overlay"), ("a clean photo", "a plain image")),
        "text": (("a photo of text", "a screenshot of a document"), ("a photo without text", "a landscape photo")),
        "blurry": (("a blurry photo", "an out of focus image"), ("a sharp photo", "a crisp detailed image")),
        "product": (("a product photo on white", "an item for sale"), ("a street scene", "a photo of people")),
    }
    return {name: TagConfig(positives=p, negatives=n) for name, (p, n) in prompts.items()}


def signals(
    table: pa.Table, model_root: pathlib.Path, clip_dir: pathlib.Path, *, tiny: bool, clip_batch: int | None = None
) -> dict:
    """Both comparisons on the rows of ``table`` (``key``, ``caption``, ``jpg``)."""
    return {
        "heads_tags": heads_and_tags(table, model_root, clip_dir, clip_batch),
        "classifier": classifier(table, classifier_dir(model_root, tiny=tiny)),
    }


# ---------------------------------------------------------------- heads + tags


def heads_and_tags(table: pa.Table, model_root: pathlib.Path, clip_dir: pathlib.Path, batch: int | None) -> dict:
    from operators.models.clip import ClipConfig, ClipScorer, ZeroShotTags
    from operators.models.heads import HeadScorer

    config = ClipConfig(model=ModelRef(source=str(clip_dir)))
    batch = batch or config.resources.batch_size
    plain = ClipScorer(config, StorageOptions())
    dim = plain.model.config.projection_dim
    tags = _tags()
    setup: dict = {}
    with _timed(setup, "heads_load_s"):
        heads = HeadScorer(_heads_config(model_root, clip_dir, dim), StorageOptions())
    with _timed(setup, "tag_prompts_s"):
        ZeroShotTags(tags, plain.embed_texts, 1.0)  # what the tagged scorer adds to its start-up
    tagged = ClipScorer(config, StorageOptions(), tags)
    batches = decoded_batches(table, plain.geometry, batch)
    pairs = [(b, b) for b in batches]
    clip_s, with_s, outputs = paired(plain, lambda b: heads(tagged(b)), pairs, _sync(plain.device))
    heads_s, tags_s = _parts(heads, tagged.tags, outputs, dim)
    return {
        "model": str(clip_dir),
        "images": len(table),
        "batch_size": batch,
        "heads": [n for n, _ in HEADS],
        "tags": len(tags),
        "prompts": sum(len(t.positives) + len(t.negatives) for t in tags.values()),
        "clip_s": round(clip_s, 6),
        "with_signals_s": round(with_s, 6),
        "ratio": _round(with_s / clip_s),
        "heads_s": round(heads_s, 6),
        "tags_s": round(tags_s, 6),
        "ratio_from_parts": _round((clip_s + heads_s + tags_s) / clip_s),
        **setup,
    }


def _heads_config(model_root: pathlib.Path, clip_dir: pathlib.Path, dim: int):
    """Random-weight heads of the released architectures for this CLIP's embedding width, made once."""
    from jobs.demo.heads import build_random_head
    from operators.models.heads import HeadRef, HeadsConfig

    dirs = {
        name: build_random_head(model_root / f"heads-{dim}" / name, arch, embedding_dim=dim, clip_model=str(clip_dir))
        for name, arch in HEADS
    }
    return HeadsConfig(**{name: HeadRef(source=str(d)) for name, d in dirs.items()})


def _parts(heads, tags, outputs: list[pa.Table], dim: int) -> tuple[float, float]:
    """Heads and tags alone on the embeddings the paired run made: their cost free of the CLIP towers' noise."""
    from operators.tensors import embedding_rows

    heads_s = tags_s = 0.0
    for out in outputs:
        emb, usable = embedding_rows(out.column(col.IMAGE_EMBEDDING), dim, "bench")
        stripped = out.drop_columns([col.AESTHETIC_SCORE, col.NSFW_SCORE])  # so the heads can add them again
        start = time.perf_counter()
        heads(stripped)
        heads_s += time.perf_counter() - start
        start = time.perf_counter()
        tags(emb, usable)
        tags_s += time.perf_counter() - start
    return heads_s, tags_s


# ---------------------------------------------------------------- image classifier


def classifier_dir(root: pathlib.Path, *, tiny: bool = False) -> pathlib.Path:
    """A ViT image classifier (random weights; labels clean/watermark), built once under ``root``."""
    name = "tiny-vit-classifier" if tiny else "vit-base-classifier"
    return models._cached(root / name, name, functools.partial(_build_vit, tiny=tiny))


def _build_vit(out_dir: pathlib.Path, *, tiny: bool) -> None:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    labels = {0: "clean", 1: "watermark"}
    # Throughput depends on the architecture only: ViTConfig() is ViT-base/16 at 224 px, the size of the
    # public watermark and NSFW classifiers; the tiny one is the test suite's.
    size = (
        dict(
            image_size=24,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
        if tiny
        else {}
    )
    config = ViTConfig(**size, id2label=labels, label2id={v: k for k, v in labels.items()})
    ViTForImageClassification(config).eval().save_pretrained(out_dir)
    pixels = {"height": config.image_size, "width": config.image_size}
    ViTImageProcessor(size=pixels).save_pretrained(out_dir)


def classifier(table: pa.Table, model_dir: pathlib.Path) -> dict:
    import torch
    from transformers import AutoModelForImageClassification

    from operators.models.classify import ClassifierConfig, ImageClassifier

    config = ClassifierConfig(model=ModelRef(source=str(model_dir)), scores={"watermark": "watermark"})
    operator = ImageClassifier(config, StorageOptions(), col.PIXELS)
    model = AutoModelForImageClassification.from_pretrained(model_dir, dtype=operator.dtype).to(operator.device).eval()
    batch = config.resources.batch_size
    batches = decoded_batches(table, operator.geometry, batch)
    # The bare loop gets tensors already normalised on the device: the model alone, nothing else.
    tensors = [operator.to_device(pixel_rows(b.column(col.PIXELS), operator.geometry.out_size)) for b in batches]

    def bare(pixels):
        with torch.inference_mode():
            return model(pixel_values=pixels).logits

    operator_s, bare_s, _ = paired(operator, bare, list(zip(batches, tensors)), _sync(operator.device))
    n = len(table)
    return {
        "model": str(model_dir),
        "images": n,
        "batch_size": batch,
        "device": str(operator.device),
        "dtype": str(operator.dtype).removeprefix("torch."),
        "operator_s": round(operator_s, 6),
        "bare_s": round(bare_s, 6),
        "operator_images_per_s": _round(n / operator_s),
        "bare_images_per_s": _round(n / bare_s),
        "ratio": _round(bare_s / operator_s),
    }


# ---------------------------------------------------------------- helpers


def decoded_batches(table: pa.Table, spec: PixelSpec, batch: int) -> list[pa.Table]:
    """The rows as the decode step hands them to a model step: pixels at ``spec`` and the caption, ``batch`` a time."""
    decoded = DecodeImages(DecodeConfig(), spec)(table.select(["jpg"]).rename_columns([col.IMAGE]))
    rows = pa.table({col.PIXELS: decoded.column(col.PIXELS), col.CAPTION: table.column("caption")})
    return [rows.slice(start, batch) for start in range(0, rows.num_rows, batch)]


def paired(a, b, inputs: list[tuple], sync) -> tuple[float, float, list]:
    """Seconds of ``a`` and of ``b`` over ``(input_a, input_b)`` pairs, and ``b``'s outputs.

    Which goes first alternates per pair, so neither side always follows the other's cache state.
    """
    # First calls pay one-off costs (allocator, kernel choice): not timed.
    a(inputs[0][0])
    b(inputs[0][1])
    sync()
    seconds, outputs = [0.0, 0.0], []
    for i, pair in enumerate(inputs):
        for side in (0, 1) if i % 2 == 0 else (1, 0):
            start = time.perf_counter()
            out = (a, b)[side](pair[side])
            sync()
            seconds[side] += time.perf_counter() - start
            if side == 1:
                outputs.append(out)
    return seconds[0], seconds[1], outputs


def _sync(device):
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


@contextmanager
def _timed(result: dict, key: str):
    start = time.perf_counter()
    yield
    result[key] = round(time.perf_counter() - start, 4)


def _round(x: float) -> float:
    return float(f"{x:.4g}")
