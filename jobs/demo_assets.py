"""Synthetic demo assets: a tiny real-architecture CLIP checkpoint and img2dataset-style Parquet shards."""

from __future__ import annotations

import io
import json
import math
import pathlib
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw, ImageFilter
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
PALETTE = {
    "red": (205, 35, 35),
    "green": (35, 155, 55),
    "blue": (35, 75, 210),
    "yellow": (235, 205, 35),
    "purple": (125, 45, 165),
    "orange": (240, 125, 25),
}
TEMPLATES = (
    "a photo of a {color} {shape}",
    "a {color} {shape} on a grey background",
    "a close-up photo of a {color} {shape}",
    "a picture of a {color} {shape}",
    "a {color} {shape}",
    "a blurry photo of a {color} {shape}",
    "a small {color} {shape} in the picture",
    "an image showing a large {color} {shape}",
    "there is a {color} {shape} in this photo",
    "a simple {color} {shape} drawn on a textured wall",
)
GENERIC_TEXT = """
the quick brown fox jumps over the lazy dog while a man walks with his cat and a woman reads a book
people sitting at a table in a restaurant eating food and drinking coffee near the window
a car parked on the street next to a tree in the city at night with lights and buildings
children playing with a ball in the park during a sunny day under the blue sky
an old house by the river with mountains in the background and snow on the ground
this is one of the best pictures i have ever taken of my family at the beach last summer
white black brown pink gray grey gold silver dark light bright colorful shiny round flat
"""
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Same normalisation and split as openai/clip (and transformers' CLIPTokenizer), so training matches inference.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
MAX_TEXT_LEN = 32
IMAGE_SIZE = 32
RECIPE_VERSION = 1
MARKER = "vlpipe_tiny.json"


def caption_for(shape: str, color: str, rng: np.random.Generator) -> str:
    """Return a caption for a `color` `shape` using a randomly chosen template."""
    text = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(color=color, shape=shape)
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _outline(shape: str) -> list[tuple[float, float]]:
    """Return the unit-radius polygon for `shape`."""
    if shape == "cross":
        a = 0.33
        return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]
    n, start, radii = {
        "circle": (48, 0.0, (1.0,)),
        "square": (4, 45.0, (1.0,)),
        "diamond": (4, 0.0, (1.0,)),
        "triangle": (3, -90.0, (1.0,)),
        "star": (10, -90.0, (1.0, 0.45)),
    }[shape]
    angles = [math.radians(start + 360.0 * k / n) for k in range(n)]
    return [(radii[k % len(radii)] * math.cos(t), radii[k % len(radii)] * math.sin(t)) for k, t in enumerate(angles)]


