"""faiss indexes over L2-normalised embeddings: which index, trained on what, filled in parts, tuned.

Vectors are unit length, so the inner product is the cosine. ``choose_index`` follows
autofaiss's choice of index by size: exact search (``Flat``) while a query's full scan
is cheap, an inverted file of uncompressed vectors (``IVF<lists>,Flat``) while they fit
the memory budget, product-quantised codes behind an HNSW coarse quantizer beyond it.
Unlike autofaiss there is no HNSW tier for mid-sized tables: an HNSW graph cannot be
built in independent parts and merged, an inverted file can.

Parts: every worker deserialises the same trained (empty) index and encodes its rows
(``Encoder``: for an IVF the list each vector falls in and its code); the driver
appends the codes (``Assembler``), so it never holds raw vectors beyond what the final
index itself stores.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

FLAT_MAX_ROWS = 50_000  # below this a query's full scan takes a few ms (docs/guide/search.md#which-index)
DEFAULT_MAX_INDEX_BYTES = 16 << 30  # largest uncompressed IVF before product quantisation
HNSW_QUANTIZER_MIN_LISTS = 16_384  # from here scanning the centroids costs more than a graph walk
TRAIN_ROWS_PER_LIST = 50  # faiss warns below 39 training points per centroid
MIN_TRAIN_ROWS = 10_000  # the product quantiser's 256 centroids per sub-vector want this many
MAX_TRAIN_ROWS = 1_000_000
TARGET_RECALL = 0.95
RECALL_K = 10
_PQ_BYTES = (64, 48, 32, 16, 8)
_IVF_LISTS = re.compile(r"IVF(\d+)")


@dataclass(frozen=True)
class IndexChoice:
    """A faiss ``index_factory`` key and why it was chosen."""

    key: str
    reason: str

    @property
    def lists(self) -> int | None:
        """The inverted file's list count, or None for an exact index."""
        found = _IVF_LISTS.search(self.key)
        return int(found.group(1)) if found else None

    @property
    def train_rows(self) -> int:
        """How many sample vectors training wants (0: nothing to train)."""
        if self.lists is None:
            return 0
        return min(MAX_TRAIN_ROWS, max(MIN_TRAIN_ROWS, TRAIN_ROWS_PER_LIST * self.lists))


def list_count(rows: int) -> int:
    """autofaiss's first choice of inverted lists: 4 sqrt(n) to a power of two, fixed sizes past a million."""
    if rows < 1_000_000:
        return max(16, 2 ** round(math.log2(4 * math.sqrt(max(rows, 1)))))
    if rows < 10_000_000:
        return 16_384
    return 65_536 if rows < 300_000_000 else 131_072


