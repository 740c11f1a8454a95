"""Decode, validate and resize images on CPU into model-ready uint8 pixels."""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from operators import schema as col
from operators.image import hashes
from operators.resources import Resources
from operators.stage import Stage

_EXIF_ORIENTATION = 0x0112
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers MPO

# Headers of formats people find in image columns that we refuse to open, so the
# error can say what the bytes were rather than "not an image".
_SNIFF = (
    (b"%PDF", "PDF"),
    (b"%!PS", "PostScript/EPS"),  # Pillow's EPS plugin would hand these to Ghostscript
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"8BPS", "PSD"),
    (b"SIMPLE  =", "FITS"),
    (b"\x1f\x8b", "gzip"),
    (b"<svg", "SVG"),
    (b"<?xml", "XML/SVG"),
    (b"<!DOCTYPE html", "HTML"),
    (b"<!doctype html", "HTML"),
    (b"<html", "HTML"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
)


class PixelSpec(BaseModel):
    """The geometry a model's image processor applies, reproduced on CPU.

    ``shortest_edge`` resizes keeping aspect ratio (CLIP); ``longest_edge`` fits the image into
    a square of that side keeping aspect ratio and pads the rest with black at the bottom and right
    (OCR: text keeps its shape); otherwise ``resize`` is an exact (height, width) (SigLIP). ``crop``
    is a centre crop (height, width).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    shortest_edge: int | None = None
    longest_edge: int | None = None
    resize: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    resample: int = Image.Resampling.BICUBIC

    @property
    def out_size(self) -> tuple[int, int]:
        """(height, width) of the emitted pixels."""
        if self.crop:
            return self.crop
        if self.longest_edge:
            return self.longest_edge, self.longest_edge
        if self.resize:
            return self.resize
        raise ValueError("a shortest-edge resize without a crop has no fixed output size")

    @classmethod
    def from_processor_config(cls, raw: dict, image_size: int | None = None) -> PixelSpec | None:
        """The geometry from a saved ``preprocessor_config.json``, or None unless it states every part of it.

        ``save_pretrained`` writes every attribute a processor has: one that crops writes both
        ``do_center_crop`` and ``crop_size`` (BLIP's and ViT's have neither). A file that leaves a
        part out would get the processor class's default, which only transformers knows.
        """
        if raw.get("auto_map") or not isinstance(raw.get("resample"), int):
            return None
        if image_size:
            return cls(resize=(image_size, image_size), resample=raw["resample"] or 3)
        size, crop = raw.get("size"), raw.get("crop_size")
        if raw.get("do_resize") is not True or not isinstance(size, dict):
            return None
        cropping = raw.get("do_center_crop", False if crop is None else None)
        if not isinstance(cropping, bool):
            return None
        if cropping and not (isinstance(crop, dict) and {"height", "width"} <= set(crop)):
            return None
        crop_hw = (crop["height"], crop["width"]) if cropping else None
        if size.get("shortest_edge"):
            return cls(shortest_edge=size["shortest_edge"], crop=crop_hw, resample=raw["resample"])
        if size.get("height") and size.get("width"):
            return cls(resize=(size["height"], size["width"]), crop=crop_hw, resample=raw["resample"])
        return None

    @classmethod
    def from_image_processor(cls, processor) -> PixelSpec:
        """Read the geometry off a transformers image processor."""
        size = dict(processor.size) if processor.do_resize else {}
        crop = dict(processor.crop_size) if getattr(processor, "do_center_crop", False) else None
        resample = int(getattr(processor, "resample", None) or Image.Resampling.BILINEAR)
        if size.get("shortest_edge"):
            return cls(
                shortest_edge=size["shortest_edge"],
                crop=(crop["height"], crop["width"]) if crop else None,
                resample=resample,
            )
        if size.get("height") and size.get("width"):
            return cls(
                resize=(size["height"], size["width"]),
                crop=(crop["height"], crop["width"]) if crop else None,
                resample=resample,
            )
        raise ValueError(f"unsupported image processor size {size!r}")


class DecodeConfig(BaseModel):
    """How images are opened and checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    formats: tuple[str, ...] = Field(DEFAULT_FORMATS, validate_default=True)
    max_pixels: int = Field(64_000_000, ge=1)
    jpeg_draft: bool = True
    reducing_gap: float | None = Field(None, ge=1.0)
    keep_image_bytes: bool = False
    perceptual_hash: bool = False  # image_phash; on by itself with dedup.near
    # Half a CPU slot, at most one task per core (pipelines.execute.ray.task_concurrency): a model
    # actor's reserved CPU mostly waits (on its GPU, or on a small model), so decoding may use
    # that core too. With whole slots a 2-core node ran one decode task beside the CLIP actor:
    # 3.49 -> 2.28 s per 1k rows at 10k rows with the tiny CLIP.
    resources: Resources = Resources(num_cpus=0.5, num_gpus=0, batch_size=64)

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, formats: tuple[str, ...]) -> tuple[str, ...]:
        Image.init()  # registers every plugin, not only the handful Pillow preloads
        upper = tuple(f.upper() for f in formats)
        unknown = [f for f in upper if f not in Image.OPEN]
        if unknown:
            raise ValueError(f"unknown image formats {unknown}; Pillow knows {sorted(Image.OPEN)}")
        if "EPS" in upper:
            raise ValueError("EPS cannot be allowed: Pillow opens it by running Ghostscript on the file")
        return upper