def make_sample_image(shape: str, color: str, *, size: int, rng: np.random.Generator) -> Image.Image:
    """Render a noisy photo-like RGB image of a `color` `shape` whose longer edge is `size` pixels."""
    short = max(8, int(size * rng.uniform(0.65, 1.0)))
    w, h = (size, short) if rng.random() < 0.5 else (short, size)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    theta = rng.uniform(0, 2 * math.pi)
    ramp = xx * math.cos(theta) + yy * math.sin(theta)
    ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-6)
    g0, g1 = rng.uniform(70, 190, size=2)
    background = (g0 + (g1 - g0) * ramp)[..., None] + rng.normal(0, 8, size=3)

    # The shape stays inside the central square so CLIP's centre crop never cuts it off.
    radius = rng.uniform(0.22, 0.4) * short
    cx, cy = np.array([w / 2, h / 2]) + rng.uniform(-1, 1, size=2) * (short / 2 - radius)
    rot = math.radians(rng.uniform(-12, 12))
    points = [
        (cx + radius * (x * math.cos(rot) - y * math.sin(rot)), cy + radius * (x * math.sin(rot) + y * math.cos(rot)))
        for x, y in _outline(shape)
    ]
    mask = Image.new("L", (w, h))
    ImageDraw.Draw(mask).polygon(points, fill=255)
    alpha = np.asarray(mask.filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float64)[..., None] / 255.0

    paint = np.asarray(PALETTE[color], dtype=np.float64) + rng.normal(0, 10, size=3)
    shading = (1.1 - 0.25 * ramp)[..., None]
    pixels = background * (1 - alpha) + paint * shading * alpha + rng.normal(0, 6, size=(h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _train_tokenizer() -> CLIPTokenizer:
    """Train a CLIP-style byte-level BPE on shape captions plus generic English and wrap it as a CLIPTokenizer."""
    bpe = Tokenizer(models.BPE(unk_token=EOS, continuing_subword_prefix="", end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    corpus = [t.format(color=c, shape=s) for t in TEMPLATES for s in SHAPES for c in PALETTE]
    corpus += GENERIC_TEXT.split("\n")
    trainer = trainers.BpeTrainer(vocab_size=1024, end_of_word_suffix="</w>", show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]

    # CLIP vocab layout: every byte symbol, bare and word-final, so no input ever maps to unk; then merges; then specials.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TEXT_LEN)


def _contrastive_train(model: CLIPModel, processor: CLIPProcessor, steps: int, seed: int) -> None:
    """Fit `model` with the CLIP loss on batches holding one synthetic image of every shape/colour pair."""
    rng = np.random.default_rng([seed, 1])
    pairs = [(s, c) for s in SHAPES for c in PALETTE]
    per_pair = 12
    images = [make_sample_image(s, c, size=int(rng.integers(40, 128)), rng=rng) for s, c in pairs for _ in range(per_pair)]
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    pixels = pixels.view(len(pairs), per_pair, 3, IMAGE_SIZE, IMAGE_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    model.train()
    for _ in range(steps):
        order = rng.permutation(len(pairs))
        variant = torch.from_numpy(rng.integers(per_pair, size=len(pairs)))
        text = processor.tokenizer(
            [caption_for(*pairs[i], rng) for i in order], padding=True, truncation=True, return_tensors="pt"
        )
        loss = model(**text, pixel_values=pixels[torch.from_numpy(order), variant], return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def build_tiny_clip(out_dir: pathlib.Path, *, train_steps: int = 0, seed: int = 0) -> pathlib.Path:
    """Build (or reuse a cached) tiny CLIPModel with a trained BPE tokenizer and save it to `out_dir`."""
    out_dir = pathlib.Path(out_dir)
    recipe = {"recipe_version": RECIPE_VERSION, "seed": seed, "train_steps": train_steps}
    marker = out_dir / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == recipe and (out_dir / "model.safetensors").is_file():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)

    tokenizer = _train_tokenizer()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    tower = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": MAX_TEXT_LEN,
            "projection_dim": 32,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**tower, "image_size": IMAGE_SIZE, "patch_size": 8, "projection_dim": 32},
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    if train_steps > 0:
        _contrastive_train(model, processor, train_steps, seed)

    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    # Written last so an interrupted build is never mistaken for a finished one.
    marker.write_text(json.dumps(recipe, indent=2) + "\n")
    return out_dir


def _broken_bytes(kind: int, jpeg: bytes, rng: np.random.Generator) -> bytes:
    """Return undecodable image bytes: a truncated JPEG, random noise, or nothing."""
    if kind == 0:
        return jpeg[: len(jpeg) // 3]
    if kind == 1:
        return rng.integers(0, 256, size=512, dtype=np.uint8).tobytes()
    return b""


def write_sample_shards(
    out_dir: pathlib.Path,
    *,
    num_shards: int = 3,
    rows_per_shard: int = 40,
    mismatch_fraction: float = 0.2,
    broken_per_shard: int = 2,
    seed: int = 0,
) -> list[pathlib.Path]:
    """Write img2dataset-style Parquet shards with planted mismatched, broken and empty-caption rows."""
    out_dir = pathlib.Path(out_dir)
    n_mismatched = round(mismatch_fraction * rows_per_shard)
    if broken_per_shard + 1 + n_mismatched > rows_per_shard:
        raise ValueError("rows_per_shard too small for the requested broken, empty-caption and mismatched rows")
    out_dir.mkdir(parents=True, exist_ok=True)
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("caption", pa.string()),
            ("jpg", pa.binary()),
            ("url", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
        ]
    )
    manifest: dict[str, list[str]] = {"mismatched_keys": [], "broken_keys": [], "empty_caption_keys": []}
    paths = []
    for shard in range(num_shards):
        rng = np.random.default_rng([seed, shard])
        roles = np.full(rows_per_shard, "ok", dtype=object)
        order = rng.permutation(rows_per_shard)
        roles[order[:broken_per_shard]] = "broken"
        roles[order[broken_per_shard]] = "empty"
        roles[order[broken_per_shard + 1 : broken_per_shard + 1 + n_mismatched]] = "mismatched"
        rows: dict[str, list] = {name: [] for name in schema.names}
        for i, role in enumerate(roles):
            key = f"{shard * rows_per_shard + i:09d}"
            shape, color = SHAPES[int(rng.integers(len(SHAPES)))], list(PALETTE)[int(rng.integers(len(PALETTE)))]
            image = make_sample_image(shape, color, size=int(rng.integers(48, 321)), rng=rng)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=int(rng.integers(75, 96)))
            jpeg = buffer.getvalue()
            caption = caption_for(shape, color, rng)
            if role == "mismatched":
                # Both attributes differ so the pair is unambiguously wrong, not merely a near miss.
                other_shape = str(rng.choice([s for s in SHAPES if s != shape]))
                other_color = str(rng.choice([c for c in PALETTE if c != color]))
                caption = caption_for(other_shape, other_color, rng)
            elif role == "empty":
                caption = ""
            elif role == "broken":
                jpeg = _broken_bytes(len(manifest["broken_keys"]) % 3, jpeg, rng)
            if role != "ok":
                manifest[{"mismatched": "mismatched_keys", "broken": "broken_keys", "empty": "empty_caption_keys"}[role]].append(key)
            for name, value in zip(
                schema.names, (key, caption, jpeg, f"https://example.com/images/{key}.jpg", *image.size)
            ):
                rows[name].append(value)
        path = out_dir / f"{shard:05d}.parquet"
        pq.write_table(pa.table(rows, schema=schema), path)
        paths.append(path)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return paths
