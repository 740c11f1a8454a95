"""DecodeImages on small Arrow tables, without Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from operators import schema as col
from operators.image.decode import DecodeConfig, DecodeImages, PixelSpec
from tests.images import encode, noise, solid

SPEC = PixelSpec(shortest_edge=32, crop=(32, 32))


def decode(images, config: DecodeConfig = DecodeConfig(), spec: PixelSpec = SPEC, image_type=pa.binary()):
    table = pa.table({col.KEY: [str(i) for i in range(len(images))], col.IMAGE: pa.array(images, image_type)})
    return DecodeImages(config, spec)(table)


def pixels(out: pa.Table, row: int, size=(32, 32)) -> np.ndarray:
    return np.frombuffer(out.column(col.PIXELS)[row].as_py(), np.uint8).reshape(*size, 3)


def test_good_and_bad_rows_in_one_batch_each_get_their_own_status():
    out = decode([encode(noise(), "JPEG"), b"", None, b"\x89PNG\r\n\x1a\n garbage", encode(noise(seed=1))])
    assert out.column(col.STATUS).to_pylist() == [
        col.OK,
        col.MISSING_IMAGE,
        col.MISSING_IMAGE,
        col.DECODE_ERROR,
        col.OK,
    ]
    errors = out.column(col.ERROR).to_pylist()
    assert errors[0] is None and errors[4] is None
    assert all(errors[i] for i in (1, 2, 3))
    assert out.column(col.PIXELS).null_count == 3
    assert out.column(col.KEY).to_pylist() == ["0", "1", "2", "3", "4"]
    assert col.IMAGE not in out.column_names  # encoded bytes do not travel on to the GPU stage


def test_pixels_match_the_transformers_processor_geometry():
    # The Pillow backend, as vlpipe: see tests/processors.py for the torchvision one.
    from transformers import CLIPImageProcessorPil

    image = noise((90, 50))
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_rescale=False, do_normalize=False
    )
    expected = np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0]).transpose(1, 2, 0)
    out = decode([encode(image)], spec=PixelSpec.from_image_processor(processor))
    np.testing.assert_array_equal(pixels(out, 0), expected.astype(np.uint8))
    assert out.column(col.IMAGE_WIDTH)[0].as_py() == 90 and out.column(col.IMAGE_HEIGHT)[0].as_py() == 50


def test_transparency_is_composited_on_white():
    transparent_red = solid((255, 0, 0, 0), mode="RGBA")
    out = decode([encode(transparent_red)])
    assert (pixels(out, 0) == 255).all()


def test_exif_rotation_comes_out_upright():
    stored = Image.new("RGB", (40, 20))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the left half becomes the top
    out = decode([encode(stored, "PNG", exif=exif)], spec=PixelSpec(resize=(40, 20)))
    assert (out.column(col.IMAGE_WIDTH)[0].as_py(), out.column(col.IMAGE_HEIGHT)[0].as_py()) == (20, 40)
    upright = pixels(out, 0, size=(40, 20))
    assert upright[5, 10].tolist() == [255, 0, 0]
    assert upright[35, 10].tolist() == [0, 0, 255]


def test_cmyk_jpeg_colours_are_not_inverted():
    red_cmyk = solid((255, 0, 0)).convert("CMYK")
    out = decode([encode(red_cmyk, "JPEG", quality=95)])
    r, g, b = pixels(out, 0)[16, 16].tolist()
    assert r > 200 and g < 60 and b < 60


def test_sixteen_bit_grey_is_scaled_not_clipped():
    grey16 = Image.fromarray(np.full((30, 40), 32768, dtype=np.uint16))
    assert grey16.mode.startswith("I")
    out = decode([encode(grey16)])
    assert abs(int(pixels(out, 0)[10, 10, 0]) - 128) <= 1


def test_formats_outside_the_allowlist_are_named():
    out = decode(
        [b"%PDF-1.7\n...", b"<svg xmlns='http://www.w3.org/2000/svg'/>", encode(noise(), "BMP")],
        config=DecodeConfig(formats=("JPEG", "PNG")),
    )
    assert out.column(col.STATUS).to_pylist() == [col.UNSUPPORTED_FORMAT] * 2 + [col.DECODE_ERROR]
    assert "PDF" in out.column(col.ERROR)[0].as_py() and "SVG" in out.column(col.ERROR)[1].as_py()


def test_pixel_limit_guards_against_decompression_bombs():
    out = decode([encode(solid((0, 0, 0), size=(200, 200)))], config=DecodeConfig(max_pixels=10_000))
    assert out.column(col.STATUS)[0].as_py() == col.IMAGE_TOO_LARGE
    assert "10000 pixels" in out.column(col.ERROR)[0].as_py()


def test_truncated_jpeg_is_a_decode_error():
    data = encode(noise((200, 200)), "JPEG")
    out = decode([data[: len(data) // 2]])
    assert out.column(col.STATUS)[0].as_py() == col.DECODE_ERROR


def test_extreme_aspect_ratio_decodes_to_the_model_size():
    out = decode([encode(noise((4000, 10)))])
    assert out.column(col.STATUS)[0].as_py() == col.OK
    assert pixels(out, 0).shape == (32, 32, 3)


def test_animated_gif_uses_the_first_frame():
    frames = [solid((255, 0, 0), mode="RGB").convert("P"), solid((0, 0, 255), mode="RGB").convert("P")]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    r, _g, b = pixels(decode([data]), 0)[16, 16].tolist()
    assert r > 200 and b < 60


def test_hugging_face_image_structs_are_accepted():
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = [{"bytes": encode(noise()), "path": "a.png"}, {"bytes": None, "path": "b.png"}]
    out = decode(images, image_type=struct)
    assert out.column(col.STATUS).to_pylist() == [col.OK, col.MISSING_IMAGE]


def test_image_bytes_are_kept_only_when_asked():
    data = encode(noise())
    out = decode([data], config=DecodeConfig(keep_image_bytes=True))
    assert out.column(col.IMAGE_BYTES).to_pylist() == [data]


def test_jpeg_draft_mode_changes_pixels_only_slightly():
    big = noise((512, 384), seed=3).resize((512, 384))
    data = encode(big.resize((64, 48)).resize((512, 384)), "JPEG", quality=95)  # smooth content
    exact = pixels(decode([data], config=DecodeConfig(jpeg_draft=False)), 0).astype(int)
    fast = pixels(decode([data], config=DecodeConfig(jpeg_draft=True)), 0).astype(int)
    assert np.abs(exact - fast).mean() < 6


@pytest.mark.parametrize("mode", ["L", "LA", "P", "1", "CMYK"])
def test_every_common_mode_becomes_rgb(mode):
    out = decode([encode(noise().convert(mode), "TIFF")])
    assert out.column(col.STATUS)[0].as_py() == col.OK


def test_each_model_geometry_gets_its_own_pixels_from_one_decode():
    blip = PixelSpec(resize=(24, 24))
    images = [encode(noise((120, 80), seed=s), "JPEG", quality=95) for s in range(3)] + [b"broken"]
    table = pa.table({col.KEY: ["0", "1", "2", "3"], col.IMAGE: pa.array(images, pa.binary())})
    both = DecodeImages(DecodeConfig(), SPEC, extra_pixels={col.CAPTION_PIXELS: blip})(table)
    clip_only = decode(images)
    blip_only = decode(images, spec=blip)

    assert both.column(col.PIXELS).equals(clip_only.column(col.PIXELS))
    assert both.column(col.CAPTION_PIXELS).equals(blip_only.column(col.PIXELS))
    assert both.column(col.CAPTION_PIXELS).type.byte_width == 24 * 24 * 3
    assert both.column(col.CAPTION_PIXELS).null_count == 1


@pytest.mark.parametrize(
    "model",
    [
        "tiny_clip_dir",
        "tiny_blip_captioner_dir",
        "tiny_blip_itm_dir",
        "tiny_git_dir",
        "tiny_llava_dir",
        "tiny_vit_classifier_dir",
    ],
)
def test_the_geometry_read_from_the_processor_json_is_the_processor_s(model, request):
    """The plan reads it without importing transformers; it must be what transformers' processor does."""
    import json

    from transformers import AutoImageProcessor

    model_dir = request.getfixturevalue(model)
    raw = json.loads((model_dir / "preprocessor_config.json").read_text())
    fast = PixelSpec.from_processor_config(raw)
    assert fast is not None  # saved processors state every part, so the plan never needs transformers for them
    assert fast == PixelSpec.from_image_processor(AutoImageProcessor.from_pretrained(model_dir))
    assert PixelSpec.from_processor_config(raw, image_size=96) == PixelSpec(resize=(96, 96), resample=raw["resample"])


def test_a_processor_json_that_leaves_a_part_out_is_left_to_transformers():
    full = {
        "do_resize": True,
        "size": {"shortest_edge": 32},
        "do_center_crop": True,
        "crop_size": {"height": 32, "width": 32},
        "resample": 3,
    }
    assert PixelSpec.from_processor_config(full) == PixelSpec(shortest_edge=32, crop=(32, 32), resample=3)
    for missing in ("resample", "do_center_crop", "size", "crop_size", "do_resize"):
        assert PixelSpec.from_processor_config({k: v for k, v in full.items() if k != missing}) is None, missing
    no_crop = {k: v for k, v in full.items() if k not in ("do_center_crop", "crop_size")}  # BLIP's, ViT's
    assert PixelSpec.from_processor_config(no_crop) == PixelSpec(shortest_edge=32, resample=3)
    assert PixelSpec.from_processor_config({**full, "size": 224}) is None  # an old-style int size
    assert PixelSpec.from_processor_config({**full, "auto_map": {"AutoImageProcessor": "x.Y"}}) is None
