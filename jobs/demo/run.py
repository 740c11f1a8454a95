"""``vlpipe demo``: sample shards, a tiny trained CLIP and BLIP captioner, random heads, then a real run
of the demo config."""

from __future__ import annotations

import logging
from pathlib import Path

from jobs.demo import (
    DEMO_CAPTIONER_TRAIN_STEPS,
    build_random_head,
    build_tiny_blip_captioner,
    build_tiny_clip,
    write_sample_shards,
)
from jobs.demo.photos import write_demo_photos
from pipelines.config import load_config
from pipelines.run import run_pipeline
from pipelines.table.records import RunRecord

log = logging.getLogger(__name__)

DEMO_DIR = Path(".cache/demo")
# Enough contrastive steps for the tiny model to tell matched from mismatched pairs.
DEMO_TRAIN_STEPS = 300
# Planted copies (exact, re-encoded, resized) for the demo's dedup to catch.
DEMO_DUPLICATES_PER_SHARD = 3
# scikit-image's photographs and rendered text: what the OCR and open_nsfw stages have real answers for.
PHOTOS_SHARD = "photos.parquet"


def prepare_demo_assets(root: Path = DEMO_DIR) -> None:
    """Generate the sample shards and the tiny model once; later runs reuse them."""
    from transformers.utils import logging as transformers_logging

    # save_pretrained draws a "Writing model shards" bar per model between the demo's log lines.
    transformers_logging.disable_progress_bar()
    shards = root / "shards"
    if not (shards / "manifest.json").exists():
        log.info("writing sample shards to %s", shards)
        write_sample_shards(shards, duplicates_per_shard=DEMO_DUPLICATES_PER_SHARD)
    if not (shards / PHOTOS_SHARD).exists():
        log.info("writing real photographs and text images to %s", shards / PHOTOS_SHARD)
        write_demo_photos(shards / PHOTOS_SHARD)
    log.info("preparing the tiny CLIP model in %s (trained once, then cached)", root / "tiny-clip")
    build_tiny_clip(root / "tiny-clip", train_steps=DEMO_TRAIN_STEPS)
    log.info("preparing the tiny BLIP captioner in %s (trained once, then cached)", root / "tiny-blip")
    build_tiny_blip_captioner(root / "tiny-blip", train_steps=DEMO_CAPTIONER_TRAIN_STEPS)
    # The tiny CLIP's embeddings have 32 values; the released heads take ViT-L/14's 768, so the demo's are random.
    for seed, (name, arch) in enumerate((("aesthetic", "aesthetic-v2"), ("nsfw", "nsfw"))):
        build_random_head(root / "heads" / name, arch, embedding_dim=32, clip_model="tiny-clip", seed=seed)


def run_demo(config_path: str) -> RunRecord:
    """Prepare the assets and run the demo config through the production pipeline."""
    prepare_demo_assets()
    return run_pipeline(load_config(config_path))
