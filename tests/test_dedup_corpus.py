"""The planted-duplicate corpus: its ground truth holds, and what each transform does to the pHash.

Run with ``-s`` to see the distance table.
"""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from operators.image.hashes import hamming, phash
from tests import dedup_corpus
from tests.dedup_corpus import ORIGINAL, SIMILAR, TRANSFORMS, planted_corpus, write_corpus_shards

N_ORIGINALS = 12


@pytest.fixture(scope="module")
def corpus():
    return planted_corpus(N_ORIGINALS, seed=0)


@pytest.fixture(scope="module")
def hashes(corpus) -> dict[str, int]:
    return {item.key: phash(Image.open(io.BytesIO(item.image))) for item in corpus}


def distances_by_transform(corpus, hashes) -> dict[str, list[int]]:
    by_transform: dict[str, list[int]] = {}
    for item in corpus:
        partner = item.group or item.similar_to
        if partner:
            by_transform.setdefault(item.transform, []).append(int(hamming(hashes[item.key], hashes[partner])))
    return by_transform


def test_every_original_has_one_copy_per_transform_and_a_distractor(corpus):
    originals = {item.key for item in corpus if item.transform == ORIGINAL}
    assert len(originals) == N_ORIGINALS
    assert Counter(item.transform for item in corpus) == {
        ORIGINAL: N_ORIGINALS,
        SIMILAR: N_ORIGINALS,
        **dict.fromkeys(TRANSFORMS, N_ORIGINALS),
    }
    for original in originals:
        assert sorted(item.transform for item in corpus if item.group == original) == sorted(TRANSFORMS)
        assert sum(item.similar_to == original for item in corpus) == 1
    for item in corpus:
        assert (item.group is None) == (item.transform in (ORIGINAL, SIMILAR))
        assert (item.similar_to is not None) == (item.transform == SIMILAR)


def test_keys_are_img2dataset_style_and_rows_are_shuffled(corpus):
    assert [item.key for item in corpus] == [f"{i:09d}" for i in range(len(corpus))]
    unshuffled = planted_corpus(2, seed=0, shuffle=False)
    group_size = 1 + len(TRANSFORMS) + 1
    assert [item.transform for item in unshuffled] == [ORIGINAL, *TRANSFORMS, SIMILAR] * 2
    positions = {item.key: i for i, item in enumerate(corpus)}
    spans = [
        max(positions[k] for k in members) - min(positions[k] for k in members) + 1
        for members in _group_members(corpus).values()
    ]
    assert max(spans) > group_size  # copies are spread through the rows, not next to their original


def _group_members(corpus) -> dict[str, list[str]]:
    members: dict[str, list[str]] = {}
    for item in corpus:
        members.setdefault(item.group or item.similar_to or item.key, []).append(item.key)
    return members


def test_images_are_photo_sized_jpegs_and_exact_copies_are_the_same_bytes(corpus):
    by_key = {item.key: item for item in corpus}
    for item in corpus:
        with Image.open(io.BytesIO(item.image)) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            if item.transform in (ORIGINAL, SIMILAR):
                assert max(image.size) == 256 and min(image.size) >= 176
        if item.transform == "exact":
            assert item.image == by_key[item.group].image
        elif item.group:
            assert item.image != by_key[item.group].image
            assert item.caption == by_key[item.group].caption
    for item in corpus:
        if item.transform == SIMILAR:
            assert item.caption != by_key[item.similar_to].caption


def test_the_same_seed_gives_the_same_corpus_and_another_seed_another():
    again = planted_corpus(2, seed=0)
    first_two = planted_corpus(2, seed=0)
    assert [(i.key, i.image, i.caption, i.group, i.transform) for i in again] == [
        (i.key, i.image, i.caption, i.group, i.transform) for i in first_two
    ]
    other = planted_corpus(2, seed=1)
    assert {i.image for i in other}.isdisjoint({i.image for i in again})


def test_no_two_groups_are_within_the_separation(corpus, hashes):
    """Originals, distractors and every copy are more than 10 bits from anything of another group."""
    group = {item.key: item.group or item.key for item in corpus}
    keys = list(hashes)
    values = np.array([hashes[k] for k in keys], np.int64)
    groups = np.array([group[k] for k in keys])
    distances = hamming(values[:, None], values[None, :])
    across = groups[:, None] != groups[None, :]
    assert distances[across].min() > 10


def test_phash_distance_per_transform(corpus, hashes):
    by_transform = distances_by_transform(corpus, hashes)
    print(f"\npHash distance to the original over {N_ORIGINALS} originals (min / median / max):")
    for name in (*TRANSFORMS, SIMILAR):
        values = by_transform[name]
        print(f"  {name:13s} {min(values):3d} {np.median(values):6.1f} {max(values):3d}")
    assert set(by_transform["exact"]) == {0}
    for name in ("jpeg_q30", "resize_50", "brightness"):  # what pHash is for: near-invisible to it
        assert max(by_transform[name]) <= 4, name
    assert max(by_transform["text_overlay"]) <= 10
    # A 10% crop moves the image under the fixed 32x32 grid: sometimes inside a threshold of 10, often not.
    assert 4 <= np.median(by_transform["crop_90"]) <= 16
    # Mirroring negates every odd horizontal frequency: as far as an unrelated image, a job for embeddings.
    assert min(by_transform["hflip"]) >= 20
    assert min(by_transform[SIMILAR]) > 10


def test_shards_hold_the_corpus_in_img2dataset_columns(corpus, tmp_path):
    paths = write_corpus_shards(corpus, tmp_path, rows_per_shard=40)
    assert [p.name for p in paths] == [f"{i:05d}.parquet" for i in range(-(-len(corpus) // 40))]
    tables = [pq.read_table(p) for p in paths]
    assert all(t.column_names == ["key", "caption", "jpg"] for t in tables)
    assert [t.num_rows for t in tables[:-1]] == [40] * (len(tables) - 1)
    rows = [row for t in tables for row in t.to_pylist()]
    assert rows == [{"key": i.key, "caption": i.caption, "jpg": i.image} for i in corpus]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest == [
        {"key": i.key, "caption": i.caption, "group": i.group, "transform": i.transform, "similar_to": i.similar_to}
        for i in corpus
    ]


def test_a_subset_of_transforms_and_no_distractors():
    items = planted_corpus(2, seed=3, transforms=("exact", "hflip"), similar_per_original=0)
    assert Counter(i.transform for i in items) == {ORIGINAL: 2, "exact": 2, "hflip": 2}


def test_unknown_transforms_are_refused():
    with pytest.raises(ValueError, match="rotate_90"):
        planted_corpus(1, transforms=("exact", "rotate_90"))


def test_an_unreachable_separation_fails_loudly(monkeypatch):
    monkeypatch.setattr(dedup_corpus, "_MAX_ATTEMPTS", 2)
    with pytest.raises(RuntimeError, match="60 bits"):
        planted_corpus(1, separation=60, transforms=())
