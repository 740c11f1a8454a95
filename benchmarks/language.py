"""Caption language: Lingua against fastText (lid.176.ftz) on a labelled multilingual caption set.

Both through the stage's own operator (``CaptionLanguage``), over every language each knows and over
the set's 16 languages as ``candidates``. Each of the four runs in a fresh Python process, so the
memory a detector holds is its own: the RSS growth of building it (``/proc/self/status``), and the
peak while it loads. Time per caption is the whole set as one batch, after a warm-up, best of 3, as
wall time and as CPU time (Lingua detects on every core, fastText on one).

Run ``python -m benchmarks.language``; it prints a table and returns the figures.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time
from collections import Counter

import pyarrow as pa

from benchmarks.language_captions import CAPTIONS, LANGUAGES, SHORT
from operators import schema as col
from operators.models.language import CaptionLanguage, LanguageConfig, language_codes

ROOT = pathlib.Path(__file__).resolve().parent.parent
REPEATS = 3
SETTINGS = (("lingua", None), ("lingua", LANGUAGES), ("fasttext", None), ("fasttext", LANGUAGES))


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` figure (VmRSS, VmHWM) in MB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(f"{field}:"))
    return int(line.split()[1]) / 1024


def measure(detector: str, candidates: list[str] | None) -> dict:
    """One detector in this process: its load, memory, time per caption and what it says of each caption."""
    table = pa.table({col.CAPTION: [text for _, text in CAPTIONS]})
    before = _status_mb("VmRSS")
    start = time.perf_counter()
    detect = CaptionLanguage(LanguageConfig(detector=detector, candidates=candidates))
    load_s = time.perf_counter() - start
    rss_mb, peak_mb = _status_mb("VmRSS") - before, _status_mb("VmHWM") - before
    predicted = detect(table).column(col.CAPTION_LANGUAGE).to_pylist()  # the warm-up
    walls, cpus = [], []
    for _ in range(REPEATS):
        wall, cpu = time.perf_counter(), time.process_time()
        detect(table)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {
        "load_s": load_s,
        "rss_mb": rss_mb,
        "load_peak_mb": peak_mb,
        "ms_per_caption": min(walls) / len(CAPTIONS) * 1e3,
        "cpu_ms_per_caption": min(cpus) / len(CAPTIONS) * 1e3,
        "predicted": predicted,
    }


def _in_fresh_process(detector: str, candidates: tuple[str, ...] | None) -> dict:
    code = (
        "import json, sys; from benchmarks.language import measure; "
        "print(json.dumps(measure(*json.loads(sys.argv[1]))))"
    )
    argument = json.dumps([detector, list(candidates) if candidates else None])
    done = subprocess.run([sys.executable, "-c", code, argument], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"{detector} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def scored(figures: dict) -> dict:
    """Accuracy per language, overall and on the short captions, and the commonest mistakes."""
    predicted = figures.pop("predicted")
    right = [p == code for (code, _), p in zip(CAPTIONS, predicted)]
    per_language = {
        language: sum(ok for (code, _), ok in zip(CAPTIONS, right) if code == language)
        / sum(code == language for code, _ in CAPTIONS)
        for language in LANGUAGES
    }
    short = [ok for pair, ok in zip(CAPTIONS, right) if pair in SHORT]
    mistakes = Counter(f"{code}->{p}" for (code, _), p, ok in zip(CAPTIONS, predicted, right) if not ok)
    return figures | {
        "accuracy": per_language,
        "overall": sum(right) / len(right),
        "short": sum(short) / len(short),
        "mistakes": dict(mistakes.most_common(6)),
    }


def _name(detector: str, candidates: tuple[str, ...] | None) -> str:
    return f"{detector}, {len(candidates)} cand." if candidates else f"{detector}, all {len(language_codes(detector))}"


def _table(results: dict[str, dict]) -> str:
    names = list(results)
    rows = [("", *names)]
    rows += [(language, *(f"{r['accuracy'][language]:.2f}" for r in results.values())) for language in LANGUAGES]
    rows += [
        ("overall", *(f"{r['overall']:.3f}" for r in results.values())),
        ("short (2-4 words)", *(f"{r['short']:.3f}" for r in results.values())),
        ("load s", *(f"{r['load_s']:.2f}" for r in results.values())),
        ("RSS growth MB", *(f"{r['rss_mb']:.0f}" for r in results.values())),
        ("peak while loading MB", *(f"{r['load_peak_mb']:.0f}" for r in results.values())),
        ("ms/caption (wall)", *(f"{r['ms_per_caption']:.3f}" for r in results.values())),
        ("ms/caption (CPU)", *(f"{r['cpu_ms_per_caption']:.3f}" for r in results.values())),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(names) + 1)]
    lines = [
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows
    ]
    lines += [
        f"mistakes, {name}: " + (", ".join(f"{k} x{v}" for k, v in r["mistakes"].items()) or "none")
        for name, r in results.items()
    ]
    return "\n".join(lines)


def main() -> dict[str, dict]:
    """Every setting in its own process; the table printed, the figures returned."""
    results = {_name(d, c): scored(_in_fresh_process(d, c)) for d, c in SETTINGS}
    print(f"caption language: {len(CAPTIONS)} captions, {len(LANGUAGES)} languages, {len(SHORT)} of them short")
    print(_table(results))
    return results


if __name__ == "__main__":
    main()
