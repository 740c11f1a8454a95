"""Sample data and tiny real-architecture models for the demo, the tests and the benchmarks.

Everything is generated offline and deterministically from a seed: img2dataset-style Parquet shards of
coloured-shape photos (``shards``), tokenizers trained on their captions (``tokenizers``), tiny CLIP,
BLIP, GIT and LLaVA checkpoints (``tiny_clip``, ``tiny_vlm``), each saved as an ordinary Hugging Face
directory that production code loads like any Hub checkpoint, and random-weight aesthetic and NSFW heads
converted from release-style ``.pth`` files (``heads``).
"""

from jobs.demo.heads import build_random_head
from jobs.demo.shards import PALETTE, SHAPES, caption_for, make_sample_image, write_sample_shards
from jobs.demo.tiny_clip import build_tiny_clip
from jobs.demo.tiny_vlm import (
    DEMO_CAPTIONER_TRAIN_STEPS,
    DEMO_ITM_TRAIN_STEPS,
    build_tiny_blip_captioner,
    build_tiny_blip_itm,
    build_tiny_git,
    build_tiny_llava,
)
from jobs.demo.tokenizers import BERT_SPECIALS, train_tokenizer, wordpiece_vocab

__all__ = [
    "BERT_SPECIALS",
    "DEMO_CAPTIONER_TRAIN_STEPS",
    "DEMO_ITM_TRAIN_STEPS",
    "PALETTE",
    "SHAPES",
    "build_random_head",
    "build_tiny_blip_captioner",
    "build_tiny_blip_itm",
    "build_tiny_clip",
    "build_tiny_git",
    "build_tiny_llava",
    "caption_for",
    "make_sample_image",
    "train_tokenizer",
    "wordpiece_vocab",
    "write_sample_shards",
]