class DecodeFailure(Exception):
    """One image could not be used; carries the row's status."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def decode_stage(
    config: DecodeConfig, pixels: PixelSpec, extra_pixels: Mapping[str, PixelSpec], geometries: Mapping[str, str]
) -> Stage:
    """The decode stage's contract: one pixel column per distinct model geometry."""
    adds = (col.STATUS, col.ERROR, col.IMAGE_WIDTH, col.IMAGE_HEIGHT, col.IMAGE_SHA256, col.PIXELS, *extra_pixels)
    adds += (col.IMAGE_PHASH,) if config.perceptual_hash else ()
    return Stage(
        name="decode",
        kind="task",
        config_key="decode",
        resources=config.resources,
        reads=(col.IMAGE, col.INPUT_STATUS, col.INPUT_ERROR),
        adds=adds + ((col.IMAGE_BYTES,) if config.keep_image_bytes else ()),
        build=partial(DecodeImages, config, pixels, extra_pixels=dict(extra_pixels)),
        details=tuple(f"{name} {text}" for name, text in geometries.items())
        + (f"formats {', '.join(config.formats)}", f"max_pixels {config.max_pixels:,}"),
    )


class DecodeImages:
    """Decode the image column into fixed-size uint8 RGB pixels (CPU, one task per batch).

    Appends ``status``, ``error``, ``image_width``, ``image_height`` and the internal
    ``_pixels`` column (fixed-size binary, H*W*3 bytes, null on failure). Drops the
    encoded image unless ``keep_image_bytes``. A bad image never raises.
    """

    def __init__(self, config: DecodeConfig, pixels: PixelSpec, *, extra_pixels: Mapping[str, PixelSpec] = {}):
        """``extra_pixels`` adds pixel columns at other models' geometries (e.g. a captioner's),
        cut from the same decoded image, so every image is opened once."""
        self.config = config
        self.pixels = pixels
        Image.init()
        self._formats = config.formats
        self._targets = {col.PIXELS: pixels, **extra_pixels}
        self._row_bytes = {name: _row_bytes(spec) for name, spec in self._targets.items()}

    def __call__(self, batch: pa.Table) -> pa.Table:
        images = batch.column(col.IMAGE)
        n = batch.num_rows
        statuses, errors = [col.OK] * n, [None] * n
        widths, heights = [None] * n, [None] * n
        buffers = {name: bytearray(size * n) for name, size in self._row_bytes.items()}
        digests, phashes = [None] * n, [None] * n
        valid = np.zeros(n, dtype=bool)
        failed = _input_failures(batch)
        for i, data in enumerate(_image_bytes(images)):
            digests[i] = hashes.image_sha256(data) if data else None
            if i in failed:
                statuses[i], errors[i] = failed[i]
                continue
            try:
                pixels, (widths[i], heights[i]) = self.decode_one(data)
            except DecodeFailure as failure:
                statuses[i], errors[i] = failure.status, str(failure)
                continue
            phashes[i] = pixels.pop(col.IMAGE_PHASH, None)
            for name, size in self._row_bytes.items():
                buffers[name][i * size : (i + 1) * size] = pixels[name]
            valid[i] = True
        validity = pa.py_buffer(np.packbits(valid, bitorder="little"))
        out = batch.drop_columns([c for c in (col.INPUT_STATUS, col.INPUT_ERROR) if c in batch.column_names])
        out = out if self.config.keep_image_bytes else out.drop_columns([col.IMAGE])
        if self.config.keep_image_bytes:
            out = out.set_column(out.schema.get_field_index(col.IMAGE), col.IMAGE_BYTES, _as_binary(images))
        out = (
            out.append_column(col.STATUS, pa.array(statuses, pa.string()))
            .append_column(col.ERROR, pa.array(errors, pa.string()))
            .append_column(col.IMAGE_WIDTH, pa.array(widths, pa.int32()))
            .append_column(col.IMAGE_HEIGHT, pa.array(heights, pa.int32()))
            .append_column(col.IMAGE_SHA256, pa.array(digests, pa.string()))
        )
        if self.config.perceptual_hash:
            out = out.append_column(col.IMAGE_PHASH, pa.array(phashes, pa.int64()))
        for name, size in self._row_bytes.items():
            array = pa.FixedSizeBinaryArray.from_buffers(pa.binary(size), n, [validity, pa.py_buffer(buffers[name])])
            out = out.append_column(name, array)
        return out

    def decode_one(self, data: bytes | None) -> tuple[dict[str, bytes], tuple[int, int]]:
        """Pixels (H*W*3 bytes) per output column and the upright (width, height) of one encoded image."""
        if not data:
            raise DecodeFailure(col.MISSING_IMAGE, "image is null or empty")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data), formats=self._formats) as image:
                    return self._to_pixels(image)
        except DecodeFailure:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise DecodeFailure(col.IMAGE_TOO_LARGE, str(err)) from None
        except UnidentifiedImageError:
            kind = _sniff(data)
            if kind:
                raise DecodeFailure(col.UNSUPPORTED_FORMAT, f"{kind} data is not an allowed image format") from None
            raise DecodeFailure(col.DECODE_ERROR, f"not a recognised image ({len(data)} bytes)") from None
        except Exception as err:  # Pillow raises many types for corrupt data; each costs one row.
            raise DecodeFailure(col.DECODE_ERROR, f"{type(err).__name__}: {err}") from None

    def _to_pixels(self, image: Image.Image) -> tuple[dict[str, bytes], tuple[int, int]]:
        width, height = image.size
        if width * height > self.config.max_pixels:
            raise DecodeFailure(
                col.IMAGE_TOO_LARGE, f"{width}x{height} exceeds the limit of {self.config.max_pixels} pixels"
            )
        if self.config.jpeg_draft and image.format in ("JPEG", "MPO"):
            # DCT scaling decodes at 1/2, 1/4 or 1/8 size; never below what the resize needs.
            needed = [_target_size(spec, width, height) for spec in self._targets.values()]
            image.draft("RGB", max(needed, key=lambda size: size[0] * size[1]))
        # Orientations 5-8 rotate by 90 degrees, so the upright size swaps.
        upright = (height, width) if image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else (width, height)
        rgb = _to_rgb(ImageOps.exif_transpose(image))
        pixels = {name: self._resize_and_crop(rgb, spec).tobytes() for name, spec in self._targets.items()}
        if self.config.perceptual_hash:
            pixels[col.IMAGE_PHASH] = hashes.phash(rgb)  # of the upright image: EXIF-rotated copies match
        return pixels, upright

    def _resize_and_crop(self, image: Image.Image, spec: PixelSpec) -> np.ndarray:
        new_w, new_h = _target_size(spec, *image.size)
        if spec.longest_edge:
            resized = image.resize((new_w, new_h), resample=spec.resample, reducing_gap=self.config.reducing_gap)
            square = np.zeros((spec.longest_edge, spec.longest_edge, 3), np.uint8)
            square[:new_h, :new_w] = np.asarray(resized, dtype=np.uint8)
            return square
        crop_h, crop_w = spec.crop or (new_h, new_w)
        if max(new_w, new_h) > 4 * max(crop_w, crop_h):
            # Extreme aspect ratios would build a huge intermediate; resize only the crop's source box.
            return _resize_box(image, (new_w, new_h), (crop_w, crop_h), spec.resample, self.config.reducing_gap)
        resized = image.resize((new_w, new_h), resample=spec.resample, reducing_gap=self.config.reducing_gap)
        array = np.asarray(resized, dtype=np.uint8)
        return _center_crop(array, crop_h, crop_w)


