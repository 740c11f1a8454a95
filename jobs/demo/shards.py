"""Sample data: photo-like images of coloured shapes, their captions, and img2dataset-style Parquet shards."""

from __future__ import annotations

import io
import json
import math
import pathlib
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

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


def caption_for(shape: str, color: str, rng: np.random.Generator) -> str:
    """Return a caption for a `color` `shape` using a randomly chosen template."""
    text = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(color=color, shape=shape)
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _outline(shape: str) -> list[tuple[float, float]]:
    """Return the unit-radius polygon for `shape`."""
    if shape == "cross":
        a = 0.33
        return [
            (-a, -1),
            (a, -1),
            (a, -a),
            (1, -a),
            (1, a),
            (a, a),
            (a, 1),
            (-a, 1),
            (-a, a),
            (-1, a),
            (-1, -a),
            (-a, -a),
        ]
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
    duplicates_per_shard: int = 0,
    seed: int = 0,
) -> list[pathlib.Path]:
    """Write img2dataset-style Parquet shards with planted mismatched, broken and empty-caption rows.

    ``duplicates_per_shard`` adds copies of earlier good rows under new keys, cycling through an
    exact copy, a JPEG re-encode at quality 30 and a half-size resize (``duplicate_pairs`` in the
    manifest: copy key, original key).
    """
    out_dir = pathlib.Path(out_dir)
    n_mismatched = round(mismatch_fraction * rows_per_shard)
    if broken_per_shard + 1 + n_mismatched > rows_per_shard:
        raise ValueError("rows_per_shard too small for the requested broken, empty-caption and mismatched rows")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, list] = {
        "mismatched_keys": [],
        "broken_keys": [],
        "empty_caption_keys": [],
        "duplicate_pairs": [],
    }
    paths = []
    for shard in range(num_shards):
        rng = np.random.default_rng([seed, shard])
        roles = _roles(rng, rows_per_shard, broken_per_shard, n_mismatched)
        rows: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
        for i, role in enumerate(roles):
            row = _sample_row(f"{shard * rows_per_shard + i:09d}", role, rng, manifest)
            for name, value in zip(SHARD_SCHEMA.names, row):
                rows[name].append(value)
        _plant_duplicates(rows, roles, duplicates_per_shard, manifest["duplicate_pairs"])
        path = out_dir / f"{shard:05d}.parquet"
        pq.write_table(pa.table(rows, schema=SHARD_SCHEMA), path)
        paths.append(path)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return paths


SHARD_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("caption", pa.string()),
        ("jpg", pa.binary()),
        ("url", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)
_MANIFEST_KEYS = {"mismatched": "mismatched_keys", "broken": "broken_keys", "empty": "empty_caption_keys"}


def _roles(rng: np.random.Generator, rows: int, broken: int, mismatched: int) -> np.ndarray:
    """Which rows of a shard are planted: ``broken`` bad images, one empty caption, ``mismatched`` captions."""
    roles = np.full(rows, "ok", dtype=object)
    order = rng.permutation(rows)
    roles[order[:broken]] = "broken"
    roles[order[broken]] = "empty"
    roles[order[broken + 1 : broken + 1 + mismatched]] = "mismatched"
    return roles


def _sample_row(key: str, role: str, rng: np.random.Generator, manifest: dict[str, list]) -> tuple:
    """One img2dataset-style row (key, caption, jpg, url, width, height) playing ``role``."""
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
        manifest[_MANIFEST_KEYS[role]].append(key)
    return (key, caption, jpeg, f"https://example.com/images/{key}.jpg", *image.size)


def _plant_duplicates(rows: dict[str, list], roles: np.ndarray, count: int, pairs: list) -> None:
    """Append ``count`` copies of the shard's first good rows: exact, re-encoded at q30, half size."""
    originals = [i for i, role in enumerate(roles) if role == "ok"][:count]
    for j, i in enumerate(originals):
        data = rows["jpg"][i]
        image = Image.open(io.BytesIO(data)).convert("RGB")
        if j % 3 == 1:
            data = _jpeg(image, quality=30)
        elif j % 3 == 2:
            image = image.resize((max(1, image.width // 2), max(1, image.height // 2)), Image.Resampling.LANCZOS)
            data = _jpeg(image, quality=90)
        key = f"{rows['key'][i]}-copy"
        for name, value in zip(
            rows, (key, rows["caption"][i], data, f"https://example.com/images/{key}.jpg", *image.size)
        ):
            rows[name].append(value)
        pairs.append([key, rows["key"][i]])


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
