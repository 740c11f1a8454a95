"""``vlpipe search``: query an index by text or by image, embedded by the model that embedded the table.

Queries take the pipeline's own path, not a second implementation: text goes through
``ClipScorer.embed_texts``; an image through the decode step (``DecodeImages`` at the
model's geometry, with the indexed runs' decode settings) and ``ClipScorer.embed_images``.
Before the first query the loaded model must reproduce the text embeddings of a few of
the table's captions (the manifest's probes): a different model, even one of the same
width, is refused rather than returning neighbours that mean nothing.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from operators import schema as col
from operators.models.load import ModelLoadError
from operators.refs import ModelRef
from operators.storage import Location, StorageOptions, filesystem_for
from operators.tensors import pixel_rows
from pipelines.errors import ConfigError, VlpipeError
from pipelines.search.files import METADATA_SCHEMA, IndexManifest, RunSource, read_index

log = logging.getLogger(__name__)

DEFAULT_K = 20
PROBE_MIN_COSINE = 0.99  # the same weights in bf16 on a GPU and fp32 on a CPU agree to ~1e-3
RANK, SCORE = "rank", "score"
RESULT_SCHEMA = pa.schema([pa.field(RANK, pa.int32()), pa.field(SCORE, pa.float32()), *METADATA_SCHEMA])


class ModelMismatchError(ConfigError):
    """The model a search loaded does not embed the way the index's model did."""


class ModelUnavailableError(VlpipeError):
    """The model the index names (or ``--model``) cannot be loaded here."""


class QueryEncoder:
    """Queries embedded by the index's CLIP model, or by ``model`` (the same model, moved), checked on load."""

    def __init__(self, manifest: IndexManifest, storage: StorageOptions, model: str | None = None):
        from operators.image.decode import DecodeImages
        from operators.models.clip import ClipConfig, ClipScorer

        ref = (
            ModelRef(source=model)
            if model
            else ModelRef(source=manifest.model.source, revision=manifest.model.revision)
        )
        try:
            self.scorer = ClipScorer(ClipConfig(model=ref), storage)
        except (ModelLoadError, OSError, ValueError) as err:  # transformers says ValueError for a non-CLIP directory
            which = (
                f"--model {model}"
                if model
                else (f"the index's model {manifest.model} (if it moved, pass --model with its new place)")
            )
            raise ModelUnavailableError(f"cannot load {which}: {' '.join(str(err).split())}") from None
        decode = next(iter(manifest.runs.values()), RunSource()).decode
        self.decode = DecodeImages(decode.model_copy(update={"keep_image_bytes": False}), self.scorer.geometry)
        self._check(manifest, ref.source)

    def text(self, text: str) -> np.ndarray:
        if not text.strip():
            raise ConfigError("--text is empty")
        return self.scorer.embed_texts([text])[0]

    def image(self, data: bytes, name: str = "query image") -> np.ndarray:
        decoded = self.decode(pa.table({col.IMAGE: pa.array([data], pa.binary())}))
        if decoded.column(col.STATUS)[0].as_py() != col.OK:
            raise ConfigError(f"{name}: {decoded.column(col.STATUS)[0]}: {decoded.column(col.ERROR)[0]}")
        return self.scorer.embed_images(pixel_rows(decoded.column(col.PIXELS), self.scorer.geometry.out_size))[0]

    def _check(self, manifest: IndexManifest, source: str) -> None:
        width = self.scorer.embed_texts(["a photo"]).shape[1]
        if width != manifest.dim:
            raise ModelMismatchError(
                f"model {source} embeds {width} values, the index {manifest.dim} (it was built with {manifest.model})"
            )
        for probe in manifest.model_probes:
            cosine = float(self.scorer.embed_texts([probe.caption])[0] @ np.asarray(probe.text_embedding, np.float32))
            if cosine < PROBE_MIN_COSINE:
                raise ModelMismatchError(
                    f"model {source} is not the model the index was built with ({manifest.model}): it embeds the "
                    f"table's caption {probe.caption!r} at cosine {cosine:.3f} to the stored embedding "
                    f"(at least {PROBE_MIN_COSINE} expected)"
                )


class Searcher:
    """An index and its model, loaded once: query it by text or image as often as needed."""

    def __init__(self, index_uri: str, *, model: str | None = None, storage: StorageOptions = StorageOptions()):
        self.storage = storage
        self.stored = read_index(Location.resolve(index_uri, storage))
        self.encoder = QueryEncoder(self.stored.manifest, storage, model)

    @property
    def manifest(self) -> IndexManifest:
        return self.stored.manifest

    def search(self, *, text: str | None = None, image: str | bytes | None = None, k: int = DEFAULT_K) -> pa.Table:
        """The ``k`` nearest indexed rows, best first: rank, score (the cosine), then the metadata columns."""
        if (text is None) == (image is None):
            raise ConfigError("search needs exactly one of a text or an image")
        if k < 1:
            raise ConfigError(f"-k must be at least 1, not {k}")
        if text is not None:
            query = self.encoder.text(text)
        else:
            query = self.encoder.image(*query_image(image, self.storage))
        scores, ids = self.stored.index.search(query[None].astype(np.float32), min(k, self.manifest.count))
        found = ids[0] >= 0
        rows = self.stored.metadata.take(pa.array(ids[0][found], pa.int64()))
        ranks = pa.array(np.arange(1, int(found.sum()) + 1), pa.int32())
        return rows.add_column(0, SCORE, pa.array(scores[0][found], pa.float32())).add_column(0, RANK, ranks)


def search(
    index_uri: str,
    *,
    text: str | None = None,
    image: str | bytes | None = None,
    k: int = DEFAULT_K,
    model: str | None = None,
    storage: StorageOptions = StorageOptions(),
) -> pa.Table:
    """One query: ``Searcher(index_uri, ...).search(...)`` (load a ``Searcher`` once to ask several)."""
    return Searcher(index_uri, model=model, storage=storage).search(text=text, image=image, k=k)


def query_image(image: str | bytes, storage: StorageOptions) -> tuple[bytes, str]:
    """The encoded query image and a name for messages: given as bytes, or read from a path or URI."""
    if isinstance(image, bytes):
        return image, "query image"
    filesystem, path = filesystem_for(image, storage)
    try:
        with filesystem.open_input_stream(path) as source:
            return source.read(), image
    except FileNotFoundError:
        raise ConfigError(f"--image {image}: no such file") from None


def format_results(results: pa.Table, manifest: IndexManifest, query: str) -> str:
    """What ``vlpipe search`` prints: one line per hit."""
    lines = [
        f"{query}: top {results.num_rows} of {manifest.count} {manifest.embedding} embeddings "
        f"({manifest.index_type}, {manifest.table_uri} version {manifest.table_version})",
        f"{'rank':>4}  {'score':>6}  {'key':<20} {'run_date':<10}  caption",
    ]
    for row in results.to_pylist():
        caption = " ".join((row[col.CAPTION] or "").split())
        lines.append(
            f"{row[RANK]:>4}  {row[SCORE]:>6.3f}  {row[col.KEY]:<20} {row[col.RUN_DATE]!s:<10}  {caption[:100]}"
        )
    return "\n".join(lines)
