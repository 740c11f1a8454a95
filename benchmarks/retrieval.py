"""``make bench BENCH_ARGS=--retrieval``: the approximate index `vlpipe index` builds, against exact search.

Vectors: 100k unit vectors of 512 values (ViT-B/32's width) in 1,000 clusters of uneven size
(Zipf), each point at cosine ~0.7 to its centre, like the embeddings of a crawl. Queries of two
kinds, 1,000 each, none of them indexed: "image" queries are new points of the same clusters;
"text" queries are shifted by one shared offset (CLIP's modality gap), at cosine ~0.3 to their
cluster's points, the way a caption's embedding sits against the images'.

- recall@10 of the index ``choose_index`` picks at this size, with the search parameters the
  build's own tuning picks (on 128 queries of each kind drawn like the build draws them),
  against ``IndexFlatIP``; target >= 0.95;
- build time as ``build_index`` spends it without the I/O: train on the sample, encode in ten
  parts, assemble, tune;
- query latency, one query at a time on one thread: p50 and p99, exact at the flat threshold
  and at 100k, and the approximate index;
- end to end: ``build_index`` on a Delta table of the same vectors (two run dates), in this
  process and on Ray.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import pathlib
import shutil
import time

import numpy as np
import pyarrow as pa

from operators import schema as col
from pipelines.search import vectors as vi

log = logging.getLogger(__name__)

DIM, CLUSTERS, QUERIES, LATENCY_QUERIES = 512, 1_000, 1_000, 500
POINT_NOISE, GAP, TEXT_NOISE = 1.0, 1.0, 1.6


def retrieval(work_dir: pathlib.Path, rows: int = 100_000, *, dim: int = DIM, end_to_end: bool = True) -> dict:
    """Every figure of the module docstring, for ``rows`` vectors."""
    import faiss

    rng = np.random.default_rng(0)
    data, (image_q, text_q), (image_tune, text_tune) = _corpus(rng, rows, dim)
    choice = vi.choose_index(rows, dim)
    build = _build(choice, data, image_tune, text_tune)
    exact = faiss.IndexFlatIP(dim)
    exact.add(data)
    truth = {kind: exact.search(q, vi.RECALL_K)[1] for kind, q in (("image", image_q), ("text", text_q))}
    index = build.pop("index")
    recall = {
        kind: vi.recall_at_k(index.search(q, vi.RECALL_K)[1], truth[kind])
        for kind, q in (("image", image_q), ("text", text_q))
    }
    flat_small = faiss.IndexFlatIP(dim)
    flat_small.add(data[: vi.FLAT_MAX_ROWS])
    latency = {
        f"exact {vi.FLAT_MAX_ROWS}": _latency(flat_small, text_q),
        f"exact {rows}": _latency(exact, text_q),
        choice.key: _latency(index, text_q),
    }
    result = {
        "rows": rows,
        "dim": dim,
        "index": choice.key,
        "reason": choice.reason,
        "params": build["params"],
        "tuned_recall": build["tuned_recall"],
        "recall_at_10": recall,
        "build": build["seconds"],
        "latency_ms": latency,
    }
    if end_to_end:
        result["end_to_end"] = _end_to_end(work_dir, data, text_q)
    return result


def _corpus(rng, rows: int, dim: int):
    """Indexed points, held-out queries of both kinds, and the build's tuning queries of both kinds."""
    centres = _unit(rng.normal(size=(CLUSTERS, dim)))
    weights = 1.0 / np.arange(1, CLUSTERS + 1)
    draw = lambda n: rng.choice(CLUSTERS, size=n, p=weights / weights.sum())  # noqa: E731
    gap = _unit(rng.normal(size=(1, dim)))

    def points(n: int) -> np.ndarray:
        return _unit(centres[draw(n)] + POINT_NOISE * _unit(rng.normal(size=(n, dim))))

    def texts(n: int) -> np.ndarray:
        return _unit(centres[draw(n)] + GAP * gap + TEXT_NOISE * _unit(rng.normal(size=(n, dim))))

    data = points(rows)
    # The build tunes on sampled rows' own vectors and their captions' embeddings.
    return data, (points(QUERIES), texts(QUERIES)), (data[:128], texts(128))


def _build(choice: vi.IndexChoice, data: np.ndarray, image_tune: np.ndarray, text_tune: np.ndarray) -> dict:
    seconds = {}
    start = time.perf_counter()
    template = vi.train(choice.key, data.shape[1], data[: choice.train_rows])
    seconds["train"] = time.perf_counter() - start
    start = time.perf_counter()
    assembler, encoder = vi.Assembler(template), vi.Encoder(template)
    for part in np.array_split(data, 10):
        assembler.add(encoder(part))
    seconds["encode_and_assemble"] = time.perf_counter() - start
    start = time.perf_counter()
    tuning = vi.tune(assembler.index, {"image": image_tune, "text": text_tune}) if choice.lists else None
    seconds["tune"] = time.perf_counter() - start
    seconds = {k: round(v, 2) for k, v in seconds.items()}
    seconds["total"] = round(sum(seconds.values()), 2)
    return {
        "index": assembler.index,
        "params": tuning.params if tuning else {},
        "tuned_recall": tuning.recall if tuning else None,
        "seconds": seconds,
        "train_rows": choice.train_rows,
    }


