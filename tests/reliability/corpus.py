"""Hazardous inputs: the worst images and captions a crawl produces, each with the outcome users must see.

Every case is built here from Pillow/numpy (or by hand, where Pillow cannot write
the format), so the corpus needs no fixtures on disk. ``status`` is what decoding
must say; ``reject_reason`` is what the filter must say with no score threshold
(the image status first, then ``empty_caption``).
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from operators import schema as col

CAPTION = "a photo of a thing"


@dataclass(frozen=True)
class Case:
    name: str
    image: bytes | None
    status: str
    reject_reason: str | None
    caption: str | bytes | None = CAPTION
    # Upright RGB pixels the decoder must produce (same size as the image), or one colour for the whole image.
    expected: np.ndarray | tuple[int, int, int] | None = None
    tolerance: int = 0


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def pattern(width: int = 48, height: int = 24) -> np.ndarray:
    """An upright test card of six colour blocks (3 across, 2 down): every flip and rotation changes it."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    card = np.zeros((height, width, 3), np.uint8)
    for i, colour in enumerate(colours):
        row, column = divmod(i, 3)
        card[row * height // 2 : (row + 1) * height // 2, column * width // 3 : (column + 1) * width // 3] = colour
    return card


# How a camera stores an upright picture for each EXIF orientation, from the EXIF spec
# (row 0 / column 0 of the stored image), written with numpy so Pillow does not grade itself.
STORED_FOR_ORIENTATION = {
    2: lambda u: u[:, ::-1],  # mirrored left-right
    3: lambda u: u[::-1, ::-1],  # rotated 180
    4: lambda u: u[::-1, :],  # mirrored top-bottom
    5: lambda u: u.transpose(1, 0, 2),  # transposed (row 0 is the left column)
    6: lambda u: np.rot90(u, 1),  # needs 90 degrees clockwise to be upright
    7: lambda u: np.rot90(u, 2).transpose(1, 0, 2),  # transverse
    8: lambda u: np.rot90(u, -1),  # needs 90 degrees counter-clockwise to be upright
}


def exif_oriented_png(orientation: int) -> bytes:
    stored = np.ascontiguousarray(STORED_FOR_ORIENTATION[orientation](pattern()))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(stored), "PNG", exif=exif)


def _png(
    width: int, height: int, bit_depth: int, colour_type: int, raw: bytes | None, *, idat: bytes | None = None
) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB, nor a header that lies)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    data = idat if idat is not None else zlib.compress(raw)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def rgb48_png(colour16: tuple[int, int, int], size=(16, 8)) -> bytes:
    width, height = size
    row = b"\x00" + struct.pack(">HHH", *colour16) * width
    return _png(width, height, 16, 2, row * height)


def grey16(value: int, size=(16, 8)) -> Image.Image:
    return Image.fromarray(np.full((size[1], size[0]), value, np.uint16))


def decompression_bomb(side: int = 15_000) -> bytes:
    """A real, valid greyscale PNG of side x side pixels that compresses to a few hundred kB."""
    compressor = zlib.compressobj(9)
    row = bytes(side + 1)
    parts = [compressor.compress(row) for _ in range(side)]
    parts.append(compressor.flush())
    return _png(side, side, 8, 0, None, idat=b"".join(parts))


def lying_header(width: int = 9_000, height: int = 9_000) -> bytes:
    """81 Mpx by its header, a few dozen bytes in fact: under Pillow's bomb limit, over vlpipe's."""
    return _png(width, height, 8, 2, None, idat=zlib.compress(b"\x00" * 64))


def cmyk_jpeg(rgb=(255, 0, 0)) -> bytes:
    return encode(Image.new("RGB", (32, 32), rgb).convert("CMYK"), "JPEG", quality=95)


def ycck_jpeg(rgb=(255, 0, 0)) -> bytes:
    """A YCCK JPEG (Adobe APP14 transform 2), as Photoshop writes CMYK: built from a CMYK one.

    libjpeg turns YCCK into CMYK as C = 255 - R' etc., where R'G'B' are the YCbCr
    planes read as RGB; Adobe CMYK is stored inverted. So the planes hold the
    YCbCr of the stored (inverted) CMY, and K as stored; then the transform flag is set.
    """
    c, m, y, k = Image.new("RGB", (1, 1), rgb).convert("CMYK").getpixel((0, 0))
    stored = (255 - c, 255 - m, 255 - y, 255 - k)
    ycc = Image.new("RGB", (1, 1), tuple(255 - v for v in stored[:3])).convert("YCbCr").getpixel((0, 0))
    # Pillow writes CMYK inverted (Adobe style), so hand it the complement of what must land in the file.
    planes = Image.new("CMYK", (32, 32), tuple(255 - v for v in (*ycc, stored[3])))
    data = bytearray(encode(planes, "JPEG", quality=100))
    app14 = data.find(b"\xff\xee\x00\x0eAdobe")  # libjpeg marks every CMYK JPEG it writes
    assert app14 > 0 and data[app14 + 15] == 0, "expected an Adobe marker with transform 0 (CMYK)"
    data[app14 + 15] = 2
    return bytes(data)


def palette_png_with_transparency() -> bytes:
    image = Image.new("P", (16, 16), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (8, 0, 16, 16))  # right half red, left half transparent black
    return encode(image, "PNG", transparency=0)


def palette_expected() -> np.ndarray:
    out = np.full((16, 16, 3), 255, np.uint8)
    out[:, 8:] = (255, 0, 0)
    return out


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), c).convert("P") for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def psd(width: int = 4, height: int = 2) -> bytes:
    """A valid 8-bit RGB Photoshop file: Pillow's PSD plugin would open it if asked."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    return header + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + bytes(3 * width * height)


def eps() -> bytes:
    """An EPS file: opening it with Pillow's plugin would hand it to Ghostscript."""
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n%%EOF\n"


