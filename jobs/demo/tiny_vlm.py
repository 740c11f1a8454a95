"""Tiny real-architecture vision-language checkpoints: BLIP captioner, BLIP ITM, GIT and LLaVA.

Each factory saves an ordinary Hugging Face directory (safetensors weights, processor, tokenizer,
image processor) that production code loads through the Auto classes, like `build_tiny_clip`.
The image processors are transformers' Pillow ones, as in `build_tiny_clip`: the same pixels as
vlpipe's decode, and the same trained weights whether or not torchvision is installed.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Callable

import numpy as np
import torch
from transformers import (
    BertTokenizerFast,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipImageProcessorPil,
    BlipProcessor,
    CLIPImageProcessorPil,
    GitConfig,
    GitForCausalLM,
    GitProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from jobs.demo.shards import PALETTE, SHAPES, TEMPLATES, caption_for, make_sample_image
from jobs.demo.tiny_clip import IMAGE_SIZE, MARKER
from jobs.demo.tokenizers import BERT_MAX_TEXT_LEN, bert_tokenizer, chat_tokenizer

# Greedy captions then name colour and shape for ~70% of held-out images (colour alone ~99%); ~28 s on 2 cores.
DEMO_CAPTIONER_TRAIN_STEPS = 400
# Matched pairs then score ~0.75 and colour+shape mismatches ~0.03 (median P(match)); ~23 s on 2 cores.
DEMO_ITM_TRAIN_STEPS = 200
RECIPE_VERSION = 1
# Big balanced batches: on CPU a step over 288 rows costs only ~3x one over 36.
BATCH_PER_PAIR = 8
ITM_PER_PAIR = 4
# Images per shape/colour pair; fewer and the tiny ViT memorises them instead of learning shapes.
CAPTIONER_POOL = 192
ITM_POOL = 96
CAPTIONER_LR = 2e-3
ITM_LR = 1e-3
ITC_TEMPERATURE = 0.07
PATCH_SIZE = 8
# One template only: greedy decoding then has a single path to learn, so the captioner converges fast.
CAPTION_TEMPLATE = TEMPLATES[0]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# Each tower: 2 layers of width 64, as small as the tiny CLIP.
TOWER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}


def _cached(out_dir: pathlib.Path, recipe: dict, build: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Run `build(out_dir)` unless `out_dir` already holds a finished build of the same `recipe`."""
    out_dir = pathlib.Path(out_dir)
    recipe = {"recipe_version": RECIPE_VERSION, **recipe}
    marker = out_dir / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == recipe and (out_dir / "model.safetensors").is_file():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    build(out_dir)
    # Written last so an interrupted build is never mistaken for a finished one.
    marker.write_text(json.dumps(recipe, indent=2) + "\n")
    return out_dir


def _save(out_dir: pathlib.Path, model: torch.nn.Module, processor) -> None:
    """Save weights as safetensors plus every part of the processor."""
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    processor.image_processor.save_pretrained(out_dir)


def _photo_caption(shape: str, color: str) -> str:
    """The captioner's single-template caption, with the article fixed as in `caption_for`."""
    return re.sub(r"\ba (?=[aeiou])", "an ", CAPTION_TEMPLATE.format(color=color, shape=shape))


