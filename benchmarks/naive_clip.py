"""The naive script people write first: read Parquet, PIL-decode, the model's own processor, CLIP, batch 32.

Also a whole program (``python -m benchmarks.naive_clip MODEL_DIR OUT.parquet SHARD...``),
so the benchmark can time it as a user would time a script, imports and model load included.
"""

from __future__ import annotations

import io
import pathlib
import sys

import pyarrow as pa
import pyarrow.parquet as pq

NAIVE_BATCH = 32


def score_shards(model_dir: pathlib.Path, paths: list[pathlib.Path], device, dtype) -> pa.Table:
    """Key and CLIP score of every row of ``paths``, the straightforward way."""
    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    processor = CLIPProcessor.from_pretrained(model_dir)
    keys, scores = [], []
    for path in paths:
        for chunk in pq.ParquetFile(path).iter_batches(batch_size=NAIVE_BATCH, columns=["key", "caption", "jpg"]):
            images = [Image.open(io.BytesIO(b)).convert("RGB") for b in chunk.column("jpg").to_pylist()]
            inputs = processor(
                images=images,
                text=chunk.column("caption").to_pylist(),
                padding=True,
                truncation=True,
                return_tensors="pt",
            ).to(device)
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            with torch.no_grad():
                out = model(**inputs)
            image = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
            text = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
            keys += chunk.column("key").to_pylist()
            scores += (image * text).sum(-1).cpu().tolist()
    return pa.table({"key": keys, "clip_score": pa.array(scores, pa.float32())})


def main(argv: list[str]) -> None:
    import torch

    model_dir, out, *shards = argv
    pq.write_table(
        score_shards(pathlib.Path(model_dir), [pathlib.Path(s) for s in shards], torch.device("cpu"), torch.float32),
        out,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
