"""Visual questions on small Arrow tables, without Ray, against plain transformers on the tiny LLaVA."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError

from operators import schema as col
from operators.image.decode import DecodeConfig, DecodeImages
from operators.models.ask import AskConfig, VisualQuestions, first_reply_token
from operators.refs import ModelRef
from operators.storage import StorageOptions
from tests.images import encode, noise
from tests.processors import reference_processor

IMAGES = [noise((70 + 13 * i, 50 + 7 * i), seed=i) for i in range(4)]
# Different lengths, so the batch is left-padded; a null and a blank caption cannot make a question.
CAPTIONS = ["a red circle", "a big blue square on a wall", None, "  ", "a green star"]
TEMPLATE = "Does this image show {caption}?"


def asker(model_dir, **settings) -> VisualQuestions:
    return VisualQuestions(AskConfig(model=ModelRef(source=str(model_dir)), **settings), StorageOptions())


def ask(op: VisualQuestions, images, columns: dict[str, list] | None = None, extra: list[bytes] = ()) -> pa.Table:
    """The operator over decoded images (plus undecodable ``extra`` ones) and the given text columns."""
    encoded = [encode(im, "PNG") for im in images] + list(extra)
    table = pa.table(
        {
            col.KEY: [str(i) for i in range(len(encoded))],
            col.IMAGE: pa.array(encoded, pa.binary()),
            **{name: pa.array(values, pa.string()) for name, values in (columns or {}).items()},
        }
    )
    decoded = DecodeImages(DecodeConfig(jpeg_draft=False), op.geometry)(table)
    out = op(decoded.rename_columns([col.ASK_PIXELS if c == col.PIXELS else c for c in decoded.column_names]))
    assert out.column(col.KEY).to_pylist() == [str(i) for i in range(len(encoded))]
    return out


def load(model_dir):
    from transformers import AutoModelForImageTextToText

    processor = reference_processor(model_dir)
    processor.tokenizer.padding_side = "left"
    return processor, AutoModelForImageTextToText.from_pretrained(model_dir).eval()


def prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def reference_answers(model_dir, images, questions, **settings) -> list[str]:
    """Plain transformers: one left-padded batched generate over the chat prompts, the prompts cut off."""
    processor, model = load(model_dir)
    inputs = processor(images=images, text=[prompt(processor, q) for q in questions], return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, **settings)
    return [t.strip() for t in processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]


def reference_yes_prob(model_dir, images, questions) -> np.ndarray:
    """softmax(logit[yes], logit[no]) at the last prompt position of one unpadded forward pass per row.

    The tiny tokenizer splits "ASSISTANT: yes" into "assistant", ":", "yes": the answer's first token is
    the whole word, lowercased like all its input.
    """
    processor, model = load(model_dir)
    ids = processor.tokenizer.convert_tokens_to_ids(["yes", "no"])
    assert processor.tokenizer.unk_token_id not in ids
    probabilities = []
    for image, question in zip(images, questions):
        inputs = processor(images=[image], text=[prompt(processor, question)], return_tensors="pt")
        with torch.inference_mode():
            logits = model(**inputs).logits[0, -1, ids]
        probabilities.append(torch.softmax(logits, dim=-1)[0].item())
    return np.array(probabilities)


@pytest.mark.parametrize("num_beams", [1, 2], ids=["greedy", "beams2"])
def test_generated_answers_to_a_template_equal_plain_generate_and_p_yes_a_plain_forward(tiny_llava_dir, num_beams):
    op = asker(tiny_llava_dir, template=TEMPLATE, yes_no=True, generate=True, max_new_tokens=5, num_beams=num_beams)
    images = IMAGES + IMAGES[:1]
    out = ask(op, images, {col.CAPTION: [*CAPTIONS, "a red circle"]}, extra=[b"not an image"])
    asked = [0, 1, 4]  # rows 2 and 3 have no caption to ask about, row 5 no image
    questions = [TEMPLATE.format(caption=CAPTIONS[i]) for i in asked]
    expected = reference_answers(
        tiny_llava_dir, [images[i] for i in asked], questions, max_new_tokens=5, num_beams=num_beams
    )
    answers, yes = (out.column(name).to_pylist() for name in (col.ANSWER, col.ANSWER_YES_PROB))
    assert [answers[i] for i in asked] == expected and all(expected)
    np.testing.assert_allclose(
        [yes[i] for i in asked], reference_yes_prob(tiny_llava_dir, [images[i] for i in asked], questions), atol=1e-5
    )
    assert [answers[i] for i in (2, 3, 5)] == [None] * 3 and [yes[i] for i in (2, 3, 5)] == [None] * 3
    assert out.schema.field(col.ANSWER_YES_PROB).type == pa.float32()


def test_yes_no_without_generating_answers_a_question_column_by_the_likelier_word(tiny_llava_dir):
    op = asker(tiny_llava_dir, question_column="prompt", yes_no=True)
    questions = ["Is there a circle?", "Is it red or blue?", None, "Does this image show a star on a wall?"]
    out = ask(op, IMAGES, {"prompt": questions})
    asked = [0, 1, 3]
    expected = reference_yes_prob(tiny_llava_dir, [IMAGES[i] for i in asked], [questions[i] for i in asked])
    yes = out.column(col.ANSWER_YES_PROB).to_pylist()
    np.testing.assert_allclose([yes[i] for i in asked], expected, atol=1e-5)
    assert out.column(col.ANSWER).to_pylist() == [None if p is None else ("yes" if p >= 0.5 else "no") for p in yes]
    assert yes[2] is None


def test_a_fixed_question_without_yes_no_adds_only_the_generated_answer(tiny_llava_dir):
    question = "What is shown here?"
    out = ask(asker(tiny_llava_dir, question=question, max_new_tokens=4), IMAGES[:2])
    assert col.ANSWER_YES_PROB not in out.column_names
    assert out.column(col.ANSWER).to_pylist() == reference_answers(
        tiny_llava_dir, IMAGES[:2], [question] * 2, max_new_tokens=4
    )


def test_a_long_value_is_cut_to_max_value_tokens_before_it_makes_a_question(tiny_llava_dir):
    op = asker(tiny_llava_dir, template="{caption} Answer yes or no.", yes_no=True, max_value_tokens=3)
    batch = pa.table({col.CAPTION: ["red circle", "a blue square on a wall " * 5000, "big"]})
    # Cut by tokens ("big" is three of the tiny vocabulary's: b ##i ##g), not by characters or words.
    assert op.questions(batch) == [
        "red circle Answer yes or no.",
        "a blue square Answer yes or no.",
        "big Answer yes or no.",
    ]


def test_the_yes_token_is_the_first_token_of_the_reply_the_chat_template_writes(tiny_llava_dir):

    processor = reference_processor(tiny_llava_dir)
    assert processor.tokenizer.convert_ids_to_tokens(first_reply_token(processor, "Yes", "m")) == "yes"
    # A template whose reply does not start where its generation prompt ends has no well-defined first token.
    processor.chat_template = processor.chat_template.replace("{{ 'ASSISTANT:' }}", "{{ 'ANSWER:' }}")
    with pytest.raises(ValueError, match="does not continue its generation prompt"):
        first_reply_token(processor, "Yes", "m")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"question": "Is it red?", "template": "Is it {caption}?"},
            "exactly one of question, template, question_column \\(got question, template\\)",
        ),
        ({}, "exactly one of .* \\(got none\\)"),
        ({"template": "Is it {caption.upper}?"}, "{caption.upper} is not a column placeholder"),
        ({"template": "Is it {caption:>10}?"}, "{caption:>10} is not a column placeholder"),
        ({"template": "Is it {}?"}, "{} is not a column placeholder"),
        ({"template": "Is it {caption?"}, "template: expected '}' before end of string \\(a literal brace is written"),
        ({"template": "Is it red?"}, "has no {column} placeholder; a fixed question is ask.question"),
        ({"question": "Is it red?", "generate": False}, "generate: false needs yes_no: true"),
        ({"question": "Is it red?", "yes_no": True, "num_beams": 3}, "num_beams only applies when generating"),
        ({"question": "Is it red?", "yes_no_words": ["Yes", "yes"]}, "two different words"),
    ],
)
def test_bad_question_settings_fail_at_construction(settings, message):
    with pytest.raises(ValidationError, match=message):
        AskConfig(model=ModelRef(source="/m"), **settings)


def test_template_columns_are_listed_once_in_order_and_yes_no_alone_generates_nothing():
    config = AskConfig(model=ModelRef(source="/m"), template="{caption_best}? Or {caption}? {{literal}} {caption}")
    assert config.columns == ("caption_best", "caption") and config.generates
    assert AskConfig(model=ModelRef(source="/m"), question_column="q").columns == ("q",)
    assert not AskConfig(model=ModelRef(source="/m"), question="q", yes_no=True).generates
    assert AskConfig(model=ModelRef(source="/m"), question="q", yes_no=True, generate=True).generates
