"""Small encoded images for tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    """Encode a PIL image to bytes."""
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def solid(color, size=(40, 30), mode="RGB") -> Image.Image:
    """A single-colour image."""
    return Image.new(mode, size, color)


def noise(size=(64, 48), seed=0) -> Image.Image:
    """A random RGB image (so resize and crop differences show)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
