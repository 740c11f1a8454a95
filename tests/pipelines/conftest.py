"""Config for the end-to-end tests that read the sample shards from the S3 server."""

from __future__ import annotations

from pipelines.config import validate_config


def s3_config(s3, tiny_clip_dir, **sections):
    raw = {
        "input": {"uri": "s3://raw/crawl/"},
        "storage": {
            "endpoint_url": s3.endpoint_url,
            "region": s3.region,
            "access_key_id": s3.access_key_id,
            "secret_access_key": s3.secret_access_key,
        },
        "clip": {"model": {"source": str(tiny_clip_dir)}},
        "decode": {"jpeg_draft": False},
        "filter": {"min_clip_score": 0.0},
        "output": {"uri": "s3://lake/enriched"},
        "run_date": "2026-11-01",
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return validate_config(raw)
