"""Column names, statuses, reject reasons and the output Arrow schema.

This is the one module that names columns; operators, pipelines and the
docs' column reference (generated from it) all follow it. Columns starting with ``_`` are internal and never written.
"""

from __future__ import annotations

import pyarrow as pa

# Identity and lineage.
KEY = "key"
CAPTION = "caption"
SOURCE_SHARD = "source_shard"

# Internal, between steps.
IMAGE = "_image"
PIXELS = "_pixels"  # at the CLIP model's geometry
CAPTION_PIXELS = "_pixels_caption"  # at the captioner's, when it differs
ITM_PIXELS = "_pixels_itm"  # at the ITM model's, when it differs
CLASSIFIER_PIXELS = "_pixels_classifier"  # at the image classifier's, when it differs
ASK_PIXELS = "_pixels_ask"  # at the visual-question model's, when it differs
OCR_PIXELS = "_pixels_ocr"  # fitted into the OCR stage's square, padded: text keeps its shape
IMAGE_NSFW_PIXELS = "_pixels_image_nsfw"  # at open_nsfw's 256x256
ROW_ID = "_row_id"  # a staged row's place (file and row), between the passes of a whole-run stage
SOURCE_ROW = "_source_row"  # the row's place in its input shard: what a resumed run skips
IMAGE_URI = "_image_uri"  # where to fetch the image from, when the input holds references, not bytes
# Set before decoding when the input itself says the image is unusable (a failed download, a
# malformed tar sample, a failed fetch): decode then keeps this status and error for the row.
INPUT_STATUS = "_input_status"
INPUT_ERROR = "_input_error"

# Decode.
STATUS = "status"
ERROR = "error"
IMAGE_WIDTH = "image_width"
IMAGE_HEIGHT = "image_height"
IMAGE_BYTES = "image_bytes"
IMAGE_SHA256 = "image_sha256"
IMAGE_PHASH = "image_phash"

# CLIP.
IMAGE_EMBEDDING = "image_embedding"
TEXT_EMBEDDING = "text_embedding"
CLIP_SCORE = "clip_score"

# Captioning and caption selection.
CAPTION_GENERATED = "caption_generated"
CLIP_SCORE_GENERATED = "clip_score_generated"
CAPTION_BEST = "caption_best"
CAPTION_SOURCE = "caption_source"
CLIP_SCORE_BEST = "clip_score_best"

# Image-text matching head (BLIP ITM).
ITM_SCORE = "itm_score"

# Quality signals: heads on the image embedding, zero-shot tags, caption language.
AESTHETIC_SCORE = "aesthetic_score"
NSFW_SCORE = "nsfw_score"
TAG_SCORES = "tag_scores"
CAPTION_LANGUAGE = "caption_language"
CAPTION_LANGUAGE_SCORE = "caption_language_score"
CLASSIFIER_SCORES = "classifier_scores"
IMAGE_NSFW_SCORE = "image_nsfw_score"  # open_nsfw on the image itself (no CLIP)

# Text in the image (OCR).
TEXT_AREA_FRACTION = "text_area_fraction"
TEXT_BOXES = "text_boxes"
OCR_TEXT = "ocr_text"

# Visual questions (a chat VLM answers one question per row).
ANSWER = "answer"
ANSWER_YES_PROB = "answer_yes_prob"

# What a served VLM's requests cost (caption.endpoint, ask.endpoint): one struct per row and stage.
CAPTION_USAGE = "caption_usage"
ANSWER_USAGE = "answer_usage"
PROMPT_TOKENS = "prompt_tokens"
COMPLETION_TOKENS = "completion_tokens"
ATTEMPTS = "attempts"

# Deduplication.
SEMANTIC_CLUSTER = "semantic_cluster"
DUPLICATE_OF = "duplicate_of"

# Values of CAPTION_SOURCE.
SOURCE_ORIGINAL = "original"
SOURCE_GENERATED = "generated"

# Filter.
KEEP = "keep"
REJECT_REASON = "reject_reason"

# The outcome a run counts a row under: KEPT, or the row's reject reason.
KEPT = "kept"

# Run.
RUN_ID = "run_id"
RUN_DATE = "run_date"

# Exports (pipelines.export.export): the image bytes column of Parquet shards, img2dataset's name for it.
EXPORT_IMAGE = "jpg"

