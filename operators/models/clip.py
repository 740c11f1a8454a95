"""CLIP-family embedding and image-text matching score (GPU actor, CPU fallback)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator

from operators import schema as col
from operators.models.load import ModelOperator, Precision
from operators.refs import ModelRef
from operators.resources import Resources
from operators.stage import Stage
from operators.storage import StorageOptions
from operators.tensors import pixel_rows

TAG_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class ClipConfig(BaseModel):
    """Which CLIP-family model (CLIP, SigLIP) to run and how."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelRef
    precision: Precision = "auto"
    max_text_tokens: int | None = Field(None, ge=1)
    resources: Resources = Resources(num_cpus=1, num_gpus=None, batch_size=128)


class TagConfig(BaseModel):
    """A zero-shot tag: its score is the softmax probability mass of ``positives`` over all its prompts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # With no negatives the softmax over the positives alone is always 1: both lists need a prompt.
    positives: tuple[str, ...] = Field(min_length=1)
    negatives: tuple[str, ...] = Field(min_length=1)

    @field_validator("positives", "negatives")
    @classmethod
    def _no_empty_prompts(cls, prompts: tuple[str, ...]) -> tuple[str, ...]:
        if any(not p.strip() for p in prompts):
            raise ValueError("a prompt is empty")
        return prompts


def check_tag_names(tags: Mapping[str, TagConfig]) -> Mapping[str, TagConfig]:
    """Tag names are keys in ``tag_scores`` and in ``filter.tags``: plain words only."""
    bad = [name for name in tags if not TAG_NAME.match(name)]
    if bad:
        raise ValueError(f"tag names may use letters, digits, '_', '.', '-' only: {', '.join(map(repr, bad))}")
    return tags


def clip_stage(
    config: ClipConfig,
    storage: StorageOptions,
    *,
    captions_generated: bool,
    geometry: str,
    tags: Mapping[str, TagConfig] = {},
) -> Stage:
    """The CLIP stage's contract; ``captions_generated`` when a captioner runs before it, ``tags`` when configured."""
    prompts = sum(len(t.positives) + len(t.negatives) for t in tags.values())
    return Stage(
        name="clip",
        kind="actor",
        config_key="clip",
        resources=config.resources,
        model=config.model,
        reads=(col.PIXELS, col.CAPTION, *((col.CAPTION_GENERATED,) if captions_generated else ())),
        adds=(
            col.IMAGE_EMBEDDING,
            col.TEXT_EMBEDDING,
            col.CLIP_SCORE,
            *((col.CLIP_SCORE_GENERATED,) if captions_generated else ()),
            *((col.TAG_SCORES,) if tags else ()),
        ),
        build=partial(ClipScorer, config, storage, dict(tags)),
        details=(
            f"input {geometry}",
            f"precision {config.precision}",
            *([f"zero-shot tags {', '.join(tags)} ({prompts} prompts, embedded once per actor)"] if tags else []),
        ),
    )


