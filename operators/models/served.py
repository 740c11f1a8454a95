"""Captions and visual questions from a served VLM: ``caption.endpoint`` and ``ask.endpoint``.

The same prompt, template and question rules as the stages that load their model
(``operators.models.caption``, ``operators.models.ask``); the image goes with the question as a data URL
(or the row's own URL), and an OpenAI-compatible server answers (``operators.endpoint.client``). The
worker loads nothing and needs no GPU: it waits on the server, with many requests in flight.

Each row's request cost lands in its usage column (``caption_usage`` / ``answer_usage``). A request that
fails for good makes its row ``endpoint_error``, with the HTTP status and the server's message in
``error``; the batch goes on.
"""

from __future__ import annotations

import math
import os
import string
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators import schema as col
from operators.endpoint.client import Client, Reply
from operators.endpoint.config import EndpointConfig
from operators.endpoint.images import image_data_url
from operators.models.ask import NO, YES, AskConfig, row_questions
from operators.models.caption import DEFAULT_CHAT_PROMPT, CaptionConfig
from operators.stage import Stage, StageFailed

# No tokenizer on this side: a question's column values are cut at about this many characters a token.
CHARS_PER_TOKEN = 4


def served_caption_stage(config: CaptionConfig, image_column: str) -> Stage:
    """``caption_generated`` from ``caption.endpoint``."""
    endpoint = config.endpoint
    return Stage(
        name="caption",
        kind="actor",
        config_key="caption.endpoint",
        resources=endpoint.resources,
        reads=_reads(endpoint, image_column),
        adds=(col.CAPTION_GENERATED, col.CAPTION_USAGE, col.STATUS, col.ERROR),
        build=partial(ServedCaptioner, config, image_column),
        details=(
            *_describe(endpoint, image_column),
            f"asks {config.prompt or DEFAULT_CHAT_PROMPT!r}, up to {config.max_new_tokens} tokens, "
            + _decoding(endpoint),
        ),
    )


def served_ask_stage(config: AskConfig, image_column: str, question: str) -> Stage:
    """``answer`` (and ``answer_yes_prob``) from ``ask.endpoint``; ``question`` describes what is asked."""
    endpoint = config.endpoint
    yes_no = ()
    if config.yes_no:
        yes_no = (
            f"answer_yes_prob from the first answer token's top {endpoint.top_logprobs} logprobs"
            if endpoint.logprobs
            else "answer_yes_prob null (ask.endpoint.logprobs is off)",
        )
    tokens = config.max_new_tokens if config.generates else 1
    return Stage(
        name="ask",
        kind="actor",
        config_key="ask.endpoint",
        resources=endpoint.resources,
        reads=(*_reads(endpoint, image_column), *config.columns),
        adds=(col.ANSWER, *((col.ANSWER_YES_PROB,) if config.yes_no else ()), col.ANSWER_USAGE, col.STATUS, col.ERROR),
        build=partial(ServedQuestions, config, image_column),
        details=(
            *_describe(endpoint, image_column),
            f"asks {question}, up to {tokens} token(s), {_decoding(endpoint)}",
            *yes_no,
        ),
    )


def _reads(endpoint: EndpointConfig, image_column: str) -> tuple[str, ...]:
    return (endpoint.image_url_column or image_column, col.STATUS, col.ERROR)


def _describe(endpoint: EndpointConfig, image_column: str) -> tuple[str, ...]:
    if endpoint.image_url_column:
        images = f"images as the URLs in {endpoint.image_url_column}"
    elif endpoint.image_longest_side:
        images = f"images as data URLs, longest side at most {endpoint.image_longest_side} px"
    else:
        images = "images as data URLs, as the input holds them"
    limits = [f"{endpoint.concurrency} requests in flight per worker"]
    if endpoint.requests_per_second:
        limits.append(f"{endpoint.requests_per_second:g} requests/s")
    if endpoint.tokens_per_minute:
        limits.append(f"{endpoint.tokens_per_minute:,} tokens/min")
    key = f", key from ${endpoint.api_key_env}" if endpoint.api_key_env else ""
    return (
        f"served model {endpoint.model!r} at {endpoint.base_url}{key}",
        images,
        ", ".join(limits) + f", {endpoint.max_retries} retries, {endpoint.timeout_s:g} s timeout",
    )