# Values of STATUS. Every status but OK is also the reject reason for its row.
OK = "ok"
MISSING_IMAGE = "missing_image"
UNSUPPORTED_FORMAT = "unsupported_format"
IMAGE_TOO_LARGE = "image_too_large"
DECODE_ERROR = "decode_error"
DOWNLOAD_FAILED = "download_failed"  # the downloader (img2dataset's `status`) could not fetch the image
FETCH_ERROR = "fetch_error"  # input.columns.image_uri could not be fetched (404, 403, timeout, ...)
INVALID_SAMPLE = "invalid_sample"  # a tar sample vlpipe cannot read as one row (e.g. two image members)
MODEL_ERROR = "model_error"  # a model stage raised on this row alone (its stage and exception are in error)
# A served VLM's request for this row failed for good (the HTTP status and the server's message are in error).
ENDPOINT_ERROR = "endpoint_error"
# Statuses of rows whose input has no image bytes at all (nothing to read back for an export).
NO_IMAGE_STATUSES = (MISSING_IMAGE, DOWNLOAD_FAILED, FETCH_ERROR, INVALID_SAMPLE)
IMAGE_STATUSES = (
    OK,
    MISSING_IMAGE,
    UNSUPPORTED_FORMAT,
    IMAGE_TOO_LARGE,
    DECODE_ERROR,
    DOWNLOAD_FAILED,
    FETCH_ERROR,
    INVALID_SAMPLE,
    MODEL_ERROR,
    ENDPOINT_ERROR,
)

# Reject reasons that come from the filter rather than from decoding, in the order the
# filter checks them (the first failing check names the row's reason): what the image and
# caption are, then what the models made of them, then the whole-run cut-off.
IMAGE_TOO_SMALL = "image_too_small"
EXTREME_ASPECT_RATIO = "extreme_aspect_ratio"
EMPTY_CAPTION = "empty_caption"
CAPTION_TOO_FEW_WORDS = "caption_too_few_words"
CAPTION_TOO_SHORT = "caption_too_short"
WRONG_LANGUAGE = "wrong_language"
INVALID_EMBEDDING = "invalid_embedding"
LOW_CLIP_SCORE = "low_clip_score"
LOW_ITM_SCORE = "low_itm_score"
LOW_AESTHETIC_SCORE = "low_aesthetic_score"
HIGH_NSFW_SCORE = "high_nsfw_score"
HIGH_IMAGE_NSFW_SCORE = "high_image_nsfw_score"
TOO_MUCH_TEXT = "too_much_text"
LOW_TAG_SCORE = "low_tag_score"
HIGH_TAG_SCORE = "high_tag_score"
LOW_CLASSIFIER_SCORE = "low_classifier_score"
HIGH_CLASSIFIER_SCORE = "high_classifier_score"
LOW_ANSWER_YES_PROB = "low_answer_yes_prob"
DUPLICATE_EXACT = "duplicate_exact"
DUPLICATE_NEAR = "duplicate_near"
DUPLICATE_SEMANTIC = "duplicate_semantic"
DUPLICATE_REASONS = (DUPLICATE_EXACT, DUPLICATE_NEAR, DUPLICATE_SEMANTIC)  # also the order methods are checked in
BELOW_TOP_FRACTION = "below_top_fraction"
FILTER_REASONS = (
    IMAGE_TOO_SMALL,
    EXTREME_ASPECT_RATIO,
    TOO_MUCH_TEXT,  # what the image is, whatever its caption says
    EMPTY_CAPTION,
    CAPTION_TOO_FEW_WORDS,
    CAPTION_TOO_SHORT,
    WRONG_LANGUAGE,
    INVALID_EMBEDDING,
    LOW_CLIP_SCORE,
    LOW_ITM_SCORE,
    LOW_AESTHETIC_SCORE,
    HIGH_NSFW_SCORE,
    HIGH_IMAGE_NSFW_SCORE,
    LOW_TAG_SCORE,
    HIGH_TAG_SCORE,
    LOW_CLASSIFIER_SCORE,
    HIGH_CLASSIFIER_SCORE,
    LOW_ANSWER_YES_PROB,
    *DUPLICATE_REASONS,
    BELOW_TOP_FRACTION,
)
REJECT_REASONS = (*IMAGE_STATUSES[1:], *FILTER_REASONS)

