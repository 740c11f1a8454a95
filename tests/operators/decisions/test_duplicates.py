"""Dedup decisions within a group, without Ray: who survives, who is whose duplicate."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from operators import schema as col
from operators.decisions.duplicates import (
    DUP_DATE,
    DUP_KEY,
    METHOD,
    ROW_ID,
    SCORE,
    TONIGHT,
    DedupConfig,
    assign_clusters,
    best_first,
    exact_candidates,
    fit_centroids,
    near_candidates,
    pick_decisions,
    semantic_candidates,
)

D1, D2 = dt.date(2026, 11, 1), dt.date(2026, 11, 2)


def group(rows: list[dict], **columns) -> pa.Table:
    """Rows of a dedup group: earlier runs' rows have a run_date, tonight's a score and a row id."""
    table = {
        col.KEY: [r["key"] for r in rows],
        col.RUN_DATE: pa.array([r.get("date") for r in rows], pa.date32()),
        SCORE: pa.array([r.get("score") for r in rows], pa.float64()),
        TONIGHT: [r.get("date") is None for r in rows],
        ROW_ID: pa.array([r.get("id", -1) for r in rows], pa.int64()),
    }
    return pa.table({**table, **columns})


def decided(candidates: pa.Table) -> dict:
    return {r[ROW_ID]: (r[DUP_KEY], r[DUP_DATE]) for r in candidates.to_pylist()}


def test_earlier_runs_win_oldest_first_then_the_higher_score_then_the_key():
    rows = [
        {"key": "t-low", "score": 0.1, "id": 1},
        {"key": "h-new", "date": D2},
        {"key": "t-b", "score": 0.9, "id": 2},
        {"key": "t-a", "score": 0.9, "id": 3},
        {"key": "h-old", "date": D1},
        {"key": "t-none", "score": None, "id": 4},
    ]
    order = best_first(group(rows))
    assert [rows[i]["key"] for i in order] == ["h-old", "h-new", "t-a", "t-b", "t-low", "t-none"]


def test_exact_copies_of_a_published_row_all_point_at_it_and_it_never_changes():
    rows = [{"key": "t1", "score": 0.9, "id": 1}, {"key": "old", "date": D1}, {"key": "t2", "score": 0.3, "id": 2}]
    assert decided(exact_candidates(group(rows))) == {1: ("old", D1), 2: ("old", D1)}


def test_within_a_run_the_best_scoring_copy_survives():
    rows = [
        {"key": "a", "score": 0.2, "id": 1},
        {"key": "b", "score": 0.8, "id": 2},
        {"key": "c", "score": 0.5, "id": 3},
    ]
    assert decided(exact_candidates(group(rows))) == {1: ("b", None), 3: ("b", None)}


def test_a_group_of_earlier_rows_only_decides_nothing():
    rows = [{"key": "a", "date": D1}, {"key": "b", "date": D2}]
    assert exact_candidates(group(rows)).num_rows == 0


def brute_force_near(hashes: np.ndarray, rows: list[dict], max_distance: int) -> dict:
    """The closest better row within max_distance for each of tonight's rows, over all pairs."""
    table = group(rows)
    order = list(best_first(table))
    rank = {i: order.index(i) for i in range(len(rows))}
    out = {}
    for i, row in enumerate(rows):
        if row.get("date") is not None:
            continue
        better = [
            (bin((int(hashes[i]) ^ int(hashes[j])) & (2**64 - 1)).count("1"), rank[j], j)
            for j in range(len(rows))
            if rank[j] < rank[i]
        ]
        within = sorted(b for b in better if b[0] <= max_distance)
        if within:
            j = within[0][2]
            out[row["id"]] = (rows[j]["key"], rows[j].get("date"))
    return out


