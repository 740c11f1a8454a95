"""Image captioning with Hugging Face image-to-text models (GPU actor, CPU fallback).

Prefix captioners (BLIP, GIT) get their pixels normalised on the device, like CLIP.
Chat-style VLMs (LLaVA, Qwen2-VL, ...) go through their processor and chat template,
which expands the image into the tokens the language model expects.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from operators import schema as col
from operators.endpoint.config import EndpointConfig, check_one_form
from operators.image.decode import PixelSpec
from operators.models.load import ModelOperator, Precision
from operators.refs import ModelRef
from operators.resources import Resources
from operators.stage import Stage
from operators.storage import StorageOptions
from operators.tensors import pixel_rows

DEFAULT_CHAT_PROMPT = "Describe this image in one sentence."


# What only a model vlpipe loads has: a caption.endpoint leaves them to the server.
_IN_PROCESS_ONLY = (
    "chat",
    "num_beams",
    "do_sample",
    "temperature",
    "top_p",
    "seed",
    "image_size",
    "precision",
    "resources",
)


class CaptionConfig(BaseModel):
    """Which image-to-text model writes ``caption_generated``, and how it decodes.

    The model is either loaded by vlpipe (``model``) or served (``endpoint``: an OpenAI-compatible
    server, asked with ``prompt`` and the image, answering up to ``max_new_tokens`` tokens).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelRef | None = None
    endpoint: EndpointConfig | None = None
    prompt: str | None = None
    chat: bool | None = None
    max_new_tokens: int = Field(30, ge=1, le=4096)
    num_beams: int = Field(1, ge=1, le=32)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0
    image_size: int | None = Field(None, ge=8)
    precision: Precision = "auto"
    resources: Resources = Resources(num_cpus=1, num_gpus=None, batch_size=32)

    @model_validator(mode="after")
    def _sampling_settings_need_sampling(self) -> CaptionConfig:
        check_one_form(self, "caption", _IN_PROCESS_ONLY)
        if not self.do_sample and (self.temperature != 1.0 or self.top_p != 1.0):
            raise ValueError("temperature and top_p only apply with do_sample: true")
        return self


def caption_geometry(image_processor, image_size: int | None) -> PixelSpec:
    """The size the captioner's pixels are decoded to.

    Models with a fixed input geometry get exactly their processor's; processors
    that pick a size per image (Qwen2-VL) get a square ``image_size``, which they
    then treat like any other input.
    """
    if image_size:
        return PixelSpec(resize=(image_size, image_size), resample=int(getattr(image_processor, "resample", 3) or 3))
    try:
        return PixelSpec.from_image_processor(image_processor)
    except ValueError as err:
        raise ValueError(
            f"{err}: for a captioner whose processor picks a size per image, set caption.image_size"
        ) from None


def caption_stage(config: CaptionConfig, storage: StorageOptions, *, pixels_column: str, geometry: str) -> Stage:
    """The captioning stage's contract."""
    decoding = f"beams {config.num_beams}" + (f", sampling (seed {config.seed})" if config.do_sample else ", greedy")
    return Stage(
        name="caption",
        kind="actor",
        config_key="caption",
        resources=config.resources,
        model=config.model,
        reads=(pixels_column,),
        adds=(col.CAPTION_GENERATED,),
        build=partial(Captioner, config, storage, pixels_column),
        details=(
            f"input {geometry}",
            f"max_new_tokens {config.max_new_tokens}, {decoding}",
            f"precision {config.precision}",
        ),
    )


class Captioner(ModelOperator):
    """Append ``caption_generated``: one batched ``generate`` per batch, null for failed images."""

    def __init__(self, config: CaptionConfig, storage: StorageOptions, pixels_column: str = col.CAPTION_PIXELS):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        super().__init__(config.model, config.precision, storage, AutoModelForImageTextToText)
        self.config = config
        self.pixels_column = pixels_column
        self.processor = self.preprocessor(AutoProcessor)
        image_processor = self.processor.image_processor
        self.tokenizer = self.processor.tokenizer
        has_template = bool(getattr(self.processor, "chat_template", None))
        self.chat = has_template if config.chat is None else config.chat
        if self.chat and not has_template:
            raise ValueError(f"caption.chat is on but {config.model.source} has no chat template")
        if self.chat or not self.model.config.is_encoder_decoder:
            # Decoder-only models continue the last token of each row: pad on the left.
            self.tokenizer.padding_side = "left"
        geometry = caption_geometry(image_processor, config.image_size)
        if self.chat:
            self.geometry = geometry  # the processor normalises chat inputs itself
        else:
            self.pixel_input(image_processor, geometry)
        self._torch = torch

    def __call__(self, batch: pa.Table) -> pa.Table:
        pixels = batch.column(self.pixels_column).combine_chunks()
        valid = pc.is_valid(pixels).to_numpy(zero_copy_only=False)
        rows = pixel_rows(pixels, self.geometry.out_size)[valid]
        captions = self.generate(rows) if len(rows) else []
        column = [None] * batch.num_rows
        for i, text in zip(np.flatnonzero(valid), captions):
            column[i] = text
        return batch.append_column(col.CAPTION_GENERATED, pa.array(column, pa.string()))

    def generate(self, rows: np.ndarray) -> list[str]:
        """Captions for an (n, H, W, 3) uint8 array."""
        torch = self._torch
        inputs = self._chat_inputs(rows) if self.chat else self._prefix_inputs(rows)
        settings = {
            "max_new_tokens": self.config.max_new_tokens,
            "num_beams": self.config.num_beams,
            "do_sample": self.config.do_sample,
        }
        if self.config.do_sample:
            settings.update(temperature=self.config.temperature, top_p=self.config.top_p)
        # Seeded per batch: sampled captions are reproducible for the same batch size.
        torch.manual_seed(self.config.seed)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **settings)
        if self.chat:
            # The chat prompt is an instruction, not part of the caption.
            out = out[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def _prefix_inputs(self, rows: np.ndarray) -> dict:
        inputs = {"pixel_values": self.to_device(rows)}
        prompt = self.config.prompt
        if prompt:
            if self.model.config.model_type == "git":
                # GIT continues from [CLS] + prompt; a trailing [SEP] would end the caption at once.
                ids = [self.tokenizer.cls_token_id, *self.tokenizer(prompt, add_special_tokens=False).input_ids]
                tokens = {"input_ids": self._torch.tensor([ids] * len(rows))}
            else:
                tokens = self.tokenizer([prompt] * len(rows), return_tensors="pt")
            inputs.update({k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")})
        return inputs

    def _chat_inputs(self, rows: np.ndarray) -> dict:
        prompt = chat_prompt(self.processor, self.config.prompt or DEFAULT_CHAT_PROMPT)
        return chat_inputs(self.processor, rows, [prompt] * len(rows), self.device, self.dtype)


def chat_prompt(processor, instruction: str) -> str:
    """One user turn, the image then ``instruction``, through the processor's chat template, ready for the reply."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def chat_inputs(processor, rows: np.ndarray, prompts: list[str], device, dtype) -> dict:
    """Model inputs for one chat prompt per image, padded as the tokenizer's ``padding_side`` says, on ``device``.

    The processor expands each prompt's image placeholder into the tokens the language model expects.
    """
    inputs = processor(images=list(rows), text=prompts, return_tensors="pt", padding=True)
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