def _decoding(endpoint: EndpointConfig) -> str:
    return "greedy" if endpoint.temperature == 0 else f"temperature {endpoint.temperature:g}"


class _Served:
    """What both served stages do: one request per row with an image and a prompt, and the rows' outcomes."""

    def __init__(self, endpoint: EndpointConfig, where: str, image_column: str, usage_column: str):
        self.endpoint, self.where = endpoint, where
        self.image_column, self.usage_column = image_column, usage_column
        self.client = Client(endpoint, _api_key(endpoint, where), where)
        self.answered = False  # whether any request of this worker has had its answer

    def replies(self, batch: pa.Table, prompts: list[str | None], max_tokens: int, logprobs: bool) -> list:
        """Each row's ``Reply``; None for a row without a usable image or a prompt (no request is sent)."""
        images = self._images(batch)
        ok = pc.equal(batch.column(col.STATUS), col.OK).to_numpy(zero_copy_only=False)
        replies: list[Reply | None] = [None] * batch.num_rows
        rows = [i for i, (image, prompt) in enumerate(zip(images, prompts)) if ok[i] and image and prompt]
        requests = [partial(self._body, images[i], prompts[i], max_tokens, logprobs) for i in rows]
        for i, reply in zip(rows, self.client.send(requests) if requests else []):
            replies[i] = reply
        self._check_some_answer([replies[i] for i in rows if replies[i].attempts])
        return replies

    def outcomes(self, batch: pa.Table, replies: list) -> pa.Table:
        """The usage column, and ``endpoint_error`` with the reason on the rows whose request failed for good."""
        usage = [None if r is None or r.attempts == 0 else _usage(r) for r in replies]
        batch = batch.append_column(self.usage_column, pa.array(usage, col.USAGE_TYPE))
        failed = [r is not None and r.error is not None for r in replies]
        if not any(failed):
            return batch
        status, error = batch.column(col.STATUS).to_pylist(), batch.column(col.ERROR).to_pylist()
        for i, reply in enumerate(replies):
            if failed[i]:
                status[i], error[i] = col.ENDPOINT_ERROR, f"{self.where}: {reply.error}"
        batch = batch.set_column(batch.schema.get_field_index(col.STATUS), col.STATUS, pa.array(status, pa.string()))
        return batch.set_column(batch.schema.get_field_index(col.ERROR), col.ERROR, pa.array(error, pa.string()))

    def _images(self, batch: pa.Table) -> list:
        return batch.column(self.endpoint.image_url_column or self.image_column).to_pylist()

    def _data_url(self, image: bytes) -> str:
        e = self.endpoint
        return image_data_url(image, e.image_longest_side, e.image_format, e.jpeg_quality)

    def _body(self, image: bytes | str, prompt: str, max_tokens: int, logprobs: bool) -> dict:
        """One row's request (on the client's encoding threads): the image as a data URL, or the row's URL."""
        url = image if self.endpoint.image_url_column else self._data_url(image)
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]
        body = {
            "model": self.endpoint.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": self.endpoint.temperature,
        }
        if logprobs:
            body.update(logprobs=True, top_logprobs=self.endpoint.top_logprobs)
        return body

    def _check_some_answer(self, sent: list[Reply]) -> None:
        """Every request of a batch failing before any has ever succeeded is the stage failing (a wrong model
        name, a rejected key), not its rows: the run stops with the server's answer."""
        succeeded = any(r.error is None for r in sent)
        if succeeded or self.answered:
            self.answered = self.answered or succeeded
            return
        if len(sent) >= 2:
            raise StageFailed(f"{self.where}: every request failed and none has succeeded yet: {sent[0].error}")


