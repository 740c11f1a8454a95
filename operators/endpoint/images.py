"""An image as the data URL a chat request carries: no larger than the configured longest side.

Image tokens grow with pixels, so a 4000-pixel photo can cost a VLM thousands of tokens that say
no more than a 1024-pixel one. An image already small enough, in a format every server reads, goes
as the input holds it, never re-encoded.
"""

from __future__ import annotations

import base64
import io

from PIL import Image, ImageOps

# Formats sent as they are (what the OpenAI API and vLLM accept as image_url data).
_AS_IS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}
_EXIF_ORIENTATION = 0x0112


def image_data_url(data: bytes, longest_side: int | None, image_format: str = "jpeg", quality: int = 90) -> str:
    """``data:<mime>;base64,...`` for encoded image bytes; a ``ValueError`` (from PIL) for bytes that are no image."""
    with Image.open(io.BytesIO(data)) as image:
        oriented = image.getexif().get(_EXIF_ORIENTATION, 1) in (1, None)
        small = longest_side is None or max(image.size) <= longest_side
        if image.format in _AS_IS and small and (oriented or longest_side is None):
            return _url(_AS_IS[image.format], data)
        upright = ImageOps.exif_transpose(image)
        upright = upright.convert("RGBA" if image_format == "png" and "A" in upright.getbands() else "RGB")
        if not small:
            upright.thumbnail((longest_side, longest_side), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    if image_format == "png":
        upright.save(out, "PNG")
    else:
        upright.save(out, "JPEG", quality=quality)
    return _url(f"image/{image_format}", out.getvalue())


def _url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
