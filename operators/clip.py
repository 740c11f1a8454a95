"""CLIP-family embedding and image-text matching score (GPU actor, CPU fallback)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from operators import schema as col
from operators.decode import PixelSpec
from operators.models import (
    ModelRef,
    Precision,
    load_model,
    load_preprocessor,
    pick_device_and_dtype,
    resolve_model_dir,
)
from operators.resources import Resources
from operators.storage import StorageOptions
from operators.tensors import DevicePixels, pixel_rows


class ClipConfig(BaseModel):
    """Which CLIP-family model (CLIP, SigLIP) to run and how."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelRef
    precision: Precision = "auto"
    max_text_tokens: int | None = Field(None, ge=1)
    resources: Resources = Resources(num_cpus=1, num_gpus=None, batch_size=128)


class ClipScorer:
    """Embed images and captions with one pass of each tower; score their cosine similarity.

    Appends ``image_embedding`` and ``text_embedding`` (L2-normalised float32 lists)
    and ``clip_score`` (float32). Rows without pixels get a null image embedding,
    rows with an empty caption a null text embedding, and either gets a null score.
    """

    input_columns = (col.PIXELS, col.CAPTION)
    output_columns = (col.IMAGE_EMBEDDING, col.TEXT_EMBEDDING, col.CLIP_SCORE)

    def __init__(self, config: ClipConfig, storage: StorageOptions):
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        ref = config.model
        model_dir = resolve_model_dir(ref, storage)
        self.device, self.dtype = pick_device_and_dtype(config.precision)
        self.model = load_model(AutoModel, ref, model_dir, self.device, self.dtype)
        self.tokenizer = load_preprocessor(AutoTokenizer, ref, model_dir)
        processor = load_preprocessor(AutoImageProcessor, ref, model_dir)
        self.pixels = PixelSpec.from_image_processor(processor)
        self.to_device = DevicePixels(processor, self.device, self.dtype)
        text_config = self.model.config.text_config
        self.max_text_tokens = config.max_text_tokens or text_config.max_position_embeddings
        # SigLIP was trained on fixed-length padded text; CLIP on dynamic padding.
        self._padding = "max_length" if "siglip" in self.model.config.model_type else True

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        pixels = batch.column(col.PIXELS).combine_chunks()
        rows = pixel_rows(pixels, self.pixels.out_size)
        has_image = pc.is_valid(pixels).to_numpy(zero_copy_only=False)
        captions = batch.column(col.CAPTION).to_pylist()
        has_text = _has_text(captions)
        generated = batch.column(col.CAPTION_GENERATED).to_pylist() if col.CAPTION_GENERATED in batch.column_names else None
        has_generated = _has_text(generated) if generated is not None else np.zeros(n, bool)

        image_emb = _scatter(self.embed_images(rows[has_image]), has_image)
        # One text-tower pass for original and generated captions together.
        texts = [c for c, ok in zip(captions, has_text) if ok]
        texts += [c for c, ok in zip(generated or [], has_generated) if ok]
        text_emb = self.embed_texts(texts)
        original_emb = _scatter(text_emb[: has_text.sum()], has_text)
        generated_emb = _scatter(text_emb[has_text.sum() :], has_generated)

        scores, scored = _cosine(image_emb, original_emb, has_image & has_text)
        out = (
            batch.append_column(col.IMAGE_EMBEDDING, _list_column(image_emb[has_image], has_image))
            .append_column(col.TEXT_EMBEDDING, _list_column(original_emb[has_text], has_text))
            .append_column(col.CLIP_SCORE, pa.array(scores, pa.float32(), mask=~scored))
        )
        if generated is None:
            return out
        gen_scores, gen_scored = _cosine(image_emb, generated_emb, has_image & has_generated)
        # The generated caption wins only by scoring strictly higher, or when the original has no score.
        use_generated = gen_scored & (~scored | (gen_scores > scores))
        best_scored = scored | gen_scored
        best = [g if use else c for c, g, use in zip(captions, generated, use_generated)]
        source = np.where(use_generated, col.SOURCE_GENERATED, col.SOURCE_ORIGINAL)
        return (
            out.append_column(col.CLIP_SCORE_GENERATED, pa.array(gen_scores, pa.float32(), mask=~gen_scored))
            .append_column(col.CAPTION_BEST, pa.array(best, pa.string(), mask=~best_scored))
            .append_column(col.CAPTION_SOURCE, pa.array(source.tolist(), pa.string(), mask=~best_scored))
            .append_column(
                col.CLIP_SCORE_BEST,
                pa.array(np.where(use_generated, gen_scores, scores), pa.float32(), mask=~best_scored),
            )
        )

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


def _has_text(texts: list[str | None]) -> np.ndarray:
    return np.array([bool(t and t.strip()) for t in texts], dtype=bool)


def _scatter(embeddings: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Embeddings of the valid rows placed into a zero-filled (n, dim) array."""
    full = np.zeros((len(valid), embeddings.shape[1]), np.float32)
    full[valid] = embeddings
    return full


def _cosine(a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise dot products of unit vectors (NaN where not valid), and the validity."""
    scores = np.full(len(valid), np.nan, dtype=np.float32)
    scores[valid] = np.einsum("ij,ij->i", a[valid], b[valid])
    return scores, valid


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
