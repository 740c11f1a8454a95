"""Real-size CLIP and BLIP checkpoints with random weights, built offline from configs.

Throughput does not depend on weight values, only on the architecture, so the
benchmark builds ``CLIPConfig()`` (ViT-B/32) and ``BlipConfig()`` (BLIP-base)
defaults and saves them as ordinary Hugging Face directories, which vlpipe then
loads through the same code as any other model. ``tiny=True`` builds the test
suite's 2-layer towers instead, for the smoke test.
"""

from __future__ import annotations

import json
import pathlib

import torch
from transformers import (
    BertTokenizerFast,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
)

from jobs.demo import BERT_SPECIALS, build_tiny_blip_captioner, build_tiny_clip, train_tokenizer, wordpiece_vocab

MARKER = "vlpipe_bench.json"
RECIPE_VERSION = 1

# CLIPConfig() is ViT-B/32; ViT-L/14 (openai/clip-vit-large-patch14) differs in these fields only.
CLIP_ARCHS = {
    "vit-b32": {},
    "vit-l14": {
        "projection_dim": 768,
        "vision_config": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "patch_size": 14,
        },
        "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12},
    },
}


def clip_dir(root: pathlib.Path, *, tiny: bool = False, arch: str = "vit-b32") -> pathlib.Path:
    """A CLIP directory of the given architecture (random weights), built once under ``root``."""
    if tiny:
        return build_tiny_clip(root / "tiny-clip")
    name = f"clip-{arch}"
    return _cached(root / name, name, lambda out_dir: _build_clip(out_dir, arch))


def blip_dir(root: pathlib.Path, *, tiny: bool = False) -> pathlib.Path:
    """A BLIP-base captioner directory (random weights), built once under ``root``."""
    if tiny:
        return build_tiny_blip_captioner(root / "tiny-blip")
    return _cached(root / "blip-base", "blip-base", _build_blip)


def _cached(out_dir: pathlib.Path, name: str, build) -> pathlib.Path:
    recipe = {"model": name, "recipe_version": RECIPE_VERSION}
    marker = out_dir / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    build(out_dir)
    # Written last so an interrupted build is never mistaken for a finished one.
    marker.write_text(json.dumps(recipe) + "\n")
    return out_dir


def _build_clip(out_dir: pathlib.Path, arch: str = "vit-b32") -> None:
    # The demo's word-level BPE: real captions become a realistic handful of tokens.
    tokenizer = train_tokenizer()
    tokenizer.model_max_length = 77
    sizes = CLIP_ARCHS[arch]
    config = CLIPConfig(
        text_config={
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **sizes.get("text_config", {}),
        },
        vision_config=sizes.get("vision_config"),
        **({"projection_dim": sizes["projection_dim"]} if "projection_dim" in sizes else {}),
    )
    image_processor = CLIPImageProcessor()  # 224 px shortest edge, 224 px centre crop, bicubic
    CLIPModel(config).eval().save_pretrained(out_dir)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)


def _build_blip(out_dir: pathlib.Path) -> None:
    config = BlipConfig()
    vocab = wordpiece_vocab(BERT_SPECIALS)
    # Padded to BLIP's vocabulary so the language-model head costs what the real one does.
    vocab.update({f"[unused{i}]": i for i in range(len(vocab), config.text_config.vocab_size)})
    tokenizer = BertTokenizerFast(vocab=vocab, bos_token="[DEC]", model_max_length=512)
    config.text_config.bos_token_id = tokenizer.bos_token_id
    config.text_config.eos_token_id = tokenizer.sep_token_id
    config.text_config.sep_token_id = tokenizer.sep_token_id
    config.text_config.pad_token_id = tokenizer.pad_token_id
    image_processor = BlipImageProcessor()  # 384x384, bicubic
    BlipForConditionalGeneration(config).eval().save_pretrained(out_dir)
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