def _blip_config(tokenizer: BertTokenizerFast) -> BlipConfig:
    """A tiny BlipConfig whose special token ids match `tokenizer`."""
    return BlipConfig(
        # BLIP's default vision init (std 1e-10) assumes pretrained weights; from scratch, near-zero position
        # embeddings leave the tower a bag of patches that learns shapes very slowly.
        vision_config={**TOWER, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "initializer_range": 0.02},
        text_config={
            **TOWER,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": BERT_MAX_TEXT_LEN,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.sep_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        projection_dim=32,
        image_text_hidden_size=32,
    )


def _blip_processor() -> BlipProcessor:
    """BlipProcessor with a 32 px BlipImageProcessorPil and the trained BERT tokenizer."""
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return BlipProcessor(image_processor=image_processor, tokenizer=bert_tokenizer())


class _ImagePool:
    """Pre-rendered, preprocessed images of every shape/colour pair, sampled into balanced batches.

    Rendering costs more than a training step, so images are drawn once; a few hundred per pair keep the
    tiny ViT from memorising them.
    """

    def __init__(self, image_processor, per_pair: int, rng: np.random.Generator):
        self.pairs = [(s, c) for s in SHAPES for c in PALETTE]
        images = [
            make_sample_image(s, c, size=int(rng.integers(32, 72)), rng=rng)
            for s, c in self.pairs
            for _ in range(per_pair)
        ]
        pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
        self.pixels = pixels.view(len(self.pairs), per_pair, *pixels.shape[1:])

    def batch(self, per_pair: int, rng: np.random.Generator) -> tuple[list[tuple[str, str]], torch.Tensor]:
        """`per_pair` random images of every pair: the (shape, colour) of each row and its pixels."""
        index = torch.arange(len(self.pairs)).repeat(per_pair)
        variant = torch.from_numpy(rng.integers(self.pixels.shape[1], size=len(index)))
        return [self.pairs[i] for i in index], self.pixels[index, variant]


def _whiten_patches(conv: torch.nn.Conv2d, pixels: torch.Tensor) -> None:
    """Initialise the patch projection with the PCA-whitening filters of `pixels`' patches.

    From random init, a tiny ViT picks up colour at once but needs thousands of steps for shape;
    whitened patch features (the trick fast CIFAR trainers use) cut that to a few hundred.
    """
    size = conv.kernel_size[0]
    patches = torch.nn.functional.unfold(pixels, size, stride=size).transpose(1, 2).flatten(0, 1)
    patches = patches - patches.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
    top = eigenvalues.argsort(descending=True)[: conv.out_channels]
    filters = eigenvectors[:, top] / (eigenvalues[top] + 1e-2).sqrt()
    with torch.no_grad():
        conv.weight.copy_(filters.T.reshape(conv.weight.shape))
        conv.bias.zero_()


def _fit(model: torch.nn.Module, steps: int, lr: float, loss_fn: Callable[[], torch.Tensor]) -> None:
    """Run `steps` AdamW steps on `loss_fn()` (short warm-up, cosine decay), then leave `model` in eval mode."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    # Annealing to zero matters in runs this short: the last steps settle instead of bouncing around.
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.train()
    for _ in range(steps):
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


def _train_captioner(model: BlipForConditionalGeneration, processor: BlipProcessor, steps: int, seed: int) -> None:
    """Teacher-force `model` with BLIP's captioning loss on balanced batches of synthetic images.

    Real BLIP starts from a pretrained ViT. From scratch, the captioning loss alone teaches the tiny
    tower colour at once but shape only after thousands of steps, so a throwaway linear probe on the
    vision CLS output adds a direct shape/colour classification loss.
    """
    rng = np.random.default_rng([seed, 2])
    pool = _ImagePool(processor.image_processor, CAPTIONER_POOL, rng)
    _whiten_patches(model.vision_model.embeddings.patch_embedding, pool.pixels[:, :16].flatten(0, 1))
    text = processor.tokenizer([_photo_caption(*p) for p in pool.pairs], padding=True, return_tensors="pt")
    input_ids = text["input_ids"].clone()
    # Captions start with [DEC], as in BLIP's own training; generate() starts from it as well.
    input_ids[:, 0] = processor.tokenizer.bos_token_id
    labels = input_ids.masked_fill(text["attention_mask"] == 0, -100)
    repeat = (BATCH_PER_PAIR, 1)
    probe = torch.nn.Linear(model.config.vision_config.hidden_size, len(SHAPES) + len(PALETTE))
    shape_ids = torch.tensor([SHAPES.index(s) for s, _ in pool.pairs]).repeat(BATCH_PER_PAIR)
    color_ids = torch.tensor([list(PALETTE).index(c) for _, c in pool.pairs]).repeat(BATCH_PER_PAIR)

    def loss() -> torch.Tensor:
        _, pixels = pool.batch(BATCH_PER_PAIR, rng)
        out = model(
            pixel_values=pixels,
            input_ids=input_ids.repeat(repeat),
            attention_mask=text["attention_mask"].repeat(repeat),
            labels=labels.repeat(repeat),
        )
        logits = probe(out.image_embeds[:, 0])
        aux = torch.nn.functional.cross_entropy(logits[:, : len(SHAPES)], shape_ids)
        aux = aux + torch.nn.functional.cross_entropy(logits[:, len(SHAPES) :], color_ids)
        return out.loss + aux

    _fit(torch.nn.ModuleList([model, probe]), steps, CAPTIONER_LR, loss)


def _mismatch(pair: tuple[str, str], rng: np.random.Generator) -> tuple[str, str]:
    """Another pair differing in shape, colour or both, so the head is pushed to check both attributes."""
    shape, color = pair
    kind = int(rng.integers(3))
    if kind != 1:
        shape = str(rng.choice([s for s in SHAPES if s != shape]))
    if kind != 0:
        color = str(rng.choice([c for c in PALETTE if c != color]))
    return shape, color


def _train_itm(model: BlipForImageTextRetrieval, processor: BlipProcessor, steps: int, seed: int) -> None:
    """Fit the ITM head with 2-class cross-entropy on one matched and one mismatched caption per image.

    As in BLIP, an image-text contrastive loss on the unimodal features trains alongside: without it the
    text encoder's [CLS] output hardly depends on its input at init, and ITM alone sits at chance.
    """
    rng = np.random.default_rng([seed, 3])
    pool = _ImagePool(processor.image_processor, ITM_POOL, rng)
    _whiten_patches(model.vision_model.embeddings.patch_embedding, pool.pixels[:, :16].flatten(0, 1))

    def loss() -> torch.Tensor:
        pairs, pixels = pool.batch(ITM_PER_PAIR, rng)
        n = len(pairs)
        captions = [caption_for(*p, rng) for p in pairs] + [caption_for(*_mismatch(p, rng), rng) for p in pairs]
        text = processor.tokenizer(captions, padding=True, return_tensors="pt")
        logits = model(
            input_ids=text["input_ids"],
            attention_mask=text["attention_mask"],
            pixel_values=torch.cat([pixels, pixels]),
            use_itm_head=True,
        ).itm_score
        labels = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)])
        itm = torch.nn.functional.cross_entropy(logits, labels)
        similarity = model(
            input_ids=text["input_ids"][:n],
            attention_mask=text["attention_mask"][:n],
            pixel_values=pixels,
            use_itm_head=False,
        ).itm_score
        # Every caption of the same shape/colour pair is a positive.
        same = torch.tensor([[a == b for b in pairs] for a in pairs], dtype=torch.float)
        targets = same / same.sum(1, keepdim=True)
        itc = torch.nn.functional.cross_entropy(similarity / ITC_TEMPERATURE, targets)
        itc = (itc + torch.nn.functional.cross_entropy(similarity.T / ITC_TEMPERATURE, targets)) / 2
        return itm + itc

    _fit(model, steps, ITM_LR, loss)


def build_tiny_blip_captioner(out_dir: pathlib.Path, *, train_steps: int = 0, seed: int = 0) -> pathlib.Path:
    """Build (or reuse a cached) tiny BlipForConditionalGeneration captioner and save it to `out_dir`."""
    return _build_blip(out_dir, BlipForConditionalGeneration, _train_captioner, "blip-captioner", train_steps, seed)


def build_tiny_blip_itm(out_dir: pathlib.Path, *, train_steps: int = 0, seed: int = 0) -> pathlib.Path:
    """Build (or reuse a cached) tiny BlipForImageTextRetrieval and save it to `out_dir`."""
    return _build_blip(out_dir, BlipForImageTextRetrieval, _train_itm, "blip-itm", train_steps, seed)


def _build_blip(out_dir: pathlib.Path, model_class, train, name: str, train_steps: int, seed: int) -> pathlib.Path:
    def build(path: pathlib.Path) -> None:
        processor = _blip_processor()
        torch.manual_seed(seed)
        model = model_class(_blip_config(processor.tokenizer)).eval()
        if train_steps > 0:
            train(model, processor, train_steps, seed)
        _save(path, model, processor)

    return _cached(out_dir, {"model": name, "seed": seed, "train_steps": train_steps}, build)


def _clip_image_processor() -> CLIPImageProcessorPil:
    """CLIP-style preprocessing to a 32 px centre crop."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )


def build_tiny_git(out_dir: pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """Build (or reuse a cached) tiny GitForCausalLM with random weights and save it to `out_dir`."""

    def build(path: pathlib.Path) -> None:
        tokenizer = bert_tokenizer()
        processor = GitProcessor(image_processor=_clip_image_processor(), tokenizer=tokenizer)
        config = GitConfig(
            vision_config={**TOWER, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE},
            **TOWER,
            vocab_size=len(tokenizer),
            max_position_embeddings=BERT_MAX_TEXT_LEN,
            # GIT decodes from [CLS] and stops at [SEP], as microsoft/git-base does.
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(seed)
        _save(path, GitForCausalLM(config).eval(), processor)

    return _cached(out_dir, {"model": "git", "seed": seed}, build)


def build_tiny_llava(out_dir: pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """Build (or reuse a cached) tiny chat-style LlavaForConditionalGeneration and save it to `out_dir`."""

    def build(path: pathlib.Path) -> None:
        tokenizer = chat_tokenizer()
        image_tokens = (IMAGE_SIZE // PATCH_SIZE) ** 2
        processor = LlavaProcessor(
            image_processor=_clip_image_processor(),
            tokenizer=tokenizer,
            patch_size=PATCH_SIZE,
            # "default" drops the vision tower's CLS token, which the processor counts as the additional one.
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=CHAT_TEMPLATE,
        )
        config = LlavaConfig(
            vision_config={
                "model_type": "clip_vision_model",
                **TOWER,
                "image_size": IMAGE_SIZE,
                "patch_size": PATCH_SIZE,
            },
            text_config={
                "model_type": "llama",
                **TOWER,
                "num_key_value_heads": 2,
                "vocab_size": len(tokenizer),
                "max_position_embeddings": 256,
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            },
            image_token_index=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
            image_seq_length=image_tokens,
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
        )
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        _save(path, model, processor)

    return _cached(out_dir, {"model": "llava", "seed": seed, "vocabulary": "chat+questions"}, build)
