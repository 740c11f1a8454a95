"""Turn scores into ``keep`` and ``reject_reason``; never drop a row here."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from operators import schema as col
from operators.models.language import check_language_codes
from operators.stage import Stage
from operators.tensors import embedding_rows


class TagThreshold(BaseModel):
    """Bounds on one score in a map column (a zero-shot tag, a classifier score): below ``min``, above ``max``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: float | None = Field(None, ge=0.0, le=1.0)
    max: float | None = Field(None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _a_bound(self) -> TagThreshold:
        if self.min is None and self.max is None:
            raise ValueError("set min, max or both")
        return self


class FilterConfig(BaseModel):
    """Thresholds. ``keep_top_fraction`` keeps the best-scoring share of eligible rows.

    ``caption: best`` judges each row by ``caption_best`` and its CLIP score (the
    better of original and generated caption) instead of the original caption.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    caption: Literal["original", "best"] = "original"
    min_image_side: int | None = Field(None, ge=1)
    max_aspect_ratio: float | None = Field(None, ge=1.0)
    min_caption_words: int | None = Field(None, ge=1)
    min_caption_chars: int | None = Field(None, ge=1)
    caption_languages: tuple[str, ...] | None = Field(None, min_length=1)
    min_clip_score: float | None = Field(None, ge=-1.0, le=1.0)
    min_itm_score: float | None = Field(None, ge=0.0, le=1.0)
    min_aesthetic_score: float | None = None
    max_nsfw_score: float | None = Field(None, ge=0.0, le=1.0)
    max_image_nsfw_score: float | None = Field(None, ge=0.0, le=1.0)  # open_nsfw (image_nsfw:)
    max_text_area_fraction: float | None = Field(None, ge=0.0, le=1.0)  # ocr:
    tags: Mapping[str, TagThreshold] = {}
    classifier_scores: Mapping[str, TagThreshold] = {}
    min_answer_yes_prob: float | None = Field(None, ge=0.0, le=1.0)
    keep_top_fraction: float | None = Field(None, gt=0.0, le=1.0)

    @field_validator("caption_languages")
    @classmethod
    def _known_languages(cls, codes: tuple[str, ...] | None) -> tuple[str, ...] | None:
        # A code either detector knows; the run's config checks it against the detector it uses.
        try:
            return check_language_codes(codes, "fasttext")
        except ValueError:
            return check_language_codes(codes)

    @property
    def caption_column(self) -> str:
        return col.CAPTION_BEST if self.caption == "best" else col.CAPTION

    @property
    def clip_score_column(self) -> str:
        return col.CLIP_SCORE_BEST if self.caption == "best" else col.CLIP_SCORE


def filter_stage(config: FilterConfig) -> Stage:
    """The filter's contract: it reads the caption and every score it has a threshold for."""
    checks = [
        ("min(image_width, image_height) >=", config.min_image_side),
        ("aspect ratio <=", config.max_aspect_ratio),
        ("caption words >=", config.min_caption_words),
        ("caption characters >=", config.min_caption_chars),
        (f"{config.clip_score_column} >=", config.min_clip_score),
        (f"{col.ITM_SCORE} >=", config.min_itm_score),
        (f"{col.AESTHETIC_SCORE} >=", config.min_aesthetic_score),
        (f"{col.NSFW_SCORE} <=", config.max_nsfw_score),
        (f"{col.IMAGE_NSFW_SCORE} <=", config.max_image_nsfw_score),
        (f"{col.TEXT_AREA_FRACTION} <=", config.max_text_area_fraction),
    ]
    thresholds = [f"{name} {value:g}" for name, value in checks if value is not None]
    if config.caption_languages:
        thresholds.append(f"{col.CAPTION_LANGUAGE} in {', '.join(config.caption_languages)}")
    for kind, entries in (("tag", config.tags), ("classifier score", config.classifier_scores)):
        for name, bounds in entries.items():
            thresholds += [
                f"{kind} {name} {op} {value:g}"
                for op, value in ((">=", bounds.min), ("<=", bounds.max))
                if value is not None
            ]
    if config.min_answer_yes_prob is not None:
        thresholds.append(f"{col.ANSWER_YES_PROB} >= {config.min_answer_yes_prob:g}")
    return Stage(
        name="filter",
        kind="fused",
        build=partial(ScoreFilter, config),
        reads=ScoreFilter(config).input_columns,
        adds=(col.KEEP, col.REJECT_REASON),
        optional=(col.IMAGE_EMBEDDING,),
        details=(f"caption {config.caption_column}", *(thresholds or ["no score threshold"])),
    )


def top_fraction_stage(config: FilterConfig) -> Stage:
    """The whole-run cut-off's contract (only when ``keep_top_fraction`` is set)."""
    return Stage(
        name="top_fraction",
        kind="aggregate",
        build=partial(TopFraction, config.keep_top_fraction, config.clip_score_column),
        reads=(config.clip_score_column, col.KEEP, col.REJECT_REASON),
        adds=(),
        details=(
            f"keep the best {config.keep_top_fraction:g} of rows by {config.clip_score_column}",
            "exact cut-off from every score (4 bytes a row to the driver)",
        ),
    )


class ScoreFilter:
    """Decide each row: the first failing check names its ``reject_reason``.

    Order (``schema.FILTER_REASONS``): image status, image size, aspect ratio, text area, empty
    caption, caption words, caption characters, caption language, a non-finite image
    embedding, then the score thresholds: CLIP, ITM, aesthetic, NSFW (the head's, then open_nsfw's),
    tags (min, then
    max), classifier scores (min, then max), the answer's P(yes). The top-fraction cut-off comes after,
    from ``TopFraction``.
    """

    def __init__(self, config: FilterConfig):
        self.config = config
        c = config
        self.input_columns = (
            col.STATUS,
            c.caption_column,
            c.clip_score_column,
            *((col.IMAGE_WIDTH, col.IMAGE_HEIGHT) if c.min_image_side or c.max_aspect_ratio else ()),
            *((col.CAPTION_LANGUAGE,) if c.caption_languages else ()),
            *((col.ITM_SCORE,) if c.min_itm_score is not None else ()),
            *((col.AESTHETIC_SCORE,) if c.min_aesthetic_score is not None else ()),
            *((col.NSFW_SCORE,) if c.max_nsfw_score is not None else ()),
            *((col.IMAGE_NSFW_SCORE,) if c.max_image_nsfw_score is not None else ()),
            *((col.TEXT_AREA_FRACTION,) if c.max_text_area_fraction is not None else ()),
            *((col.TAG_SCORES,) if c.tags else ()),
            *((col.CLASSIFIER_SCORES,) if c.classifier_scores else ()),
            *((col.ANSWER_YES_PROB,) if c.min_answer_yes_prob is not None else ()),
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        status = np.array(batch.column(col.STATUS).to_pylist(), dtype=object)
        reason = np.where(status == col.OK, None, status).astype(object)

        def reject(failed: np.ndarray, why: str) -> None:
            reason[(reason == None) & failed] = why  # noqa: E711 (elementwise)

        for checks in (self._image_checks, self._caption_checks, self._score_checks):  # in FILTER_REASONS order
            checks(batch, reject)
        return _with_decision(batch, reason)

    def _image_checks(self, batch: pa.Table, reject: Callable[[np.ndarray, str], None]) -> None:
        c = self.config
        if c.min_image_side or c.max_aspect_ratio:
            width, height = (_scores(batch, name) for name in (col.IMAGE_WIDTH, col.IMAGE_HEIGHT))
            short, long = np.fmin(width, height), np.fmax(width, height)
            if c.min_image_side:
                reject(short < c.min_image_side, col.IMAGE_TOO_SMALL)
            if c.max_aspect_ratio:
                with np.errstate(divide="ignore", invalid="ignore"):
                    reject(long / short > c.max_aspect_ratio, col.EXTREME_ASPECT_RATIO)
        if c.max_text_area_fraction is not None:
            reject(~(_scores(batch, col.TEXT_AREA_FRACTION) <= c.max_text_area_fraction), col.TOO_MUCH_TEXT)

    def _caption_checks(self, batch: pa.Table, reject: Callable[[np.ndarray, str], None]) -> None:
        c = self.config
        caption = pc.utf8_trim_whitespace(batch.column(c.caption_column).cast(pa.string()))
        empty = pc.fill_null(pc.equal(pc.utf8_length(caption), 0), True).to_numpy(zero_copy_only=False)
        reject(empty, col.EMPTY_CAPTION)
        if c.min_caption_words:
            words = np.array([len(t.split()) if t else 0 for t in caption.to_pylist()])
            reject(words < c.min_caption_words, col.CAPTION_TOO_FEW_WORDS)
        if c.min_caption_chars:
            chars = pc.fill_null(pc.utf8_length(caption), 0).to_numpy(zero_copy_only=False)
            reject(chars < c.min_caption_chars, col.CAPTION_TOO_SHORT)
        if c.caption_languages:
            language = batch.column(col.CAPTION_LANGUAGE)
            matches = pc.fill_null(pc.is_in(language, pa.array(c.caption_languages, pa.string())), False)
            reject(~matches.to_numpy(zero_copy_only=False), col.WRONG_LANGUAGE)

    def _score_checks(self, batch: pa.Table, reject: Callable[[np.ndarray, str], None]) -> None:
        c = self.config
        if col.IMAGE_EMBEDDING in batch.column_names:  # always, after a CLIP stage
            reject(_non_finite(batch.column(col.IMAGE_EMBEDDING)), col.INVALID_EMBEDDING)
        for threshold, score_column, why in (
            (c.min_clip_score, c.clip_score_column, col.LOW_CLIP_SCORE),
            (c.min_itm_score, col.ITM_SCORE, col.LOW_ITM_SCORE),
            (c.min_aesthetic_score, col.AESTHETIC_SCORE, col.LOW_AESTHETIC_SCORE),
        ):
            if threshold is not None:
                reject(~(_scores(batch, score_column) >= threshold), why)
        for ceiling, score_column, why in (
            (c.max_nsfw_score, col.NSFW_SCORE, col.HIGH_NSFW_SCORE),
            (c.max_image_nsfw_score, col.IMAGE_NSFW_SCORE, col.HIGH_IMAGE_NSFW_SCORE),
        ):
            if ceiling is not None:
                reject(~(_scores(batch, score_column) <= ceiling), why)
        for column, entries, low, high in (
            (col.TAG_SCORES, c.tags, col.LOW_TAG_SCORE, col.HIGH_TAG_SCORE),
            (col.CLASSIFIER_SCORES, c.classifier_scores, col.LOW_CLASSIFIER_SCORE, col.HIGH_CLASSIFIER_SCORE),
        ):
            for bound, why in (("min", low), ("max", high)):
                for name, bounds in entries.items():
                    value = getattr(bounds, bound)
                    if value is not None:
                        scores = _map_scores(batch, column, name)
                        reject(~(scores >= value) if bound == "min" else ~(scores <= value), why)
        if c.min_answer_yes_prob is not None:
            reject(~(_scores(batch, col.ANSWER_YES_PROB) >= c.min_answer_yes_prob), col.LOW_ANSWER_YES_PROB)


class TopFraction:
    """Reject the kept rows that score below the run's top-fraction cut-off (``below_top_fraction``).

    The cut-off is over every scorable row of the run, rejected or not, as
    ``top_fraction_threshold`` defines it; rows already rejected keep their reason.
    """

    def __init__(self, fraction: float, score_column: str):
        self.fraction = fraction
        self.score_column = score_column

    def partial(self, batch: pa.Table) -> pa.Table:
        scores = batch.column(self.score_column).drop_null()
        return pa.table({"score": scores.cast(pa.float32())})

    def combine(self, partials: list[pa.Table], staged=None) -> float | None:
        scores = [p.column("score") for p in partials if p.num_rows]
        values = pa.chunked_array(scores, pa.float32()).to_numpy() if scores else np.zeros(0, np.float32)
        return top_fraction_threshold(values, self.fraction)

    def apply(self, batch: pa.Table, threshold: float | None) -> pa.Table:
        if threshold is None:
            return batch
        reason = np.array(batch.column(col.REJECT_REASON).to_pylist(), dtype=object)
        reason[(reason == None) & ~(_scores(batch, self.score_column) >= threshold)] = col.BELOW_TOP_FRACTION  # noqa: E711
        return _with_decision(batch.drop_columns([col.KEEP, col.REJECT_REASON]), reason)


def _scores(batch: pa.Table, name: str) -> np.ndarray:
    """A score (or size) column as floats; null is NaN, which fails every threshold."""
    column = batch.column(name)
    if not pa.types.is_floating(column.type):
        column = column.cast(pa.float64())
    return pc.fill_null(column, np.nan).to_numpy(zero_copy_only=False)


def _map_scores(batch: pa.Table, column: str, name: str) -> np.ndarray:
    """One score from a map column (``tag_scores``, ``classifier_scores``); NaN where the row has none."""
    scores = pc.map_lookup(batch.column(column), pa.scalar(name, pa.string()), "first")
    return pc.fill_null(scores, np.nan).to_numpy(zero_copy_only=False)


def _non_finite(embedding: pa.ChunkedArray) -> np.ndarray:
    """Rows whose embedding holds a NaN or inf (rows without one are judged by their status instead)."""
    valid = embedding.is_valid().to_numpy(zero_copy_only=False)
    if not valid.any():
        return np.zeros(len(valid), bool)
    dim = pc.list_value_length(embedding).drop_null()[0].as_py()
    _, usable = embedding_rows(embedding, dim, "filter")
    return valid & ~usable


def _with_decision(batch: pa.Table, reason: np.ndarray) -> pa.Table:
    keep = np.array([r is None for r in reason], dtype=bool)
    return batch.append_column(col.KEEP, pa.array(keep, pa.bool_())).append_column(
        col.REJECT_REASON, pa.array(reason.tolist(), pa.string())
    )


def top_fraction_threshold(scores: np.ndarray, fraction: float) -> float | None:
    """The score at which the top ``fraction`` of rows starts (ties are kept)."""
    scores = scores[~np.isnan(scores)]
    if scores.size == 0:
        return None
    keep = max(1, int(np.ceil(fraction * scores.size)))
    return float(np.sort(scores)[::-1][keep - 1])
