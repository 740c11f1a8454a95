"""Captioner on small Arrow tables, without Ray, against plain transformers ``generate``."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError

from operators import schema as col
from operators.image.decode import DecodeConfig, DecodeImages
from operators.models.caption import CaptionConfig, Captioner
from operators.refs import ModelRef
from operators.storage import StorageOptions
from tests.images import encode, noise
from tests.processors import reference_processor

IMAGES = [noise((70 + 13 * i, 50 + 7 * i), seed=i) for i in range(4)]


def captioner(model_dir, **settings) -> Captioner:
    return Captioner(CaptionConfig(model=ModelRef(source=str(model_dir)), **settings), StorageOptions())


def caption(op: Captioner, images, extra: list[bytes] = ()) -> list[str | None]:
    encoded = [encode(im, "PNG") for im in images] + list(extra)
    table = pa.table({col.KEY: [str(i) for i in range(len(encoded))], col.IMAGE: pa.array(encoded, pa.binary())})
    decoded = DecodeImages(DecodeConfig(jpeg_draft=False), op.geometry)(table)
    decoded = decoded.rename_columns([col.CAPTION_PIXELS if c == col.PIXELS else c for c in decoded.column_names])
    out = op(decoded)
    assert out.column(col.KEY).to_pylist() == [str(i) for i in range(len(encoded))]
    return out.column(col.CAPTION_GENERATED).to_pylist()


def reference(model_dir, images, prompt=None, **settings) -> list[str]:
    """Plain transformers: the model's own processor, then generate, fp32."""
    from transformers import AutoModelForImageTextToText

    processor = reference_processor(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    texts = [prompt] * len(images) if prompt else None
    inputs = processor(images=images, text=texts, return_tensors="pt")
    torch.manual_seed(0)
    with torch.inference_mode():
        out = model.generate(**inputs, **settings)
    return [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]


@pytest.mark.parametrize(
    "settings",
    [
        {"max_new_tokens": 12, "num_beams": 1},
        {"max_new_tokens": 12, "num_beams": 3},
    ],
    ids=["greedy", "beam3"],
)
def test_blip_captions_equal_plain_transformers_generate(tiny_blip_captioner_dir, settings):
    expected = reference(tiny_blip_captioner_dir, IMAGES, do_sample=False, **settings)
    got = caption(captioner(tiny_blip_captioner_dir, **settings), IMAGES)
    assert got == expected
    assert all(got)


def test_conditional_captioning_continues_the_prompt(tiny_blip_captioner_dir):
    prompt = "a photo of"
    expected = reference(tiny_blip_captioner_dir, IMAGES, prompt=prompt, max_new_tokens=8)
    got = caption(captioner(tiny_blip_captioner_dir, prompt=prompt, max_new_tokens=8), IMAGES)
    assert got == expected
    assert all(text.startswith(prompt) for text in got)


def test_git_captions_equal_plain_transformers_generate(tiny_git_dir):
    expected = reference(tiny_git_dir, IMAGES, max_new_tokens=6)
    assert caption(captioner(tiny_git_dir, max_new_tokens=6), IMAGES) == expected


def test_chat_vlm_captions_come_from_its_chat_template_without_the_prompt(tiny_llava_dir):
    from transformers import AutoModelForImageTextToText

    prompt = "Write a caption."
    processor = reference_processor(tiny_llava_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=IMAGES, text=[text] * len(IMAGES), return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    expected = [
        t.strip() for t in processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    ]

    op = captioner(tiny_llava_dir, prompt=prompt, max_new_tokens=5)
    assert op.chat
    assert caption(op, IMAGES) == expected


def test_failed_images_get_null_captions_and_keep_their_rows(tiny_blip_captioner_dir):
    got = caption(captioner(tiny_blip_captioner_dir, max_new_tokens=5), IMAGES[:2], extra=[b"", b"not an image"])
    assert got[2:] == [None, None] and all(got[:2])


def test_sampling_is_reproducible_for_a_seed(tiny_blip_captioner_dir):
    first = caption(captioner(tiny_blip_captioner_dir, do_sample=True, seed=7, max_new_tokens=10), IMAGES)
    again = caption(captioner(tiny_blip_captioner_dir, do_sample=True, seed=7, max_new_tokens=10), IMAGES)
    assert first == again


def test_sampling_settings_without_sampling_are_rejected():
    with pytest.raises(ValidationError, match="only apply with do_sample"):
        CaptionConfig(model=ModelRef(source="/m"), temperature=0.7)
    with pytest.raises(ValidationError, match="max_new_token"):
        CaptionConfig(model=ModelRef(source="/m"), max_new_token=5)