def _row_bytes(spec: PixelSpec) -> int:
    height, width = spec.out_size
    return height * width * 3


def _target_size(spec: PixelSpec, width: int, height: int) -> tuple[int, int]:
    """(width, height) after the resize step, before cropping."""
    if spec.longest_edge:
        return fitted_size(width, height, spec.longest_edge)
    if spec.shortest_edge:
        short = min(width, height)
        new_short, new_long = spec.shortest_edge, int(spec.shortest_edge * max(width, height) / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)
    return spec.resize[1], spec.resize[0]


def fitted_size(width: int, height: int, longest: int) -> tuple[int, int]:
    """(width, height) of an image fitted into a ``longest`` square, keeping its aspect ratio."""
    scale = longest / max(width, height)
    return max(1, min(longest, round(width * scale))), max(1, min(longest, round(height * scale)))


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white and high-bit-depth data scaled, not clipped."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.asarray(image)
        if image.mode.startswith("I;16"):
            scale = 255.0 / 65535.0  # by bit depth: a dark 16-bit image must stay dark
        else:  # 32-bit modes carry no depth; values above 255 can only be 16-bit data
            peak = float(array.max()) if array.size else 0.0
            scale = 255.0 / 65535.0 if peak > 255 else 1.0
        return Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), "L").convert("RGB")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _center_crop(array: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    height, width = array.shape[:2]
    if height >= crop_h and width >= crop_w:
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return array[top : top + crop_h, left : left + crop_w]
    padded = np.zeros((max(height, crop_h), max(width, crop_w), 3), dtype=np.uint8)
    top, left = (padded.shape[0] - height) // 2, (padded.shape[1] - width) // 2
    padded[top : top + height, left : left + width] = array
    return _center_crop(padded, crop_h, crop_w)


def _resize_box(image, new_size, crop_size, resample, reducing_gap) -> np.ndarray:
    (new_w, new_h), (crop_w, crop_h) = new_size, crop_size
    scale_x, scale_y = image.width / new_w, image.height / new_h
    left, top = (new_w - crop_w) // 2, (new_h - crop_h) // 2
    box = (left * scale_x, top * scale_y, (left + crop_w) * scale_x, (top + crop_h) * scale_y)
    resized = image.resize((crop_w, crop_h), resample=resample, box=box, reducing_gap=reducing_gap)
    return np.asarray(resized, dtype=np.uint8)


def _sniff(data: bytes) -> str | None:
    head = data[:64].lstrip()
    for magic, name in _SNIFF:
        if head.startswith(magic):
            return name
    return None


def decode_captions(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Captions as valid UTF-8 strings: invalid byte sequences become U+FFFD, never a failed batch.

    Crawlers that keep raw bytes write a binary caption column, and non-Arrow writers
    can put invalid UTF-8 into a string column; either would make the cast or the
    first ``to_pylist`` raise and cost the whole batch.
    """
    try:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            column.validate(full=True)  # Parquet readers do not check UTF-8
        return column.cast(pa.string())
    except pa.ArrowInvalid:
        raw = column.cast(pa.large_binary()).to_pylist()
        return pa.chunked_array(
            [pa.array([b if b is None else b.decode("utf-8", "replace") for b in raw], pa.string())]
        )


def _input_failures(batch: pa.Table) -> dict[int, tuple[str, str | None]]:
    """Row -> (status, error) where the input already says the image is unusable."""
    if col.INPUT_STATUS not in batch.column_names:
        return {}
    statuses = batch.column(col.INPUT_STATUS)
    if statuses.null_count == len(statuses):
        return {}
    errors = batch.column(col.INPUT_ERROR).to_pylist()
    return {i: (status, errors[i]) for i, status in enumerate(statuses.to_pylist()) if status is not None}


def _image_bytes(column: pa.ChunkedArray):
    """Encoded bytes per row from a binary column or a Hugging Face ``{bytes, path}`` struct."""
    if pa.types.is_struct(column.type):
        column = pc.struct_field(column, "bytes")
    return column.to_pylist()


def _as_binary(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_struct(column.type):
        column = pc.struct_field(column, "bytes")
    return column.cast(pa.binary())
