"""CLIP-family embedding and image-text matching score (GPU actor, CPU fallback)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from operators import schema as col
from operators.decode import PixelSpec
from operators.models import ModelRef, Precision, pick_device_and_dtype, resolve_model_dir
from operators.resources import Resources
from operators.storage import StorageOptions


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
        import torch
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        ref = config.model
        model_dir = resolve_model_dir(ref, storage)
        self.device, self.dtype = pick_device_and_dtype(config.precision)
        self.model = AutoModel.from_pretrained(
            model_dir,
            dtype=self.dtype,
            use_safetensors=None if ref.allow_pickle_weights else True,
            trust_remote_code=ref.trust_remote_code,
        ).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=ref.trust_remote_code)
        processor = AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=ref.trust_remote_code)
        self.pixels = PixelSpec.from_image_processor(processor)
        height, width = self.pixels.out_size
        self._row_bytes = height * width * 3
        shape = (1, 3, 1, 1)
        mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(shape)
        std = torch.tensor(processor.image_std, dtype=torch.float32).view(shape)
        # Fold rescale and normalise into one multiply-add on the device: x * scale + shift.
        self._scale = (processor.rescale_factor / std).to(self.device)
        self._shift = (-mean / std).to(self.device)
        text_config = self.model.config.text_config
        self.max_text_tokens = config.max_text_tokens or text_config.max_position_embeddings
        # SigLIP was trained on fixed-length padded text; CLIP on dynamic padding.
        self._padding = "max_length" if "siglip" in self.model.config.model_type else True

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        pixels = batch.column(col.PIXELS).combine_chunks()
        if pa.types.is_fixed_size_binary(pixels.type) and pixels.type.byte_width != self._row_bytes:
            raise ValueError(
                f"decoded pixels are {pixels.type.byte_width} bytes per image, but the model "
                f"expects {self.pixels.out_size} RGB ({self._row_bytes} bytes): decode and CLIP "
                "must use the same image processor geometry"
            )
        has_image = pc.is_valid(pixels).to_numpy(zero_copy_only=False)
        captions = batch.column(col.CAPTION).to_pylist()
        has_text = np.array([bool(c and c.strip()) for c in captions], dtype=bool)

        image_emb = self.embed_images(_pixel_rows(pixels, self._row_bytes, self.pixels.out_size)[has_image])
        text_emb = self.embed_texts([c for c, ok in zip(captions, has_text) if ok])

        scores = np.full(n, np.nan, dtype=np.float32)
        both = has_image & has_text
        if both.any():
            full_img = np.zeros((n, image_emb.shape[1]), np.float32)
            full_txt = np.zeros((n, text_emb.shape[1]), np.float32)
            full_img[has_image], full_txt[has_text] = image_emb, text_emb
            scores[both] = np.einsum("ij,ij->i", full_img[both], full_txt[both])
        return (
            batch.append_column(col.IMAGE_EMBEDDING, _list_column(image_emb, has_image))
            .append_column(col.TEXT_EMBEDDING, _list_column(text_emb, has_text))
            .append_column(col.CLIP_SCORE, pa.array(scores, pa.float32(), mask=~both))
        )

    def embed_images(self, rows: np.ndarray) -> np.ndarray:
        """L2-normalised embeddings for an (n, H, W, 3) uint8 array."""
        import torch

        if len(rows) == 0:
            return np.zeros((0, self._embed_dim()), np.float32)
        with torch.inference_mode():
            tensor = torch.from_numpy(rows)
            if self.device.type == "cuda":
                tensor = tensor.pin_memory()
            tensor = tensor.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
            tensor = (tensor * self._scale + self._shift).to(self.dtype)
            features = _pooled(self.model.get_image_features(pixel_values=tensor))
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


def _pooled(output):
    """transformers 5 returns a model output whose pooler_output is the projected feature."""
    return output if hasattr(output, "ndim") else output.pooler_output


def _normalised(features) -> np.ndarray:
    import torch

    # Normalise in fp32 on the device: bf16 norms lose the third decimal of the score.
    return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()


def _pixel_rows(pixels: pa.FixedSizeBinaryArray, row_bytes: int, size: tuple[int, int]) -> np.ndarray:
    """Zero-copy (n, H, W, 3) view of a fixed-size binary column."""
    n = len(pixels)
    data = pixels.buffers()[1]
    flat = np.frombuffer(data, dtype=np.uint8, count=n * row_bytes, offset=pixels.offset * row_bytes)
    return flat.reshape(n, size[0], size[1], 3)


def _list_column(embeddings: np.ndarray, valid: np.ndarray) -> pa.Array:
    """A list<float32> column with one embedding per valid row and nulls elsewhere."""
    dim = embeddings.shape[1] if embeddings.ndim == 2 else 0
    offsets = np.zeros(len(valid) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum(valid.astype(np.int32) * dim)
    values = pa.array(embeddings.reshape(-1), pa.float32())
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(~valid))
