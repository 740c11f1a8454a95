"""A tiny real-architecture CLIP checkpoint, optionally trained contrastively on the sample images."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

from jobs.demo.shards import PALETTE, SHAPES, caption_for, make_sample_image
from jobs.demo.tokenizers import CLIP_MAX_TEXT_LEN, train_tokenizer

# Input resolution of every tiny model's vision tower.
IMAGE_SIZE = 32
RECIPE_VERSION = 1
# Every tiny build writes this file last; its recipe decides whether a cached build is reused.
MARKER = "vlpipe_tiny.json"


def _clip_config(tokenizer: CLIPTokenizer) -> CLIPConfig:
    """A CLIPConfig with two 64-wide layers per tower and special token ids matching `tokenizer`."""
    tower = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
    return CLIPConfig(
        text_config={
            **tower,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": CLIP_MAX_TEXT_LEN,
            "projection_dim": 32,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**tower, "image_size": IMAGE_SIZE, "patch_size": 8, "projection_dim": 32},
        projection_dim=32,
    )


def _contrastive_train(model: CLIPModel, processor: CLIPProcessor, steps: int, seed: int) -> None:
    """Fit `model` with the CLIP loss on batches holding one synthetic image of every shape/colour pair."""
    rng = np.random.default_rng([seed, 1])
    pairs = [(s, c) for s in SHAPES for c in PALETTE]
    per_pair = 12
    images = [
        make_sample_image(s, c, size=int(rng.integers(40, 128)), rng=rng) for s, c in pairs for _ in range(per_pair)
    ]
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    pixels = pixels.view(len(pairs), per_pair, 3, IMAGE_SIZE, IMAGE_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    model.train()
    for _ in range(steps):
        order = rng.permutation(len(pairs))
        variant = torch.from_numpy(rng.integers(per_pair, size=len(pairs)))
        text = processor.tokenizer(
            [caption_for(*pairs[i], rng) for i in order], padding=True, truncation=True, return_tensors="pt"
        )
        loss = model(**text, pixel_values=pixels[torch.from_numpy(order), variant], return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def build_tiny_clip(out_dir: pathlib.Path, *, train_steps: int = 0, seed: int = 0) -> pathlib.Path:
    """Build (or reuse a cached) tiny CLIPModel with a trained BPE tokenizer and save it to `out_dir`."""
    out_dir = pathlib.Path(out_dir)
    recipe = {"recipe_version": RECIPE_VERSION, "seed": seed, "train_steps": train_steps}
    marker = out_dir / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == recipe and (out_dir / "model.safetensors").is_file():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)

    tokenizer = train_tokenizer()
    # Pillow's resize, as vlpipe decodes: transformers would pick its torchvision backend where
    # torchvision is installed, whose rounding trains a different model from the same seed.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = _clip_config(tokenizer)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    if train_steps > 0:
        _contrastive_train(model, processor, train_steps, seed)

    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    # Written last so an interrupted build is never mistaken for a finished one.
    marker.write_text(json.dumps(recipe, indent=2) + "\n")
    return out_dir
