"""Visual questions: a chat VLM answers one question per row and, for yes/no questions, gives P(yes).

The question is fixed, a template over the row's columns (``"Does this image show {caption}?"``) or
read from a column. It reaches the model through its chat template exactly as the captioner's
instruction does (``operators.models.caption``), so any chat VLM the captioner takes answers here too.

``answer_yes_prob`` is a softmax over two logits at the first answer position: those of the first
token of ``Yes`` and of ``No`` as the chat template writes them as the assistant's reply. That is the
token the model learnt to write first (``▁Yes`` after ``ASSISTANT:`` with a SentencePiece tokenizer,
``Yes`` after Qwen's ``assistant\\n``), not the bare word's encoding.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from operators import schema as col
from operators.endpoint.config import EndpointConfig, check_one_form
from operators.models.caption import caption_geometry, chat_inputs, chat_prompt
from operators.models.load import ModelOperator, Precision
from operators.refs import ModelRef
from operators.resources import Resources
from operators.stage import Stage
from operators.storage import StorageOptions
from operators.tensors import pixel_rows

YES, NO = "yes", "no"  # the answer to a yes/no question decided without generating
QUESTION_SOURCES = ("question", "template", "question_column")
# What only a model vlpipe loads has: an ask.endpoint leaves them to the server.
_IN_PROCESS_ONLY = ("num_beams", "image_size", "precision", "resources")


class AskConfig(BaseModel):
    """Which chat VLM answers, what it is asked, and how.

    Exactly one of ``question`` (the same for every row), ``template`` (``str.format`` over the row's
    columns) and ``question_column``. ``yes_no`` adds ``answer_yes_prob``; the answer is then "yes" or
    "no" from one forward pass, unless ``generate`` asks for the generated text as well.
    The model is loaded by vlpipe (``model``) or served (``endpoint``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelRef | None = None
    endpoint: EndpointConfig | None = None
    question: str | None = Field(None, min_length=1)
    template: str | None = Field(None, min_length=1)
    question_column: str | None = Field(None, min_length=1)
    yes_no: bool = False
    generate: bool | None = None
    yes_no_words: tuple[str, str] = ("Yes", "No")
    max_new_tokens: int = Field(16, ge=1, le=4096)
    num_beams: int = Field(1, ge=1, le=32)
    max_value_tokens: int = Field(128, ge=1)
    image_size: int | None = Field(None, ge=8)
    precision: Precision = "auto"
    resources: Resources = Resources(num_cpus=1, num_gpus=None, batch_size=32)

    @model_validator(mode="after")
    def _one_question_and_a_way_to_answer(self) -> AskConfig:
        check_one_form(self, "ask", _IN_PROCESS_ONLY)
        given = [name for name in QUESTION_SOURCES if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of {', '.join(QUESTION_SOURCES)} (got {', '.join(given) or 'none'})")
        if self.template is not None:
            template_columns(self.template)
        if self.generate is False and not self.yes_no:
            raise ValueError("generate: false needs yes_no: true (without it the answer is the generated text)")
        if self.num_beams > 1 and not self.generates:
            raise ValueError("num_beams only applies when generating (yes_no without generate: true generates nothing)")
        if len({w.strip().lower() for w in self.yes_no_words} - {""}) != 2:
            raise ValueError("yes_no_words must be two different words")
        return self

    @property
    def generates(self) -> bool:
        """Whether answers are generated text: always without ``yes_no``, with it only on ``generate: true``."""
        return self.generate if self.generate is not None else not self.yes_no

    @property
    def columns(self) -> tuple[str, ...]:
        """The row columns each question is made from."""
        if self.template is not None:
            return template_columns(self.template)
        return (self.question_column,) if self.question_column is not None else ()


def template_columns(template: str) -> tuple[str, ...]:
    """The columns a question template names, in order; a ``ValueError`` for anything but plain ``{column}``."""
    try:
        fields = [
            (name, spec, conversion)
            for _, name, spec, conversion in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError as err:
        raise ValueError(f"template: {err} (a literal brace is written {{{{ or }}}})") from None
    for name, spec, conversion in fields:
        # Whole values only: ``{caption.upper}``, ``{0}`` or ``{score:.2f}`` would fail per row, or mean something else.
        if not name or name.isdigit() or any(c in name for c in ".[]") or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(f"template: {shown} is not a column placeholder; write {{column_name}}")
    if not fields:
        raise ValueError("template has no {column} placeholder; a fixed question is ask.question")
    return tuple(dict.fromkeys(name for name, _, _ in fields))


def ask_stage(config: AskConfig, storage: StorageOptions, *, pixels_column: str, geometry: str) -> Stage:
    """The visual-question stage's contract: it reads its pixels and the columns its questions are made from."""
    if config.generates:
        decoding = f"generate up to {config.max_new_tokens} tokens, " + (
            "greedy" if config.num_beams == 1 else f"beams {config.num_beams}"
        )
    else:
        decoding = "one forward pass, no generation: answer yes or no, whichever is likelier"
    yes_no = (
        (
            f"answer_yes_prob = P({config.yes_no_words[0]!r} | {config.yes_no_words[0]!r} or "
            f"{config.yes_no_words[1]!r}) at the first answer token",
        )
        if config.yes_no
        else ()
    )
    return Stage(
        name="ask",
        kind="actor",
        config_key="ask",
        resources=config.resources,
        model=config.model,
        reads=(pixels_column, *config.columns),
        adds=(col.ANSWER, col.ANSWER_YES_PROB) if config.yes_no else (col.ANSWER,),
        build=partial(VisualQuestions, config, storage, pixels_column),
        details=(
            f"input {geometry}",
            f"asks {describe_question(config)}",
            decoding,
            *yes_no,
            f"precision {config.precision}",
        ),
    )


def describe_question(config: AskConfig) -> str:
    if config.question is not None:
        return f"{config.question!r}"
    if config.template is not None:
        return f"{config.template!r} per row"
    return f"the question in column {config.question_column}"


def row_questions(config: AskConfig, batch: pa.Table, cut: Callable[[list[str]], list[str]]) -> list[str | None]:
    """Each row's question; None where a column it is made from is null or blank.

    ``cut`` shortens the column values put into questions (the model's tokenizer, or a served model's
    character budget).
    """
    if config.question is not None:
        return [config.question] * batch.num_rows
    values = {name: _values(batch.column(name), cut) for name in config.columns}
    rows = [dict(zip(values, row)) for row in zip(*values.values())]
    if config.template is None:
        return [row[config.question_column] for row in rows]
    return [None if None in row.values() else config.template.format_map(row) for row in rows]


def _values(column: pa.ChunkedArray, cut: Callable[[list[str]], list[str]]) -> list[str | None]:
    """A column as the text put into questions: None for null or blank, the rest through ``cut``."""
    texts = [None if v is None or not str(v).strip() else str(v) for v in column.to_pylist()]
    present = iter(cut([t for t in texts if t is not None]) if any(t is not None for t in texts) else [])
    return [None if t is None else next(present) for t in texts]


class VisualQuestions(ModelOperator):
    """Append ``answer`` (and with ``yes_no`` ``answer_yes_prob``): one batched ``generate`` per batch.

    Rows without an image, or whose question lacks a value (a null or blank column), get nulls.
    """

    def __init__(self, config: AskConfig, storage: StorageOptions, pixels_column: str = col.ASK_PIXELS):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        super().__init__(config.model, config.precision, storage, AutoModelForImageTextToText)
        self.config = config
        self.pixels_column = pixels_column
        self.processor = self.preprocessor(AutoProcessor)
        if not getattr(self.processor, "chat_template", None):
            raise ValueError(f"ask.model {config.model.source} has no chat template: visual questions need a chat VLM")
        self.tokenizer = self.processor.tokenizer
        # Every row's answer starts right after its own last prompt token.
        self.tokenizer.padding_side = "left"
        self.geometry = caption_geometry(self.processor.image_processor, config.image_size)
        self.answer_tokens = (
            answer_tokens(self.processor, config.yes_no_words, config.model.source) if config.yes_no else None
        )
        self._torch = torch

    def __call__(self, batch: pa.Table) -> pa.Table:
        pixels = batch.column(self.pixels_column).combine_chunks()
        questions = self.questions(batch)
        askable = pc.is_valid(pixels).to_numpy(zero_copy_only=False) & np.array([q is not None for q in questions])
        answers: list[str | None] = [None] * batch.num_rows
        yes = np.full(batch.num_rows, np.nan, np.float32)
        if askable.any():
            rows = pixel_rows(pixels, self.geometry.out_size)[askable]
            texts, probabilities = self.answer(rows, [q for q, ok in zip(questions, askable) if ok])
            for i, text in zip(np.flatnonzero(askable), texts):
                answers[i] = text
            if probabilities is not None:
                yes[askable] = probabilities
        batch = batch.append_column(col.ANSWER, pa.array(answers, pa.string()))
        if self.config.yes_no:
            batch = batch.append_column(col.ANSWER_YES_PROB, pa.array(yes, pa.float32(), mask=~askable))
        return batch

    def questions(self, batch: pa.Table) -> list[str | None]:
        """Each row's question; None where a column it is made from is null or blank."""
        return row_questions(self.config, batch, self._cut_values)

    def _cut_values(self, texts: list[str]) -> list[str]:
        """Each text cut to ``max_value_tokens`` tokens, so a long caption cannot push the prompt past the context."""
        limit = self.config.max_value_tokens
        # One token past the limit is enough to know a text is too long.
        ids = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=limit + 1).input_ids
        return [_cut(self.tokenizer, text, row, limit) for text, row in zip(texts, ids)]

    def answer(self, rows: np.ndarray, questions: list[str]) -> tuple[list[str], np.ndarray | None]:
        """Answers, and P(yes) with ``yes_no``, for (n, H, W, 3) uint8 images and one question each."""
        torch = self._torch
        c = self.config
        prompts = [chat_prompt(self.processor, q) for q in questions]
        inputs = chat_inputs(self.processor, rows, prompts, self.device, self.dtype)
        # Without generation one step is the forward pass; generate still prepares it (padding-aware
        # positions, a model's own rope indices) exactly as it would the first step of an answer.
        beams = c.num_beams if c.generates else 1
        settings = {
            "max_new_tokens": c.max_new_tokens if c.generates else 1,
            "num_beams": beams,
            "do_sample": False,
            "return_dict_in_generate": True,
            "output_logits": c.yes_no,
        }
        with torch.inference_mode():
            out = self.model.generate(**inputs, **settings)
        yes = self._yes_probability(out.logits[0][::beams]) if c.yes_no else None
        if not c.generates:
            return [YES if p >= 0.5 else NO for p in yes], yes
        # The prompt is the question, not part of the answer.
        new = out.sequences[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)], yes

    def _yes_probability(self, first_logits) -> np.ndarray:
        """Softmax over the yes and no logits of the first answer position, in fp32 (bf16 blurs values near 0 and 1)."""
        pair = first_logits[:, list(self.answer_tokens)].float()
        return self._torch.softmax(pair, dim=-1)[:, 0].cpu().numpy()


def _cut(tokenizer, text: str, ids: list[int], limit: int) -> str:
    return text if len(ids) <= limit else tokenizer.decode(ids[:limit])


def answer_tokens(processor, words: tuple[str, str], source: str) -> tuple[int, int]:
    """The first token of each answer word (yes, no) as the model's chat template writes the assistant's reply."""
    tokens = tuple(first_reply_token(processor, word, source) for word in words)
    if tokens[0] == tokens[1]:
        raise ValueError(f"ask.yes_no_words {words[0]!r} and {words[1]!r} start with the same token in {source}")
    return tokens


def first_reply_token(processor, word: str, source: str) -> int:
    """The token right after the generation prompt when the chat template renders ``word`` as the reply.

    The prompt ends where the reply begins; tokenizing prompt and prompt-plus-reply the same way shows the
    reply's first token with whatever space marker the template puts before it.
    """
    tokenizer = processor.tokenizer
    user = [{"role": "user", "content": [{"type": "text", "text": "?"}]}]
    reply = [*user, {"role": "assistant", "content": [{"type": "text", "text": word}]}]
    prompt_ids = tokenizer(
        processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    ).input_ids
    reply_ids = tokenizer(processor.apply_chat_template(reply, tokenize=False), add_special_tokens=False).input_ids
    if len(reply_ids) <= len(prompt_ids) or reply_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError(
            f"the chat template of {source} writes a reply that does not continue its generation prompt, "
            "so the first token of an answer is unknown"
        )
    token = reply_ids[len(prompt_ids)]
    if token == tokenizer.unk_token_id:
        raise ValueError(f"ask.yes_no_words: {source}'s tokenizer has no token for {word!r}")
    return token