EMBEDDING_TYPE = pa.list_(pa.float32())
# A map, not a struct: the configured tags change from run to run, the table's schema must not.
TAG_SCORES_TYPE = pa.map_(pa.string(), pa.float32())
CLASSIFIER_SCORES_TYPE = TAG_SCORES_TYPE  # likewise: the configured score names are keys, not columns
USAGE_TYPE = pa.struct(
    [pa.field(PROMPT_TOKENS, pa.int32()), pa.field(COMPLETION_TOKENS, pa.int32()), pa.field(ATTEMPTS, pa.int16())]
)
DUPLICATE_OF_TYPE = pa.struct([pa.field(KEY, pa.string()), pa.field(RUN_DATE, pa.date32())])

_HEAD = [
    pa.field(KEY, pa.string(), nullable=False),
    pa.field(CAPTION, pa.string()),
    pa.field(SOURCE_SHARD, pa.string()),
]
_TAIL = [
    pa.field(STATUS, pa.string(), nullable=False),
    pa.field(ERROR, pa.string()),
    pa.field(IMAGE_WIDTH, pa.int32()),
    pa.field(IMAGE_HEIGHT, pa.int32()),
    pa.field(IMAGE_SHA256, pa.string()),
    pa.field(IMAGE_PHASH, pa.int64()),
    pa.field(IMAGE_EMBEDDING, EMBEDDING_TYPE),
    pa.field(TEXT_EMBEDDING, EMBEDDING_TYPE),
    pa.field(CLIP_SCORE, pa.float32()),
    # Present whether or not captioning/ITM run, so turning them on later never changes the table's schema.
    pa.field(CAPTION_GENERATED, pa.string()),
    pa.field(CLIP_SCORE_GENERATED, pa.float32()),
    pa.field(CAPTION_BEST, pa.string()),
    pa.field(CAPTION_SOURCE, pa.string()),
    pa.field(CLIP_SCORE_BEST, pa.float32()),
    pa.field(ITM_SCORE, pa.float32()),
    pa.field(AESTHETIC_SCORE, pa.float32()),
    pa.field(NSFW_SCORE, pa.float32()),
    pa.field(TAG_SCORES, TAG_SCORES_TYPE),
    pa.field(CAPTION_LANGUAGE, pa.string()),
    pa.field(CAPTION_LANGUAGE_SCORE, pa.float32()),
    pa.field(CLASSIFIER_SCORES, CLASSIFIER_SCORES_TYPE),
    pa.field(IMAGE_NSFW_SCORE, pa.float32()),
    pa.field(TEXT_AREA_FRACTION, pa.float32()),
    pa.field(TEXT_BOXES, pa.int32()),
    pa.field(OCR_TEXT, pa.string()),
    pa.field(ANSWER, pa.string()),
    pa.field(ANSWER_YES_PROB, pa.float32()),
    pa.field(CAPTION_USAGE, USAGE_TYPE),
    pa.field(ANSWER_USAGE, USAGE_TYPE),
    pa.field(SEMANTIC_CLUSTER, pa.int32()),
    pa.field(DUPLICATE_OF, DUPLICATE_OF_TYPE),
    pa.field(KEEP, pa.bool_(), nullable=False),
    pa.field(REJECT_REASON, pa.string()),
    pa.field(RUN_ID, pa.string(), nullable=False),
    pa.field(RUN_DATE, pa.date32(), nullable=False),
]