def pq_bytes(dim: int) -> int:
    """The largest product-quantiser code (bytes per vector) that splits ``dim`` evenly into >= 2 values per part."""
    return next((m for m in _PQ_BYTES if dim % m == 0 and dim // m >= 2), 1)


def choose_index(rows: int, dim: int, max_index_bytes: int = DEFAULT_MAX_INDEX_BYTES) -> IndexChoice:
    """The index for ``rows`` vectors of ``dim`` values (see the module docstring)."""
    if rows < FLAT_MAX_ROWS:
        return IndexChoice("Flat", f"{rows} rows < {FLAT_MAX_ROWS}: exact search")
    lists = list_count(rows)
    quantizer = "_HNSW32" if lists >= HNSW_QUANTIZER_MIN_LISTS else ""
    uncompressed = rows * (4 * dim + 8)  # the vector and its 64-bit id in its list
    if uncompressed <= max_index_bytes:
        budget = f"{uncompressed / 2**30:.1f} GiB uncompressed <= {max_index_bytes / 2**30:g} GiB"
        return IndexChoice(f"IVF{lists}{quantizer},Flat", f"{rows} rows, {budget}")
    m = pq_bytes(dim)
    return IndexChoice(
        f"IVF{lists}{quantizer},PQ{m}x8",
        f"{rows} rows, {uncompressed / 2**30:.1f} GiB uncompressed > {max_index_bytes / 2**30:g} GiB: {m}-byte codes",
    )


def empty_index(key: str, dim: int):
    """A new inner-product index from a factory key; ValueError naming the key if faiss refuses it."""
    import faiss

    try:
        return faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(f"faiss cannot build index {key!r}: {_faiss_message(err)}") from None


def train(key: str, dim: int, sample: np.ndarray | None) -> bytes:
    """The trained, empty index, serialised: what every part encodes with; ValueError if faiss refuses."""
    import faiss

    index = empty_index(key, dim)
    if not index.is_trained:
        if sample is None or len(sample) == 0:
            raise ValueError(f"index {key!r} needs training vectors and there are none")
        try:
            index.train(np.ascontiguousarray(sample, np.float32))
        except RuntimeError as err:
            raise ValueError(f"faiss cannot train {key!r} on {len(sample)} vectors: {_faiss_message(err)}") from None
    _check_fills_in_parts(index, key, np.zeros((1, dim), np.float32))
    return faiss.serialize_index(index).tobytes()


def _check_fills_in_parts(index, key: str, probe: np.ndarray) -> None:
    """Refuse at once an index whose parts cannot be appended as codes (HNSW, for one)."""
    import faiss

    trial = faiss.clone_index(index)
    try:
        trial.add_sa_codes(trial.sa_encode(probe), np.zeros(len(probe), np.int64))
    except RuntimeError as err:
        raise ValueError(
            f"index {key!r} cannot be built in parts (faiss: {_faiss_message(err)}); "
            "use Flat, IVF...,Flat or IVF...,PQ..."
        ) from None


class Encoder:
    """Codes of vectors under a trained index: for an IVF, each vector's list and its code."""

    def __init__(self, template: bytes):
        import faiss

        self.index = faiss.deserialize_index(np.frombuffer(template, np.uint8))
        self.code_size = self.index.sa_code_size()

    @property
    def dim(self) -> int:
        return self.index.d

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        """(n, code_size) uint8."""
        if len(vectors) == 0:
            return np.zeros((0, self.code_size), np.uint8)
        return self.index.sa_encode(np.ascontiguousarray(vectors, np.float32))


class Assembler:
    """The final index, filled with parts' codes in arrival order: a vector's id is its position."""

    def __init__(self, template: bytes):
        import faiss

        self.index = faiss.deserialize_index(np.frombuffer(template, np.uint8))

    def add(self, codes: np.ndarray) -> None:
        start = self.index.ntotal
        self.index.add_sa_codes(np.ascontiguousarray(codes), np.arange(start, start + len(codes), dtype=np.int64))


@dataclass(frozen=True)
class Tuning:
    """The search parameters an approximate index runs with, and the recall they were measured at."""

    params: dict[str, int]
    recall: dict[str, float]  # per kind of query (same tower, the other tower), against exhaustive search


def tune(index, queries: dict[str, np.ndarray], target: float = TARGET_RECALL, k: int = RECALL_K) -> Tuning:
    """The fewest lists to probe whose recall@k reaches ``target`` for every kind of query.

    The reference is the same index probing every list: for ``IVF,Flat`` that is exact
    search; for PQ codes it is the best the codes can do, so what is tuned is the inverted
    file's loss alone.
    """
    lists = _ivf(index).nlist
    exhaustive = search_params(index, lists)
    truth = {kind: _search(index, q, k, exhaustive) for kind, q in queries.items() if len(q)}
    probes = sorted({min(lists, 2**i) for i in range(int(math.log2(lists)) + 2)})
    recall: dict[str, float] = {}
    for nprobe in probes:
        params = search_params(index, nprobe)
        recall = {
            kind: recall_at_k(_search(index, queries[kind], k, params), expected) for kind, expected in truth.items()
        }
        if all(r >= target for r in recall.values()):
            return Tuning(params, recall)
    return Tuning(params, recall)


def search_params(index, nprobe: int) -> dict[str, int]:
    """``nprobe`` and, with an HNSW quantizer, a graph search wide enough to return that many lists."""
    import faiss

    params = {"nprobe": nprobe}
    if isinstance(faiss.downcast_index(_ivf(index).quantizer), faiss.IndexHNSW):
        params["quantizer_efSearch"] = max(2 * nprobe, 16)
    return params


def apply_params(index, params: dict[str, int]) -> None:
    import faiss

    if params:
        faiss.ParameterSpace().set_index_parameters(index, ",".join(f"{k}={v}" for k, v in params.items()))


def _search(index, queries: np.ndarray, k: int, params: dict[str, int]) -> np.ndarray:
    apply_params(index, params)
    return index.search(np.ascontiguousarray(queries, np.float32), k)[1]


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """The mean share of each query's true neighbours that were found (ids of -1 are padding)."""
    shares = []
    for got, expected in zip(found, truth):
        wanted = set(expected[expected >= 0].tolist())
        if wanted:
            shares.append(len(wanted & set(got.tolist())) / len(wanted))
    return float(np.mean(shares)) if shares else 1.0


def _ivf(index):
    import faiss

    return faiss.extract_index_ivf(index)


def _faiss_message(err: RuntimeError) -> str:
    """faiss's C++ error without the source location in front of it."""
    text = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return text.split(": ", 1)[-1] if text.startswith("Error in") else text
