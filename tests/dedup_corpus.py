"""Planted duplicates: a corpus of images whose duplicates are known, for the dedup tests and benchmark.

Each original is a photo-like synthetic scene (gradient, low-frequency texture, several shapes, grain).
Every original comes with copies made the way the web makes them (``TRANSFORMS``) and with ``similar``
distractors: scenes with the original's layout (and background, where that stays far enough) but other
shapes and colours, which are not duplicates. A group is an original with its copies; a distractor is a
group of its own. Every image is more than ``separation`` pHash bits from every image of another group,
checked while generating, so a near-duplicate threshold up to that distance finds only planted pairs,
whether the dedup links pairs greedily or by connected components. (Within a group anything goes: an
``hflip`` copy is as far from its original as an unrelated image.)

Everything is deterministic from the seed. Keys follow img2dataset (nine digits); rows are shuffled so
copies land away from their originals, as they do in a crawl.
"""

from __future__ import annotations

import io
import json
import math
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

from operators.image.hashes import hamming, phash

ORIGINAL = "original"
SIMILAR = "similar"
TRANSFORMS = ("exact", "jpeg_q30", "resize_50", "crop_90", "brightness", "hflip", "text_overlay")
JPEG_QUALITY = 90
SHARD_SCHEMA = pa.schema([("key", pa.string()), ("caption", pa.string()), ("jpg", pa.binary())])
_MAX_ATTEMPTS = 200  # draws per original or distractor before giving up on the separation
_KEEP_BACKDROP_ATTEMPTS = 20  # a distractor first keeps its original's background; failing that, restyles it too
# Not jobs.demo.shards' palette and outlines: importing the demo package loads transformers (seconds per test run).
PALETTE = {
    "red": (205, 35, 35),
    "green": (35, 155, 55),
    "blue": (35, 75, 210),
    "yellow": (235, 205, 35),
    "purple": (125, 45, 165),
    "orange": (240, 125, 25),
    "white": (240, 240, 235),
    "black": (20, 20, 25),
}
SIDES = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}
SHAPES = ("circle", "star", *SIDES)


@dataclass(frozen=True)
class PlantedImage:
    key: str
    image: bytes = field(repr=False)  # JPEG
    caption: str
    group: str | None  # key of the original this is a copy of; None for originals and distractors
    transform: str  # ORIGINAL, SIMILAR, or one of TRANSFORMS
    similar_to: str | None = None  # for a distractor: the original whose layout it shares


@dataclass(frozen=True)
class _Layout:
    """Where things are: shared by an original and its distractors."""

    width: int
    height: int
    angle: float
    shapes: tuple[tuple[float, float, float, float], ...]  # centre x, centre y, radius, rotation


@dataclass(frozen=True)
class _Scene:
    layout: _Layout
    background: tuple[tuple[float, ...], tuple[float, ...]]  # the gradient's two end colours (RGB)
    texture: tuple[tuple[float, float, float, float], ...]  # cycles across x, cycles down y, phase, amplitude
    shapes: tuple[tuple[str, str], ...]  # (shape, colour name) per layout slot

    def caption(self) -> str:
        names = [f"{_article(colour)} {colour} {shape}" for shape, colour in self.shapes]
        return f"a photo of {', '.join(names[:-1])} and {names[-1]}"


def planted_corpus(
    n_originals: int,
    seed: int = 0,
    *,
    similar_per_original: int = 1,
    separation: int = 10,
    transforms: Sequence[str] = TRANSFORMS,
    shuffle: bool = True,
) -> list[PlantedImage]:
    """Originals, their transformed copies and similar distractors, keyed in (shuffled) row order."""
    unknown = set(transforms) - set(TRANSFORMS)
    if unknown:
        raise ValueError(f"unknown transforms {sorted(unknown)}; known: {TRANSFORMS}")
    rng = np.random.default_rng(seed)
    taken = _Hashes()
    rows = []  # (origin index, transform, bytes, caption)
    for origin in range(n_originals):
        scene, (original, *copies) = _draw_apart(
            lambda _: _with_copies(_random_scene(rng), transforms, rng), taken, separation
        )
        rows.append((origin, ORIGINAL, original, scene.caption()))
        rows += [(origin, name, data, scene.caption()) for name, data in zip(transforms, copies)]
        for _ in range(similar_per_original):
            other, (similar,) = _draw_apart(
                lambda attempt, scene=scene: _with_copies(_similar(scene, attempt, rng), (), rng), taken, separation
            )
            rows.append((origin, SIMILAR, similar, other.caption()))
    order = rng.permutation(len(rows)) if shuffle else np.arange(len(rows))
    return _keyed([rows[position] for position in order])


