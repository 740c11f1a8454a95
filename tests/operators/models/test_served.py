"""Captions and answers from a served VLM (transformers serve on loopback) against plain transformers on the same model."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError

from operators import schema as col
from operators.models.ask import AskConfig
from operators.models.caption import DEFAULT_CHAT_PROMPT, CaptionConfig
from operators.models.served import ServedCaptioner, ServedQuestions, yes_probability
from operators.stage import StageFailed
from tests.images import encode, noise
from tests.operators.models.test_ask import CAPTIONS, IMAGES, TEMPLATE, load, prompt, reference_answers


def endpoint(server, **settings) -> dict:
    # Sent as the input holds them (PNG, never resized): the server's processor then sees the pixels the
    # in-process stage's processor sees.
    return {"base_url": server.base_url, "model": server.model, "image_longest_side": None, **settings}


def rows(images, statuses=None, **columns) -> pa.Table:
    n = len(images)
    return pa.table(
        {
            col.KEY: [str(i) for i in range(n)],
            col.IMAGE_BYTES: pa.array([encode(im, "PNG") if im is not None else None for im in images], pa.binary()),
            col.STATUS: statuses or [col.OK] * n,
            col.ERROR: pa.nulls(n, pa.string()),
            **{name: pa.array(values, pa.string()) for name, values in columns.items()},
        }
    )


def prompt_tokens(model_dir, images, questions) -> list[int]:
    """What the server's processor makes of each row: the image's tokens expanded into the chat prompt."""
    processor, _ = load(model_dir)
    return [len(processor(images=[im], text=[prompt(processor, q)]).input_ids[0]) for im, q in zip(images, questions)]


def test_served_captions_equal_plain_generate_with_the_same_chat_prompt(vlm_server, tiny_llava_dir):
    config = CaptionConfig(endpoint=endpoint(vlm_server), max_new_tokens=6)
    out = ServedCaptioner(config, col.IMAGE_BYTES)(rows(IMAGES))
    expected = reference_answers(tiny_llava_dir, IMAGES, [DEFAULT_CHAT_PROMPT] * 4, max_new_tokens=6)
    assert out.column(col.CAPTION_GENERATED).to_pylist() == expected and all(expected)
    usage = out.column(col.CAPTION_USAGE).to_pylist()
    assert [u[col.PROMPT_TOKENS] for u in usage] == prompt_tokens(tiny_llava_dir, IMAGES, [DEFAULT_CHAT_PROMPT] * 4)
    assert all(1 <= u[col.COMPLETION_TOKENS] <= 6 and u[col.ATTEMPTS] == 1 for u in usage)
    assert out.column(col.STATUS).to_pylist() == [col.OK] * 4


def test_served_answers_to_a_template_equal_plain_generate_and_rows_without_a_question_send_nothing(
    vlm_server, tiny_llava_dir
):
    config = AskConfig(endpoint=endpoint(vlm_server), template=TEMPLATE, max_new_tokens=5)
    images = [*IMAGES, IMAGES[0], IMAGES[1]]
    statuses = [col.OK] * 5 + [col.DECODE_ERROR]
    out = ServedQuestions(config, col.IMAGE_BYTES)(rows(images, statuses, caption=[*CAPTIONS, "a red circle"]))
    asked = [0, 1, 4]  # rows 2 and 3 have no caption to ask about, row 5's image failed
    questions = [TEMPLATE.format(caption=CAPTIONS[i]) for i in asked]
    expected = reference_answers(tiny_llava_dir, [images[i] for i in asked], questions, max_new_tokens=5)
    answers, usage = out.column(col.ANSWER).to_pylist(), out.column(col.ANSWER_USAGE).to_pylist()
    assert [answers[i] for i in asked] == expected
    assert [answers[i] for i in (2, 3, 5)] == [None] * 3 and [usage[i] for i in (2, 3, 5)] == [None] * 3
    assert out.column(col.STATUS).to_pylist() == statuses  # the failed image stays decode_error


def test_yes_no_without_logprobs_answers_with_the_generated_word_only_where_it_is_one_of_the_two(
    vlm_server, tiny_llava_dir
):
    """transformers serve returns no logprobs: P(yes) is null, and the one generated token is the answer
    only where it is "yes" or "no". The loaded stage instead compares the two words' logits, so on this
    random model its answers are yes/no where these are null: the difference the docs state."""
    config = AskConfig(endpoint=endpoint(vlm_server), question="Is there a circle?", yes_no=True)
    out = ServedQuestions(config, col.IMAGE_BYTES)(rows(IMAGES))
    first = reference_answers(tiny_llava_dir, IMAGES, ["Is there a circle?"] * 4, max_new_tokens=1)
    assert out.column(col.ANSWER).to_pylist() == [w if w in ("yes", "no") else None for w in first]
    assert out.column(col.ANSWER_YES_PROB).to_pylist() == [None] * 4
    assert all(u[col.COMPLETION_TOKENS] == 1 for u in out.column(col.ANSWER_USAGE).to_pylist())


def test_p_yes_sums_each_words_variants_in_the_top_logprobs():
    top = (("Yes", -0.5), ("\u2581yes", -2.0), (" No", -1.0), ("maybe", -0.1))
    yes, no = torch.tensor([-0.5, -2.0]).exp().sum(), torch.tensor(-1.0).exp()
    assert yes_probability(top, ("Yes", "No")) == pytest.approx(float(yes / (yes + no)), rel=1e-6)
    assert yes_probability((("Yes", -0.1),), ("Yes", "No")) == 1.0  # "No" is not among the top: probability 0
    assert yes_probability((("maybe", -0.1),), ("Yes", "No")) is None
    assert yes_probability(None, ("Yes", "No")) is None


def test_a_model_name_the_server_does_not_serve_fails_the_stage_not_its_rows(vlm_server, tmp_path):
    config = CaptionConfig(endpoint={**endpoint(vlm_server), "model": str(tmp_path / "no-such-model")})
    with pytest.raises(StageFailed, match="every request failed and none has succeeded yet: HTTP"):
        ServedCaptioner(config, col.IMAGE_BYTES)(rows(IMAGES[:2]))


def test_the_key_comes_from_the_named_variable_and_a_missing_one_is_named(monkeypatch, vlm_server):
    monkeypatch.delenv("VLPIPE_TEST_KEY", raising=False)
    config = CaptionConfig(endpoint=endpoint(vlm_server, api_key_env="VLPIPE_TEST_KEY"))
    with pytest.raises(ValueError, match="environment variable VLPIPE_TEST_KEY is not set"):
        ServedCaptioner(config, col.IMAGE_BYTES)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"model": {"source": "m"}}, "set exactly one of caption.model"),
        ({"num_beams": 2}, "caption.num_beams applies only to a model vlpipe loads"),
        ({"precision": "float32", "resources": {"batch_size": 2}}, "caption.precision, caption.resources apply only"),
    ],
)
def test_a_served_caption_refuses_settings_only_a_loaded_model_has(settings, message):
    with pytest.raises(ValidationError, match=message):
        CaptionConfig(endpoint={"base_url": "http://h/v1", "model": "m"}, **settings)


def test_a_large_image_is_sent_no_larger_than_the_longest_side(vlm_server):
    from operators.endpoint.images import image_data_url

    big = encode(noise((900, 300), seed=1), "PNG")
    url = image_data_url(big, 256, "jpeg", 90)
    import base64
    import io

    from PIL import Image

    assert url.startswith("data:image/jpeg;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (256, 85)
    assert image_data_url(big, None) == "data:image/png;base64," + base64.b64encode(big).decode()
