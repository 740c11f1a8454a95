"""Real photographs and text-heavy images for the demo, so its OCR and NSFW columns mean something.

The photographs are scikit-image's bundled ones (``skimage.data``: CC0 or public domain, per its
docs), each with a caption saying what it shows. The text cards are rendered here, in Pillow's
bundled font: a sale banner, a sign, a screenshot-like page and a watermarked photo, the kinds of
image that LAION- and DataComp-style recipes drop or caption differently.
"""

from __future__ import annotations

import io
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from jobs.demo.shards import SHARD_SCHEMA

PHOTOS = {
    "astronaut": "an astronaut in a white space suit in front of a flag",
    "chelsea": "a tabby cat looking to the side",
    "coffee": "a cup of coffee on a saucer",
    "rocket": "a rocket on its launch pad",
    "camera": "a black and white photo of a man with a camera on a tripod",
    "hubble_deep_field": "galaxies in deep space",
    "coins": "old coins on a table",
    "page": "a page of printed text about image segmentation",
}
# name -> (caption, the text on the card)
TEXT_CARDS = {
    "sale": ("a summer sale banner", "SUMMER SALE\n50% OFF everything"),
    "sign": ("a welcome sign of a cafe", "Welcome to the\nMountain Trail Cafe"),
    "terms": (
        "a screenshot of terms and conditions",
        "Terms and Conditions\n1. Offer valid until\nthe end of the month.\n2. Not valid with other offers.",
    ),
}
WATERMARK = ("chelsea", "a tabby cat, stock photo", "SAMPLE\nstockphotos")
FIRST_KEY = 900_000_000  # apart from the shape shards' keys


def write_demo_photos(path: pathlib.Path) -> list[str]:
    """One Parquet shard of the photographs, the text cards and a watermarked photo; their keys."""
    from skimage import data  # a demo and test dependency (vlpipe[demo]), not the pipeline's

    images = {name: (caption, _rgb(getattr(data, name)())) for name, caption in PHOTOS.items()}
    for name, (caption, text) in TEXT_CARDS.items():
        images[f"card-{name}"] = (caption, text_card(text))
    photo, caption, mark = WATERMARK
    images[f"watermarked-{photo}"] = (caption, watermarked(_rgb(getattr(data, photo)()), mark))
    rows = [_row(FIRST_KEY + i, name, caption, image) for i, (name, (caption, image)) in enumerate(images.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), path)
    return [row["key"] for row in rows]


def text_card(text: str, size: tuple[int, int] = (800, 360), font_size: int = 52) -> Image.Image:
    """Dark text on a light card."""
    image = Image.new("RGB", size, (250, 248, 240))
    font = ImageFont.load_default(size=font_size)
    ImageDraw.Draw(image).multiline_text((24, 24), text, fill=(20, 20, 30), font=font, spacing=12)
    return image


def watermarked(photo: Image.Image, mark: str) -> Image.Image:
    """``photo`` with ``mark`` across it in large translucent white letters, as stock photos carry."""
    overlay = Image.new("RGBA", photo.size, (0, 0, 0, 0))
    font = ImageFont.load_default(size=photo.height // 5)
    ImageDraw.Draw(overlay).multiline_text((20, photo.height // 6), mark, fill=(255, 255, 255, 170), font=font)
    return Image.alpha_composite(photo.convert("RGBA"), overlay).convert("RGB")


def _rgb(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array).convert("RGB")


def _row(key: int, name: str, caption: str, image: Image.Image) -> dict:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=92)
    return {
        "key": f"{key:09d}",
        "caption": caption,
        "jpg": out.getvalue(),
        "url": f"https://example.org/demo/{name}.jpg",
        "width": image.width,
        "height": image.height,
    }
