"""The model operators on CUDA in reduced precision against the same operators on the CPU in fp32.

Marked ``gpu``: skipped where torch sees no CUDA device (tests/conftest.py), so CI pays nothing.
The reference is the production CPU path (the operator built where torch sees no GPU: fp32,
normalisation on the CPU) on the same decoded pixels, so what is compared is device and dtype
alone, not decoding or a processor's resize. The tolerances were set from the same models run
in bf16/fp16 on the CPU (worst case seen, times about three):

    CLIP score, bf16   3.3e-3 seen   -> 1e-2     embedding cosine to fp32 >= 1 - 2e-5 seen -> 1e-4
    CLIP score, fp16   4.2e-4 seen   -> 2e-3
    ITM P(match), bf16 5.0e-4 seen   -> 2e-3
    BLIP logits, bf16  0.10 seen (max over the vocabulary, logits up to 6.2) -> ties of 0.3

The briefly trained tiny captioner nearly ties between shapes after "a photo of a <colour>": in
bf16 on the CPU 6 of these 10 captions equalled fp32, and the other 4 parted there, each at an
fp32 logit margin of at most 0.03. So captions are compared as equal-or-parted-at-a-near-tie.

With ``VLPIPE_GPU_TESTS_ON_CPU=1`` (the dry run of benchmarks/gpu/run.sh) they run on the CPU,
where both sides are fp32: that checks the tests, not the GPU.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from jobs.demo import PALETTE, SHAPES, make_sample_image
from operators import schema as col
from operators.image.decode import DecodeConfig, DecodeImages
from operators.models.caption import CaptionConfig, Captioner
from operators.models.clip import ClipConfig, ClipScorer
from operators.models.itm import ItmConfig, ItmScorer
from operators.refs import ModelRef
from operators.storage import StorageOptions
from operators.tensors import DevicePixels, pixel_rows
from tests.images import encode, noise
from tests.operators.models.test_caption import caption as run_captioner
from tests.operators.models.test_clip import run as run_clip
from tests.operators.models.test_itm import score as run_itm

pytestmark = pytest.mark.gpu

ON_GPU = torch.cuda.is_available()
# Where the GPU has bf16 (every GPU since Ampere), "auto" picks it; fp16 elsewhere.
AUTO_DTYPE = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if ON_GPU else torch.float32
DTYPES = {"auto": AUTO_DTYPE, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# fp32 on the GPU is not bit-exact either: cuDNN runs the patch-embedding convolution in TF32
# by default (torch.backends.cudnn.allow_tf32), a 10-bit mantissa for that one layer.
CLIP_SCORE_ATOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 2e-3}
EMBEDDING_COSINE_GAP = {torch.bfloat16: 1e-4, torch.float16: 1e-5, torch.float32: 1e-5}
ITM_ATOL = {torch.bfloat16: 2e-3, torch.float16: 5e-4, torch.float32: 5e-4}
# Greedy decoding is a chain of argmaxes: where fp32 itself nearly ties, bf16 may pick the other
# token and the rest of the caption follows from there. A difference is accepted only at such a tie.
LOGIT_TIE = {torch.bfloat16: 0.3, torch.float16: 0.05, torch.float32: 0.02}


def cpu_reference(build):
    """The operator as a node without a GPU builds it: on the CPU in fp32."""
    with mock.patch.object(torch.cuda, "is_available", return_value=False):
        return build()


def assert_placed(op, precision: str) -> None:
    """The operator and its weights are where this machine should put them, in the dtype asked for."""
    weights = next(op.model.parameters())
    if not ON_GPU:
        assert (op.device.type, op.dtype, weights.dtype) == ("cpu", torch.float32, torch.float32)
        return
    assert op.device.type == "cuda" and weights.device.type == "cuda"
    assert op.dtype == weights.dtype == DTYPES[precision]


def photo_images(n: int) -> list[Image.Image]:
    """Shape photos like the demo's, in several sizes."""
    rng = np.random.default_rng(3)
    return [
        make_sample_image(SHAPES[i % len(SHAPES)], list(PALETTE)[i % len(PALETTE)], size=96 + 24 * i, rng=rng)
        for i in range(n)
    ]


def photos(n: int) -> list[bytes]:
    """The photos encoded in the two codecs the decoder sees most."""
    return [encode(im, "JPEG", quality=90) if i % 2 else encode(im, "PNG") for i, im in enumerate(photo_images(n))]


def decoded_rows(op, images: list[bytes]) -> np.ndarray:
    """An operator's input pixels, decoded as the pipeline decodes them."""
    table = DecodeImages(DecodeConfig(jpeg_draft=False), op.geometry)(pa.table({col.IMAGE: images}))
    return pixel_rows(table.column(col.PIXELS).combine_chunks(), op.geometry.out_size)


def captions_for(n: int) -> list[str]:
    return [f"a photo of a {list(PALETTE)[(i + i // 3) % len(PALETTE)]} {SHAPES[i % len(SHAPES)]}" for i in range(n)]