def fits() -> bytes:
    cards = [
        "SIMPLE  =                    T",
        "BITPIX  =                    8",
        "NAXIS   =                    2",
        "NAXIS1  =                    4",
        "NAXIS2  =                    4",
        "END",
    ]
    return "".join(c.ljust(80) for c in cards).ljust(2880).encode() + bytes(2880)


def corpus() -> list[Case]:
    """Every hazard, in a fixed order, with distinct names."""
    jpeg = encode(Image.fromarray(pattern()), "JPEG", quality=90)
    png = encode(Image.fromarray(pattern()), "PNG")
    red = (255, 0, 0)
    bad = [
        Case("null_image", None, col.MISSING_IMAGE, col.MISSING_IMAGE),
        Case("zero_bytes", b"", col.MISSING_IMAGE, col.MISSING_IMAGE),
        Case("random_bytes", np.random.default_rng(5).bytes(4096), col.DECODE_ERROR, col.DECODE_ERROR),
        Case("truncated_jpeg", jpeg[: len(jpeg) // 2], col.DECODE_ERROR, col.DECODE_ERROR),
        Case("truncated_png", png[: len(png) - 40], col.DECODE_ERROR, col.DECODE_ERROR),
        Case("gzip_named_jpeg", gzip.compress(jpeg), col.UNSUPPORTED_FORMAT, col.UNSUPPORTED_FORMAT),
        Case(
            "html_error_page",
            b"<!DOCTYPE html>\n<html><body><h1>403 Forbidden</h1></body></html>",
            col.UNSUPPORTED_FORMAT,
            col.UNSUPPORTED_FORMAT,
        ),
        Case("decompression_bomb", decompression_bomb(), col.IMAGE_TOO_LARGE, col.IMAGE_TOO_LARGE),
        Case("huge_dimensions_tiny_file", lying_header(), col.IMAGE_TOO_LARGE, col.IMAGE_TOO_LARGE),
        Case(
            "pdf",
            b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF",
            col.UNSUPPORTED_FORMAT,
            col.UNSUPPORTED_FORMAT,
        ),
        Case("fits", fits(), col.UNSUPPORTED_FORMAT, col.UNSUPPORTED_FORMAT),
        Case("psd", psd(), col.UNSUPPORTED_FORMAT, col.UNSUPPORTED_FORMAT),
        Case("eps", eps(), col.UNSUPPORTED_FORMAT, col.UNSUPPORTED_FORMAT),
        Case(
            "svg_text",
            b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>',
            col.UNSUPPORTED_FORMAT,
            col.UNSUPPORTED_FORMAT,
        ),
    ]
    good = [
        Case("one_by_one", encode(Image.new("RGB", (1, 1), red), "PNG"), col.OK, None, expected=red),
        Case("aspect_10000x10", encode(Image.new("RGB", (10_000, 10), red), "PNG"), col.OK, None, expected=red),
        Case("cmyk_jpeg", cmyk_jpeg(), col.OK, None, expected=red, tolerance=12),
        Case("ycck_jpeg", ycck_jpeg(), col.OK, None, expected=red, tolerance=12),
        Case("png_16bit_grey", encode(grey16(32768), "PNG"), col.OK, None, expected=(128, 128, 128), tolerance=1),
        Case("png_16bit_grey_dark", encode(grey16(200), "PNG"), col.OK, None, expected=(1, 1, 1), tolerance=1),
        Case("png_16bit_rgb", rgb48_png((65535, 32896, 0)), col.OK, None, expected=(255, 128, 0), tolerance=1),
        Case("tiff_16bit_grey", encode(grey16(16448), "TIFF"), col.OK, None, expected=(64, 64, 64), tolerance=1),
        Case("palette_png_transparency", palette_png_with_transparency(), col.OK, None, expected=palette_expected()),
        Case(
            "rgba_png",
            encode(Image.new("RGBA", (16, 16), (0, 0, 255, 0)), "PNG"),
            col.OK,
            None,
            expected=(255, 255, 255),
        ),
        Case(
            "la_png",
            encode(Image.new("LA", (16, 16), (0, 128)), "PNG"),
            col.OK,
            None,
            expected=(127, 127, 127),
            tolerance=1,
        ),
        Case("grayscale_png", encode(Image.new("L", (16, 16), 77), "PNG"), col.OK, None, expected=(77, 77, 77)),
        Case("animated_gif_first_frame", animated_gif(), col.OK, None, expected=red, tolerance=8),
        Case("webp", encode(Image.new("RGB", (16, 16), red), "WEBP", lossless=True), col.OK, None, expected=red),
        *(Case(f"exif_orientation_{o}", exif_oriented_png(o), col.OK, None, expected=pattern()) for o in range(2, 9)),
    ]
    image = encode(Image.new("RGB", (16, 16), (0, 128, 0)), "PNG")
    captions = [
        Case("caption_null", image, col.OK, col.EMPTY_CAPTION, caption=None),
        Case("caption_empty", image, col.OK, col.EMPTY_CAPTION, caption=""),
        Case("caption_whitespace", image, col.OK, col.EMPTY_CAPTION, caption=" \t\n\u3000 "),
        Case("caption_100kB", image, col.OK, None, caption=("a green square " * 7000)[:100_000]),
        Case("caption_non_latin", image, col.OK, None, caption="緑の四角 · مربع أخضر · зелёный квадрат 🟩"),
        Case("caption_invalid_utf8", image, col.OK, None, caption=b"caf\xe9 \xff\xfe green square"),
    ]
    return [*bad, *good, *captions]