def _keyed(rows: list[tuple[int, str, bytes, str]]) -> list[PlantedImage]:
    """Rows keyed by position, each copy and distractor pointing at its original's key."""
    keys = [f"{rank:09d}" for rank in range(len(rows))]
    original_key = {origin: key for key, (origin, transform, _, _) in zip(keys, rows) if transform == ORIGINAL}
    return [
        PlantedImage(
            key,
            data,
            caption,
            transform=transform,
            group=None if transform in (ORIGINAL, SIMILAR) else original_key[origin],
            similar_to=original_key[origin] if transform == SIMILAR else None,
        )
        for key, (origin, transform, data, caption) in zip(keys, rows)
    ]


def write_corpus_shards(
    items: Sequence[PlantedImage], out_dir: pathlib.Path, *, rows_per_shard: int = 1000
) -> list[pathlib.Path]:
    """img2dataset-style Parquet shards (key, caption, jpg) and a manifest.json of who copies whom."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, len(items), rows_per_shard)):
        chunk = items[start : start + rows_per_shard]
        table = pa.table(
            {"key": [i.key for i in chunk], "caption": [i.caption for i in chunk], "jpg": [i.image for i in chunk]},
            schema=SHARD_SCHEMA,
        )
        path = out_dir / f"{shard:05d}.parquet"
        pq.write_table(table, path)
        paths.append(path)
    truth = [{k: v for k, v in asdict(item).items() if k != "image"} for item in items]
    (out_dir / "manifest.json").write_text(json.dumps(truth, indent=1) + "\n")
    return paths


class _Hashes:
    """The pHashes of the groups drawn so far, in a buffer that grows by doubling."""

    def __init__(self):
        self._buffer = np.empty(1024, np.int64)
        self._size = 0

    def all_farther_than(self, separation: int, candidates: np.ndarray) -> bool:
        if not self._size:
            return True
        return int(hamming(self._buffer[: self._size, None], candidates[None, :]).min()) > separation

    def add(self, hashes: np.ndarray) -> None:
        if self._size + len(hashes) > len(self._buffer):
            self._buffer = np.concatenate([self._buffer, np.empty(max(len(self._buffer), len(hashes)), np.int64)])
        self._buffer[self._size : self._size + len(hashes)] = hashes
        self._size += len(hashes)


def _draw_apart(
    draw: Callable[[int], tuple[_Scene, list[bytes]]], taken: _Hashes, separation: int
) -> tuple[_Scene, list[bytes]]:
    """A group from ``draw(attempt)`` whose every image is more than ``separation`` bits from all of ``taken``."""
    for attempt in range(_MAX_ATTEMPTS):
        scene, images = draw(attempt)
        hashes = np.array([phash(Image.open(io.BytesIO(data))) for data in images], np.int64)
        if taken.all_farther_than(separation, hashes):
            taken.add(hashes)
            return scene, images
    raise RuntimeError(
        f"no group of images more than {separation} bits from the other groups' in {_MAX_ATTEMPTS} "
        "draws; lower the separation or the corpus size"
    )


def _with_copies(scene: _Scene, transforms: Sequence[str], rng: np.random.Generator) -> tuple[_Scene, list[bytes]]:
    """The scene as JPEG, followed by one copy per transform."""
    original = _jpeg(_render(scene, rng))
    return scene, [original, *(_TRANSFORMS[name](original) for name in transforms)]


def _random_scene(rng: np.random.Generator) -> _Scene:
    width, height = (256, int(rng.integers(176, 257))) if rng.random() < 0.5 else (int(rng.integers(176, 257)), 256)
    short = min(width, height)
    slots = []
    for _ in range(int(rng.integers(3, 6))):
        radius = short * rng.uniform(0.1, 0.28)
        slots.append(
            (
                rng.uniform(radius, width - radius),
                rng.uniform(radius, height - radius),
                radius,
                rng.uniform(0, 2 * math.pi),
            )
        )
    return _styled(_Layout(width, height, rng.uniform(0, 2 * math.pi), tuple(slots)), rng)


def _styled(layout: _Layout, rng: np.random.Generator) -> _Scene:
    """Colours, shapes and texture for a layout: a distractor is its original's layout styled again."""
    background = (tuple(rng.uniform(20, 235, size=3)), tuple(rng.uniform(20, 235, size=3)))
    texture = tuple(
        (rng.uniform(0.5, 4), rng.uniform(0.5, 4), rng.uniform(0, 2 * math.pi), rng.uniform(10, 35)) for _ in range(3)
    )
    shapes = tuple((str(rng.choice(SHAPES)), str(rng.choice(list(PALETTE)))) for _ in layout.shapes)
    return _Scene(layout, background, texture, shapes)