COLUMN_DOCS = {
    KEY: "Row id from the input (img2dataset `key`), as a string.",
    CAPTION: "Original caption text from the input (null if missing).",
    SOURCE_SHARD: "URI of the input shard the row came from.",
    STATUS: "Image outcome, or model_error where a model stage raised on this row alone, or endpoint_error where "
    "a served VLM's request for it failed for good: " + ", ".join(IMAGE_STATUSES) + ".",
    ERROR: "Why the image failed, the model stage and its exception, or the endpoint's HTTP status and message "
    "(null when status is ok).",
    IMAGE_WIDTH: "Width of the decoded image, upright (after EXIF orientation).",
    IMAGE_HEIGHT: "Height of the decoded image, upright.",
    IMAGE_BYTES: "Original encoded image (only with output.include_image_bytes).",
    IMAGE_SHA256: "SHA-256 of the image bytes as the input holds them, lowercase hex; null without bytes. "
    "(img2dataset's own `sha256` is of what it downloaded, before it re-encodes.)",
    IMAGE_PHASH: "64-bit DCT perceptual hash (imagededup's PHash; hex: `format(h & (2**64 - 1), '016x')`), "
    "null unless dedup.near is on or if the image failed.",
    IMAGE_EMBEDDING: "L2-normalised image embedding, float32 (null if the image failed).",
    TEXT_EMBEDDING: "L2-normalised caption embedding, float32 (null if the caption is empty).",
    CLIP_SCORE: "Cosine similarity of the two embeddings, float32 (null if either is missing).",
    CAPTION_GENERATED: "Caption written by the captioning model (null if captioning is off or the image failed).",
    CLIP_SCORE_GENERATED: "CLIP score of the generated caption against the image.",
    CAPTION_BEST: "The original or the generated caption, whichever has the higher CLIP score (original on ties).",
    CAPTION_SOURCE: f"Where caption_best came from: {SOURCE_ORIGINAL} or {SOURCE_GENERATED} "
    "(null when neither scored).",
    CLIP_SCORE_BEST: "CLIP score of caption_best: the larger of clip_score and clip_score_generated.",
    ITM_SCORE: 'Probability of "match" from the BLIP image-text matching head (null if ITM is off).',
    AESTHETIC_SCORE: "LAION aesthetic predictor v2 on the image embedding, about 1-10 (null without the head, "
    "an embedding, or with a non-finite one).",
    NSFW_SCORE: "LAION CLIP-based NSFW detector on the image embedding, 0-1 (null like aesthetic_score).",
    TAG_SCORES: "Zero-shot tag -> summed softmax probability of its positive prompts "
    "(null without tags or an embedding).",
    CAPTION_LANGUAGE: "ISO 639-1 code of the caption's language "
    "(null if off, empty, or no language found, e.g. emoji only).",
    CAPTION_LANGUAGE_SCORE: "Confidence of caption_language, 0-1, relative to the candidate languages.",
    CLASSIFIER_SCORES: "Image classifier score name -> softmax probability of its label (null without a classifier "
    "or an image).",
    IMAGE_NSFW_SCORE: "Yahoo's open_nsfw classifier on the image itself, P(NSFW) 0-1 (null without an image_nsfw: "
    "section or an image).",
    TEXT_AREA_FRACTION: "Share of the image covered by the text the OCR stage read (PP-OCRv4 boxes, their union), "
    "0-1; 0 where it found none (null without an ocr: section or an image).",
    TEXT_BOXES: "Number of text lines the OCR stage read (0 where none).",
    OCR_TEXT: "The text read, lines joined by spaces in reading order, cut to ocr.max_text_chars "
    "(empty where none; null like text_area_fraction).",
    ANSWER: "The chat VLM's answer to the row's ask: question (null if ask is off, the image failed or the "
    'question could not be formed); "yes"/"no" with ask.yes_no and no generation.',
    ANSWER_YES_PROB: 'P(yes) from the first answer token: softmax over the logits of the first tokens of "Yes" '
    'and "No" (null unless ask.yes_no, or like answer).',
    CAPTION_USAGE: "What caption.endpoint's request for the row cost: prompt_tokens and completion_tokens from the "
    "answer's usage, and attempts (tries sent); null without an endpoint or where no request was sent.",
    ANSWER_USAGE: "Likewise for ask.endpoint.",
    SEMANTIC_CLUSTER: "Nearest k-means centroid of image_embedding under the table's centroids when the row was "
    "written (null unless dedup.semantic is on).",
    DUPLICATE_OF: "For a duplicate: the key and run_date of the row it duplicates (null otherwise).",
    KEEP: "Whether the row passed every filter.",
    REJECT_REASON: "First reason the row was rejected: " + ", ".join(REJECT_REASONS) + "; null if kept.",
    RUN_ID: "Id of the run that wrote the row.",
    RUN_DATE: "Date of the run (UTC); the table's partition column.",
}


def output_schema(extra_fields: list[pa.Field] = (), *, include_image_bytes: bool = False) -> pa.Schema:
    """The committed table's schema: fixed columns plus the configured pass-through ones."""
    fields = [*_HEAD, *extra_fields]
    if include_image_bytes:
        fields.append(pa.field(IMAGE_BYTES, pa.binary()))
    return pa.schema([*fields, *_TAIL])