def _api_key(endpoint: EndpointConfig, where: str) -> str | None:
    if endpoint.api_key_env is None:
        return None
    key = os.environ.get(endpoint.api_key_env)
    if not key:
        raise ValueError(
            f"{where}.api_key_env: the environment variable {endpoint.api_key_env} is not set where the stage runs"
        )
    return key


def _usage(reply: Reply) -> dict:
    return {
        col.PROMPT_TOKENS: reply.prompt_tokens,
        col.COMPLETION_TOKENS: reply.completion_tokens,
        col.ATTEMPTS: reply.attempts,
    }


class ServedCaptioner(_Served):
    """Append ``caption_generated`` and ``caption_usage``: one request per row with a decoded image."""

    def __init__(self, config: CaptionConfig, image_column: str):
        super().__init__(config.endpoint, "caption.endpoint", image_column, col.CAPTION_USAGE)
        self.config = config

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts = [self.config.prompt or DEFAULT_CHAT_PROMPT] * batch.num_rows
        replies = self.replies(batch, prompts, self.config.max_new_tokens, logprobs=False)
        captions = [r.text.strip() if r is not None and r.text is not None else None for r in replies]
        batch = batch.append_column(col.CAPTION_GENERATED, pa.array(captions, pa.string()))
        return self.outcomes(batch, replies)


class ServedQuestions(_Served):
    """Append ``answer`` (with ``yes_no`` ``answer_yes_prob``) and ``answer_usage``."""

    def __init__(self, config: AskConfig, image_column: str):
        super().__init__(config.endpoint, "ask.endpoint", image_column, col.ANSWER_USAGE)
        self.config = config

    def __call__(self, batch: pa.Table) -> pa.Table:
        c = self.config
        questions = row_questions(c, batch, self._cut_values)
        tokens = c.max_new_tokens if c.generates else 1
        replies = self.replies(batch, questions, tokens, logprobs=c.yes_no and self.endpoint.logprobs)
        answers, yes = [], []
        for reply in replies:
            text, p = self.answer(reply)
            answers.append(text)
            yes.append(p)
        batch = batch.append_column(col.ANSWER, pa.array(answers, pa.string()))
        if c.yes_no:
            batch = batch.append_column(col.ANSWER_YES_PROB, pa.array(yes, pa.float32()))
        return self.outcomes(batch, replies)

    def answer(self, reply: Reply | None) -> tuple[str | None, float | None]:
        """The row's answer and P(yes): without generation "yes"/"no", whichever is likelier."""
        if reply is None or reply.text is None:
            return None, None
        c = self.config
        p = yes_probability(reply.top_logprobs, c.yes_no_words) if c.yes_no else None
        if c.generates:
            return reply.text.strip(), p
        if p is not None:
            return (YES if p >= 0.5 else NO), p
        # No logprobs: the generated word itself, where it is one of the two.
        word = _word(reply.text)
        return {_word(c.yes_no_words[0]): YES, _word(c.yes_no_words[1]): NO}.get(word), None

    def _cut_values(self, texts: list[str]) -> list[str]:
        limit = self.config.max_value_tokens * CHARS_PER_TOKEN
        return [text[:limit] for text in texts]


def yes_probability(top: tuple[tuple[str, float], ...] | None, words: tuple[str, str]) -> float | None:
    """P(yes | yes or no) from the first answer token's top logprobs: each word's variants (``Yes``, ``▁yes``,
    `` YES``) summed. A word absent from the top list counts as probability 0; neither present: None."""
    if not top:
        return None
    mass = [0.0, 0.0]
    for token, logprob in top:
        word = _word(token)
        for i, wanted in enumerate(words):
            if word == _word(wanted):
                mass[i] += math.exp(logprob)
    if not any(mass):
        return None
    return float(np.float32(mass[0] / (mass[0] + mass[1])))


def _word(text: str) -> str:
    """A token or answer as a bare lower-case word: SentencePiece's ``▁``, spaces and punctuation gone."""
    return text.replace("\u2581", " ").strip().strip(string.punctuation).strip().lower()
