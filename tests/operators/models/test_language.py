"""Caption language with Lingua, on small Arrow tables."""

from __future__ import annotations

import pyarrow as pa
import pytest
from pydantic import ValidationError

from operators import schema as col
from operators.models.language import CaptionLanguage, LanguageConfig

CANDIDATES = ("en", "de", "fr", "es", "zh", "nl")


@pytest.fixture(scope="module")
def detect() -> CaptionLanguage:
    # A few candidates keep the test's model load under a second; the default is every language.
    return CaptionLanguage(LanguageConfig(candidates=CANDIDATES))


def test_languages_of_captions_and_of_text_in_no_language(detect):
    captions = [
        "a photo of a red circle on a grey background",
        "一只猫坐在垫子上",
        "Ein roter Kreis auf grauem Hintergrund",
        "🎉🔥😀",
        "",
        "   ",
        None,
    ]
    out = detect(pa.table({col.CAPTION: pa.array(captions, pa.string())}))
    assert out.column(col.CAPTION_LANGUAGE).to_pylist() == ["en", "zh", "de", None, None, None, None]
    scores = out.column(col.CAPTION_LANGUAGE_SCORE)
    assert scores.type == pa.float32() and scores.null_count == 4
    assert all(0 < s <= 1 for s in scores.to_pylist()[:3])


def test_the_stage_reads_the_caption_the_filter_judges():
    detect = CaptionLanguage(LanguageConfig(candidates=("en", "de")), text_column=col.CAPTION_BEST)
    out = detect(pa.table({col.CAPTION: ["ein Hund im Park"], col.CAPTION_BEST: ["a dog running in the park"]}))
    assert out.column(col.CAPTION_LANGUAGE).to_pylist() == ["en"]


def test_unknown_language_codes_are_named_at_config_time():
    with pytest.raises(ValidationError, match="unknown ISO 639-1 language code\\(s\\) xx"):
        LanguageConfig(candidates=("en", "xx"))
    assert LanguageConfig(candidates=("EN", "De")).candidates == ("en", "de")
