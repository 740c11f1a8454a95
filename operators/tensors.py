"""Moving decoded uint8 pixels onto the model's device, normalised there; embedding columns as arrays."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def pixel_rows(pixels: pa.Array, size: tuple[int, int]) -> np.ndarray:
    """Zero-copy (n, H, W, 3) uint8 view of a fixed-size binary pixel column (nulls are zero rows)."""
    if isinstance(pixels, pa.ChunkedArray):
        pixels = pixels.combine_chunks()
    row_bytes = size[0] * size[1] * 3
    if pixels.type.byte_width != row_bytes:
        raise ValueError(
            f"decoded pixels are {pixels.type.byte_width} bytes per image, but the model expects "
            f"{size} RGB ({row_bytes} bytes): decode and the model must use the same image geometry"
        )
    n = len(pixels)
    flat = np.frombuffer(pixels.buffers()[1], dtype=np.uint8, count=n * row_bytes, offset=pixels.offset * row_bytes)
    return flat.reshape(n, size[0], size[1], 3)


class DevicePixels:
    """uint8 images in, model-ready pixel_values out, normalised on the device.

    Only uint8 crosses the host-device link (a quarter of fp32's bytes); rescale and
    normalise are folded into one multiply-add there: ``x * scale + shift``.
    """

    def __init__(self, image_processor, device, dtype):
        import torch

        shape = (1, 3, 1, 1)
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(shape)
        std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(shape)
        rescale = image_processor.rescale_factor if getattr(image_processor, "do_rescale", True) else 1.0
        self.scale = (rescale / std).to(device)
        self.shift = (-mean / std).to(device)
        self.device, self.dtype = device, dtype

    def __call__(self, rows: np.ndarray):
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(rows))
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()
        tensor = tensor.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        return (tensor * self.scale + self.shift).to(self.dtype)


def embedding_rows(column: pa.Array | pa.ChunkedArray, dim: int, reader: str) -> tuple[np.ndarray, np.ndarray]:
    """An (n, dim) float32 array of a list<float32> embedding column (zeros where null), and the usable rows.

    A row is usable when it has an embedding and every value of it is finite: a NaN or
    inf (an fp16 overflow upstream) makes a null score downstream, never an exception.
    ``reader`` names the step in the error for embeddings of the wrong width.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    rows = np.zeros((len(column), dim), np.float32)
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if values.size != int(valid.sum()) * dim:
        widths = sorted(set(pc.list_value_length(column).drop_null().to_pylist()))
        raise ValueError(
            f"{reader} expects {dim}-value embeddings, but image_embedding has "
            f"{', '.join(map(str, widths))} values per row"
        )
    rows[valid] = values.reshape(-1, dim)
    return rows, valid & np.isfinite(rows).all(axis=1)