@pytest.mark.parametrize("max_distance", [0, 3, 8])
def test_near_finds_the_closest_better_row_like_brute_force(max_distance):
    rng = np.random.default_rng(max_distance)
    base = rng.integers(-(2**63), 2**63 - 1, size=8, dtype=np.int64)
    hashes, rows = [], []
    for i in range(60):  # rows near a few bases: every distance from 0 to 12 bits occurs
        flips = rng.choice(64, size=rng.integers(0, 13), replace=False)
        hashes.append(base[i % 8] ^ np.int64(sum(1 << int(f) for f in flips) - (1 << 64 if 63 in flips else 0)))
        rows.append(
            {"key": f"k{i:02d}", "date": D1}
            if i % 5 == 0
            else {"key": f"k{i:02d}", "score": float(rng.random()), "id": i}
        )
    hashes = np.array(hashes, np.int64)
    got = decided(near_candidates(group(rows, **{col.IMAGE_PHASH: hashes}), max_distance))
    assert got == brute_force_near(hashes, rows, max_distance)
    assert got  # the case is not empty


def test_semantic_marks_rows_above_the_cosine_threshold_against_a_better_row():
    rng = np.random.default_rng(0)
    anchor = rng.standard_normal(16)
    far = rng.standard_normal(16)
    vectors = np.stack([anchor, anchor + 0.05 * rng.standard_normal(16), far, anchor + 0.9 * rng.standard_normal(16)])
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    rows = [
        {"key": "a", "score": 0.9, "id": 1},
        {"key": "b", "score": 0.5, "id": 2},
        {"key": "c", "score": 0.4, "id": 3},
        {"key": "d", "score": 0.3, "id": 4},
    ]
    cosine = vectors @ vectors[0]
    assert cosine[1] > 0.99 and cosine[3] < 0.9  # what the case is about
    assert decided(semantic_candidates(group(rows), vectors, eps=0.01)) == {2: ("a", None)}


def test_one_decision_per_row_exact_before_near_before_semantic():
    rows = [{"key": "winner", "date": D1}, {"key": "other", "date": D2}, {"key": "t", "score": 0.5, "id": 7}]
    table = group(rows, **{col.IMAGE_PHASH: np.array([0, 1, 0], np.int64)})
    near = near_candidates(table, 2)
    exact = exact_candidates(group([rows[1], rows[2]]))  # an exact copy of "other"
    picked = pick_decisions(pa.concat_tables([near, exact]))
    assert picked.num_rows == 1
    assert picked.to_pylist()[0][METHOD] == col.DUPLICATE_EXACT and picked.to_pylist()[0][DUP_KEY] == "other"


def test_kmeans_recovers_planted_clusters_and_assigns_each_row_to_its_nearest_centroid():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((4, 32))
    points = np.concatenate([c + 0.05 * rng.standard_normal((50, 32)) for c in centres])
    points = (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)
    centroids = fit_centroids(points, 4, iterations=20, seed=0)
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    clusters = assign_clusters(points, centroids)
    assert all(len(set(clusters[i * 50 : (i + 1) * 50])) == 1 for i in range(4))  # one cluster per planted group
    assert len(set(clusters)) == 4
    assert np.array_equal(clusters, np.argmax(points @ centroids.T, axis=1))
    assert np.array_equal(centroids, fit_centroids(points, 4, iterations=20, seed=0))  # same fit every time


def test_config_rejects_an_unknown_key_and_a_keep_by_that_is_not_a_score():
    with pytest.raises(ValidationError, match="max_distanc"):
        DedupConfig.model_validate({"near": {"max_distanc": 3}})
    with pytest.raises(ValidationError, match="keep_by"):
        DedupConfig.model_validate({"exact": True, "keep_by": "caption"})
    assert not DedupConfig().enabled and DedupConfig(exact=True).enabled


def test_groups_of_one_shuffle_bucket_are_decided_apart():
    rows = [
        {"key": "a", "score": 0.9, "id": 1},
        {"key": "b", "score": 0.5, "id": 2},
        {"key": "c", "score": 0.8, "id": 3},
        {"key": "d", "score": 0.1, "id": 4},
    ]
    table = group(rows, **{col.IMAGE_PHASH: np.zeros(4, np.int64)})  # every pair at distance 0
    got = decided(near_candidates(table, 0, groups=[np.array([0, 3]), np.array([1, 2])]))
    assert got == {4: ("a", None), 2: ("c", None)}  # b is not a duplicate of a: they share no group
    assert decided(exact_candidates(table, groups=[np.array([1, 2]), np.array([0, 3])])) == got