def _similar(scene: _Scene, attempt: int, rng: np.random.Generator) -> _Scene:
    """A hard negative: the original's layout, and its background while that can stay far enough, restyled."""
    styled = _styled(scene.layout, rng)
    if attempt < _KEEP_BACKDROP_ATTEMPTS:
        return _Scene(scene.layout, scene.background, scene.texture, styled.shapes)
    return styled


def _render(scene: _Scene, rng: np.random.Generator) -> Image.Image:
    layout = scene.layout
    yy, xx = np.mgrid[0 : layout.height, 0 : layout.width] / max(layout.width, layout.height)
    ramp = xx * math.cos(layout.angle) + yy * math.sin(layout.angle)
    ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-9)
    start, end = np.asarray(scene.background)
    pixels = start + (end - start) * ramp[..., None]
    for fx, fy, phase, amplitude in scene.texture:
        pixels += amplitude * np.sin(2 * math.pi * (fx * xx + fy * yy) + phase)[..., None]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for (cx, cy, radius, rotation), (shape, colour) in zip(layout.shapes, scene.shapes):
        fill = PALETTE[colour]
        if shape == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        elif shape == "star":
            points = [
                (cx + r * math.cos(rotation + k * math.pi / 5), cy + r * math.sin(rotation + k * math.pi / 5))
                for k, r in enumerate([radius, 0.45 * radius] * 5)
            ]
            draw.polygon(points, fill=fill)
        else:
            draw.regular_polygon((cx, cy, radius), SIDES[shape], rotation=math.degrees(rotation), fill=fill)
    # Soft edges and sensor grain, so JPEG and resizing behave as on photographs.
    image = image.filter(ImageFilter.GaussianBlur(0.8))
    grain = rng.normal(0, 5, (layout.height, layout.width, 3))
    return Image.fromarray(np.clip(np.asarray(image, np.float64) + grain, 0, 255).astype(np.uint8), "RGB")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _decoded(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def _resize_half(data: bytes) -> bytes:
    image = _decoded(data)
    return _jpeg(image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS))


def _crop_centre(data: bytes, keep: float = 0.9) -> bytes:
    image = _decoded(data)
    width, height = round(image.width * keep), round(image.height * keep)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return _jpeg(image.crop((left, top, left + width, top + height)))


def _text_overlay(data: bytes, text: str = "www.example.com  ·  all rights reserved") -> bytes:
    image = _decoded(data)
    font = ImageFont.load_default(size=max(10, image.height // 14))
    ImageDraw.Draw(image).text(
        (image.width // 20, image.height * 4 // 5),
        text,
        font=font,
        fill=(255, 255, 255),
        stroke_width=1,
        stroke_fill=(0, 0, 0),
    )
    return _jpeg(image)


_TRANSFORMS: dict[str, Callable[[bytes], bytes]] = {
    "exact": lambda data: data,
    "jpeg_q30": lambda data: _jpeg(_decoded(data), quality=30),
    "resize_50": _resize_half,
    "crop_90": _crop_centre,
    "brightness": lambda data: _jpeg(ImageEnhance.Brightness(_decoded(data)).enhance(1.1)),
    "hflip": lambda data: _jpeg(_decoded(data).transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
    "text_overlay": _text_overlay,
}
assert tuple(_TRANSFORMS) == TRANSFORMS
