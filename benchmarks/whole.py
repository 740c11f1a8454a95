"""Whole commands, as a user times them: ``vlpipe run`` and the naive script as separate processes
(imports, Ray start, model load and exit included), several times each: min / median / max.

Also the fixed cost of a demo-sized run, split into the phases ``run_pipeline`` logs and what
lies outside them (interpreter start and imports before, Ray's shutdown after).
"""

from __future__ import annotations

import pathlib
import re
import statistics
import subprocess
import sys
import time

import yaml

_TIMINGS = re.compile(r"timings: (.*)$", re.MULTILINE)


def timed(argv: list[str], cwd: pathlib.Path | None = None) -> tuple[float, str]:
    """Wall seconds of one process, and its stderr; a failure is an error, not a figure."""
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds, done.stderr


def seconds_spread(seconds: list[float]) -> dict:
    return {"runs": len(seconds), "min_s": round(min(seconds), 3), "median_s": round(statistics.median(seconds), 3),
            "max_s": round(max(seconds), 3)}


def spread(seconds: list[float], images: int) -> dict:
    return seconds_spread(seconds) | {"images": images,
                                      "images_per_s": float(f"{images / statistics.median(seconds):.4g}")}


def vlpipe_command(config: dict, config_path: pathlib.Path, *, quiet: bool = True) -> list[str]:
    """``vlpipe run``; not ``-q`` where its own log lines (the phase timings) are wanted."""
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config))
    return [sys.executable, "-m", "jobs.cli", *(["-q"] if quiet else []), "run", str(config_path)]


def whole_clip(config: dict, work: pathlib.Path, clip_dir: pathlib.Path, paths: list[pathlib.Path],
               images: int, repeats: int) -> dict:
    """``vlpipe run`` against ``python -m benchmarks.naive_clip``, alternating, ``repeats`` times each."""
    vlpipe = vlpipe_command(config, work / "whole-clip.yaml")
    naive = [sys.executable, "-m", "benchmarks.naive_clip", str(clip_dir), str(work / "naive-scores.parquet"),
             *map(str, paths)]
    times: dict[str, list[float]] = {"vlpipe": [], "naive": []}
    for _ in range(repeats):  # alternating, so a noisy minute hurts both alike
        times["vlpipe"].append(timed(vlpipe)[0])
        times["naive"].append(timed(naive)[0])
    result = {name: spread(seconds, images) for name, seconds in times.items()}
    result["vlpipe_over_naive"] = round(result["vlpipe"]["images_per_s"] / result["naive"]["images_per_s"], 3)
    return result


def parse_timings(stderr: str) -> dict[str, float]:
    found = _TIMINGS.findall(stderr)
    if not found:
        raise RuntimeError("the run logged no timings line")
    phases = {}
    for part in found[-1].split(", "):
        name, seconds, _unit = part.rsplit(" ", 2)
        phases[name] = float(seconds)
    return phases


def fixed_cost(config: dict, work: pathlib.Path, repeats: int) -> dict:
    """A demo-sized run as a whole process: wall time and where it went (median run of ``repeats``)."""
    command = vlpipe_command(config, work / "fixed-cost.yaml", quiet=False)
    imports = [timed([sys.executable, "-c", "import jobs.cli, pipelines.run"])[0] for _ in range(repeats)]
    runs = sorted((timed(command) for _ in range(repeats)), key=lambda run: run[0])
    wall, stderr = runs[len(runs) // 2]
    phases = parse_timings(stderr)
    inside = sum(v for k, v in phases.items() if k != "execute_until_first_file")
    return {"wall": seconds_spread([w for w, _ in runs]), "imports_s": round(statistics.median(imports), 3), "phases_s": phases,
            "outside_run_s": round(wall - inside, 3)}