def _latency(index, queries: np.ndarray) -> dict[str, float]:
    """p50 and p99 of single queries on one thread (how an interactive search runs)."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        times = []
        for q in queries[:LATENCY_QUERIES]:
            start = time.perf_counter()
            index.search(q[None], vi.RECALL_K)
            times.append(time.perf_counter() - start)
    finally:
        faiss.omp_set_num_threads(threads)
    return {name: round(float(np.percentile(times, q)) * 1e3, 3) for name, q in (("p50", 50), ("p99", 99))}


def _end_to_end(work_dir: pathlib.Path, data: np.ndarray, text_q: np.ndarray) -> dict:
    """``build_index`` on a Delta table holding the vectors (the other tower: the text-like queries, recycled)."""
    from deltalake import CommitProperties, write_deltalake

    from pipelines.search.index import IndexRequest, build_index

    root = work_dir / "retrieval"
    shutil.rmtree(root, ignore_errors=True)
    table = root / "table"
    models = json.dumps({"clip": {"source": "bench/random-vectors", "revision": None}})
    for day, part in zip((dt.date(2026, 11, 1), dt.date(2026, 11, 2)), np.array_split(np.arange(len(data)), 2)):
        run_id = f"bench-{day}"
        write_deltalake(
            str(table),
            _rows(data, text_q, part, day, run_id),
            mode="append",
            partition_by=[col.RUN_DATE],
            target_file_size=32 << 20,
            commit_properties=CommitProperties(custom_metadata={"vlpipe.run_id": run_id, "vlpipe.models": models}),
        )
    out = {}
    for executor in ("local", "ray"):
        start = time.perf_counter()
        manifest = build_index(str(table), str(root / f"index-{executor}"), IndexRequest(executor=executor))
        out[executor] = {
            "seconds": round(time.perf_counter() - start, 2),
            "index": manifest.index_type,
            "params": manifest.params,
            "count": manifest.count,
        }
        log.info("retrieval: build_index %s: %s", executor, out[executor])
    return out


def _rows(data: np.ndarray, other: np.ndarray, rows: np.ndarray, day: dt.date, run_id: str) -> pa.Table:
    n, dim, schema = len(rows), data.shape[1], col.output_schema()
    vectors = pa.ListArray.from_arrays(
        pa.array(np.arange(n + 1, dtype=np.int32) * dim), pa.array(data[rows].reshape(-1), pa.float32())
    )
    texts = pa.ListArray.from_arrays(
        pa.array(np.arange(n + 1, dtype=np.int32) * dim), pa.array(other[rows % len(other)].reshape(-1), pa.float32())
    )
    given = {
        col.KEY: pa.array([f"{i:07d}" for i in rows]),
        col.CAPTION: pa.array([f"caption {i}" for i in rows]),
        col.SOURCE_SHARD: pa.array(["bench"] * n),
        col.STATUS: pa.array([col.OK] * n),
        col.IMAGE_EMBEDDING: vectors,
        col.TEXT_EMBEDDING: texts,
        col.KEEP: pa.array(np.ones(n, bool)),
        col.RUN_ID: pa.array([run_id] * n),
        col.RUN_DATE: pa.array([day] * n, pa.date32()),
    }
    return pa.table({f.name: given.get(f.name, pa.nulls(n, f.type)) for f in schema}, schema=schema)


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def format_retrieval(result: dict | None) -> list[str]:
    if not result:
        return []
    b = result["build"]

    def figures(values: dict) -> str:
        return ", ".join(f"{k} {v:.3f}" for k, v in (values or {}).items())

    params = ", ".join(f"{k}={v}" for k, v in result["params"].items())
    lines = [
        "",
        f"retrieval, {result['rows']} clustered unit vectors of {result['dim']} values:",
        f"  index {result['index']} ({result['reason']}), {params} "
        f"(tuned on 128 queries per kind: {figures(result['tuned_recall'])})",
        f"  recall@10 vs exact on held-out queries: {figures(result['recall_at_10'])} (target >= 0.95)",
        f"  build without I/O: {b['total']:.1f} s (train {b['train']:.1f}, "
        f"encode + assemble {b['encode_and_assemble']:.1f}, tune {b['tune']:.1f})",
        "  query latency, one thread: "
        + "; ".join(f"{k} p50 {v['p50']:.2f} ms p99 {v['p99']:.2f} ms" for k, v in result["latency_ms"].items()),
    ]
    for executor, e in (result.get("end_to_end") or {}).items():
        lines.append(
            f"  build_index on a Delta table ({e['count']} rows), {executor}: {e['seconds']:.1f} s ({e['index']})"
        )
    return lines