class ClipScorer(ModelOperator):
    """Embed images and captions with one pass of each tower; score their cosine similarity.

    Appends ``image_embedding`` and ``text_embedding`` (L2-normalised float32 lists)
    and ``clip_score`` (float32). Rows without pixels get a null image embedding,
    rows with an empty caption a null text embedding, and either gets a null score.
    With a ``caption_generated`` column (captioning on), the generated caption goes
    through the same text-tower pass and ``clip_score_generated`` is appended too.
    With ``tags``, ``tag_scores`` maps each tag to the softmax probability of its
    positive prompts among all its prompts, at the model's logit scale, from the same
    image embedding; the prompts are embedded once, here.
    """

    def __init__(self, config: ClipConfig, storage: StorageOptions, tags: Mapping[str, TagConfig] = {}):
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        super().__init__(config.model, config.precision, storage, AutoModel)
        self.tokenizer = self.preprocessor(AutoTokenizer)
        self.pixel_input(self.preprocessor(AutoImageProcessor))
        text_config = self.model.config.text_config
        self.max_text_tokens = config.max_text_tokens or text_config.max_position_embeddings
        # SigLIP was trained on fixed-length padded text; CLIP on dynamic padding.
        self._padding = "max_length" if "siglip" in self.model.config.model_type else True
        self.tags = ZeroShotTags(tags, self.embed_texts, float(self.model.logit_scale.detach().exp())) if tags else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        pixels = batch.column(col.PIXELS).combine_chunks()
        rows = pixel_rows(pixels, self.geometry.out_size)
        has_image = pc.is_valid(pixels).to_numpy(zero_copy_only=False)
        captions = batch.column(col.CAPTION).to_pylist()
        has_text = _has_text(captions)
        generated = (
            batch.column(col.CAPTION_GENERATED).to_pylist() if col.CAPTION_GENERATED in batch.column_names else None
        )
        has_generated = _has_text(generated) if generated is not None else np.zeros(batch.num_rows, bool)

        image_emb = _scatter(self.embed_images(rows[has_image]), has_image)
        # One text-tower pass for original and generated captions together.
        texts = [c for c, ok in zip(captions, has_text) if ok]
        texts += [c for c, ok in zip(generated or [], has_generated) if ok]
        text_emb = self.embed_texts(texts)
        original_emb = _scatter(text_emb[: has_text.sum()], has_text)
        scores = _cosine(image_emb, original_emb, has_image & has_text)
        out = (
            batch.append_column(col.IMAGE_EMBEDDING, _list_column(image_emb[has_image], has_image))
            .append_column(col.TEXT_EMBEDDING, _list_column(original_emb[has_text], has_text))
            .append_column(col.CLIP_SCORE, _score_column(scores, has_image & has_text))
        )
        if generated is not None:
            generated_emb = _scatter(text_emb[has_text.sum() :], has_generated)
            gen_scores = _cosine(image_emb, generated_emb, has_image & has_generated)
            out = out.append_column(col.CLIP_SCORE_GENERATED, _score_column(gen_scores, has_image & has_generated))
        if self.tags is not None:
            out = out.append_column(
                col.TAG_SCORES, self.tags(image_emb, has_image & np.isfinite(image_emb).all(axis=1))
            )
        return out

    def embed_images(self, rows: np.ndarray) -> np.ndarray:
        """L2-normalised embeddings for an (n, H, W, 3) uint8 array."""
        import torch

        if len(rows) == 0:
            return np.zeros((0, self._embed_dim()), np.float32)
        with torch.inference_mode():
            features = _pooled(self.model.get_image_features(pixel_values=self.to_device(rows)))
            return _normalised(features)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """L2-normalised embeddings for captions, truncated to the model's context."""
        import torch

        if not texts:
            return np.zeros((0, self._embed_dim()), np.float32)
        tokens = self.tokenizer(
            texts, padding=self._padding, truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            kwargs = {"input_ids": tokens["input_ids"]}
            if "attention_mask" in tokens and self._padding is True:
                kwargs["attention_mask"] = tokens["attention_mask"]
            return _normalised(_pooled(self.model.get_text_features(**kwargs)))

    def _embed_dim(self) -> int:
        return int(getattr(self.model.config, "projection_dim", None) or self.model.config.text_config.hidden_size)


class ZeroShotTags:
    """Tag scores from image embeddings: per tag, the softmax over its prompts, summed over the positives.

    ``embed_texts`` embeds the prompts once (L2-normalised); ``logit_scale`` is the
    model's own (``exp`` of its learned log scale), so probabilities are as sharp as
    the model's contrastive training made them.
    """

    def __init__(self, tags: Mapping[str, TagConfig], embed_texts, logit_scale: float):
        self.names = list(tags)
        prompts = [p for t in tags.values() for p in (*t.positives, *t.negatives)]
        self.prompts = embed_texts(prompts)
        self.logit_scale = logit_scale
        self.slices, start = [], 0
        for tag in tags.values():
            end = start + len(tag.positives) + len(tag.negatives)
            self.slices.append((start, start + len(tag.positives), end))
            start = end

    def scores(self, image_emb: np.ndarray) -> np.ndarray:
        """(n, tags) float32 scores for (n, dim) L2-normalised image embeddings."""
        logits = self.logit_scale * (image_emb.astype(np.float32) @ self.prompts.T)
        out = np.empty((len(image_emb), len(self.names)), np.float32)
        for j, (start, positives_end, end) in enumerate(self.slices):
            part = logits[:, start:end]
            weights = np.exp(part - part.max(axis=1, keepdims=True))  # stable softmax
            out[:, j] = weights[:, : positives_end - start].sum(axis=1) / weights.sum(axis=1)
        return out

    def __call__(self, image_emb: np.ndarray, valid: np.ndarray) -> pa.Array:
        """A map<string, float32> column: every tag for rows with a usable embedding, null elsewhere."""
        n, k = len(valid), len(self.names)
        values = self.scores(image_emb[valid]).reshape(-1)
        offsets = np.zeros(n + 1, np.int32)
        offsets[1:] = np.cumsum(valid.astype(np.int32) * k)
        keys = pa.array(self.names * int(valid.sum()), pa.string())
        return pa.MapArray.from_arrays(
            pa.array(offsets), keys, pa.array(values, pa.float32()), type=col.TAG_SCORES_TYPE, mask=pa.array(~valid)
        )


def _has_text(texts: list[str | None]) -> np.ndarray:
    return np.array([bool(t and t.strip()) for t in texts], dtype=bool)


def _scatter(embeddings: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Embeddings of the valid rows placed into a zero-filled (n, dim) array."""
    full = np.zeros((len(valid), embeddings.shape[1]), np.float32)
    full[valid] = embeddings
    return full


def _cosine(a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Row-wise dot products of unit vectors (NaN where not valid)."""
    scores = np.full(len(valid), np.nan, dtype=np.float32)
    scores[valid] = np.einsum("ij,ij->i", a[valid], b[valid])
    return scores


def _score_column(scores: np.ndarray, valid: np.ndarray) -> pa.Array:
    # A NaN or inf embedding (fp16 overflow) gives a null score, never a NaN in the table.
    return pa.array(scores, pa.float32(), mask=~(valid & np.isfinite(scores)))


def _pooled(output):
    """transformers 5 returns a model output whose pooler_output is the projected feature."""
    return output if hasattr(output, "ndim") else output.pooler_output


def _normalised(features) -> np.ndarray:
    import torch

    # Normalise in fp32 on the device: bf16 norms lose the third decimal of the score.
    return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()


def _list_column(embeddings: np.ndarray, valid: np.ndarray) -> pa.Array:
    """A list<float32> column with one embedding per valid row and nulls elsewhere."""
    dim = embeddings.shape[1] if embeddings.ndim == 2 else 0
    offsets = np.zeros(len(valid) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum(valid.astype(np.int32) * dim)
    values = pa.array(embeddings.reshape(-1), pa.float32())
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(~valid))