def test_device_pixels_normalise_on_the_gpu_to_bf16_rounding(tiny_clip_dir):
    from transformers import AutoImageProcessor

    scorer = ClipScorer(ClipConfig(model=ModelRef(source=str(tiny_clip_dir))), StorageOptions())
    rows = decoded_rows(scorer, photos(6))
    processor = AutoImageProcessor.from_pretrained(tiny_clip_dir)
    reference = DevicePixels(processor, torch.device("cpu"), torch.float32)(rows)
    got = scorer.to_device(rows)
    assert got.device.type == scorer.device.type and got.dtype == scorer.dtype
    # One rounding to the target dtype (relative 2^-9 for bf16) plus fp32 reassociation.
    bound = (2.0**-8 if scorer.dtype != torch.float32 else 1e-6) * reference.abs() + 1e-6
    assert bool(((got.float().cpu() - reference).abs() <= bound).all())


@pytest.mark.parametrize("precision", ["auto", "float16", "float32"])
def test_clip_on_the_gpu_matches_the_fp32_cpu_reference(tiny_clip_dir, precision):
    if not ON_GPU and precision != "auto":
        pytest.skip("on the CPU every precision runs in fp32: the 'auto' case covers it")
    config = ClipConfig(model=ModelRef(source=str(tiny_clip_dir)), precision=precision)
    gpu = ClipScorer(config, StorageOptions())
    cpu = cpu_reference(lambda: ClipScorer(config, StorageOptions()))
    assert_placed(gpu, precision)
    images, captions = photos(12) + [encode(noise(seed=9))], captions_for(12) + [""]
    got, want = run_clip(gpu, images, captions), run_clip(cpu, images, captions)

    score, reference = (
        got.column(col.CLIP_SCORE).to_numpy(zero_copy_only=False),
        want.column(col.CLIP_SCORE).to_numpy(zero_copy_only=False),
    )
    assert np.isnan(score[-1]) and np.isnan(reference[-1])  # an empty caption is null on both
    np.testing.assert_allclose(score[:-1], reference[:-1], atol=CLIP_SCORE_ATOL[gpu.dtype], rtol=0)
    for name in (col.IMAGE_EMBEDDING, col.TEXT_EMBEDDING):
        pairs = [(a, b) for a, b in zip(got.column(name).to_pylist(), want.column(name).to_pylist()) if b is not None]
        a, b = np.array([p[0] for p in pairs], np.float32), np.array([p[1] for p in pairs], np.float32)
        np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)  # normalised in fp32 on the device
        assert np.einsum("ij,ij->i", a, b).min() >= 1.0 - EMBEDDING_COSINE_GAP[gpu.dtype], name


def test_itm_on_the_gpu_matches_the_fp32_cpu_reference(tiny_blip_itm_dir):
    config = ItmConfig(model=ModelRef(source=str(tiny_blip_itm_dir)))
    gpu = ItmScorer(config, StorageOptions())
    cpu = cpu_reference(lambda: ItmScorer(config, StorageOptions()))
    assert_placed(gpu, "auto")
    images, captions = photos(10), captions_for(10)
    got, want = np.array(run_itm(gpu, images, captions)), np.array(run_itm(cpu, images, captions))
    assert ((got >= 0) & (got <= 1)).all()
    np.testing.assert_allclose(got, want, atol=ITM_ATOL[gpu.dtype], rtol=0)


def test_greedy_blip_captions_on_the_gpu_equal_the_fp32_cpu_ones_but_at_near_ties(tiny_blip_captioner_dir):
    config = CaptionConfig(model=ModelRef(source=str(tiny_blip_captioner_dir)), max_new_tokens=12)
    gpu = Captioner(config, StorageOptions())
    cpu = cpu_reference(lambda: Captioner(config, StorageOptions()))
    assert_placed(gpu, "auto")
    images = photo_images(10)
    got, want = run_captioner(gpu, images), run_captioner(cpu, images)
    assert all(got) and all(want)
    rows = decoded_rows(cpu, [encode(im, "PNG") for im in images])
    for i, (text, reference) in enumerate(zip(got, want)):
        if text != reference:
            assert_near_tie(cpu, rows[i], reference, text, LOGIT_TIE[gpu.dtype])


def assert_near_tie(cpu: Captioner, row: np.ndarray, reference: str, got: str, tie: float) -> None:
    """Where two greedy captions part, the fp32 model must nearly tie between the two next tokens."""
    tokenizer, text_config = cpu.tokenizer, cpu.model.config.text_config
    ref_ids = tokenizer(reference, add_special_tokens=False).input_ids + [text_config.eos_token_id]
    got_ids = tokenizer(got, add_special_tokens=False).input_ids + [text_config.eos_token_id]
    k = next(i for i, (a, b) in enumerate(zip(ref_ids, got_ids)) if a != b)
    prefix = torch.tensor([[text_config.bos_token_id, *ref_ids[:k]]])
    with torch.inference_mode():
        logits = cpu.model(pixel_values=cpu.to_device(row[None]), input_ids=prefix).logits[0, -1].float()
    # Greedy fp32 picked ref_ids[k]: it is the argmax (this also checks the text round trip).
    assert int(logits.argmax()) == ref_ids[k], (reference, tokenizer.decode(ref_ids[: k + 1]))
    margin = float(logits[ref_ids[k]] - logits[got_ids[k]])
    assert margin <= tie, (
        f"{got!r} parts from the fp32 caption {reference!r} at token {k} with an fp32 logit margin of "
        f"{margin:.3f}, more than the {tie} that reduced precision can flip"
    )
