"""Whole commands, as a user times them: ``vlpipe run`` and the naive script as separate processes
(imports, Ray start, model load and exit included), several times each: min / median / max.

Also the fixed cost of a demo-sized run, split into the phases ``run_pipeline`` logs and what
lies outside them (interpreter start and imports before, Ray's shutdown after). ``vlpipe run``
runs both ways: ``executor: auto`` (runs this size in process, without Ray) and ``ray``.
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
    return {
        "runs": len(seconds),
        "min_s": round(min(seconds), 3),
        "median_s": round(statistics.median(seconds), 3),
        "max_s": round(max(seconds), 3),
    }


def spread(seconds: list[float], images: int) -> dict:
    return seconds_spread(seconds) | {
        "images": images,
        "images_per_s": float(f"{images / statistics.median(seconds):.4g}"),
    }


def vlpipe_command(config: dict, config_path: pathlib.Path, *, quiet: bool = True) -> list[str]:
    """``vlpipe run``; not ``-q`` where its own log lines (the phase timings) are wanted."""
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config))
    return [sys.executable, "-m", "jobs.cli", *(["-q"] if quiet else []), "run", str(config_path)]


EXECUTORS = ("auto", "ray")  # auto: a run of this size goes in process, without Ray


def take_turns(commands: dict[str, list[str]], repeats: int) -> dict[str, list[tuple[float, str]]]:
    """Each command ``repeats`` times, taking turns so that a noisy minute hurts all alike: the wall
    time and stderr of every run, by name."""
    runs: dict[str, list[tuple[float, str]]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, command in commands.items():
            runs[name].append(timed(command))
    return runs


def whole_clip(
    config: dict, work: pathlib.Path, clip_dir: pathlib.Path, paths: list[pathlib.Path], images: int, repeats: int
) -> dict:
    """``vlpipe run`` (``executor: auto`` and ``ray``) against ``python -m benchmarks.naive_clip``,
    taking turns, ``repeats`` times each."""
    commands = {
        f"vlpipe_{executor}": vlpipe_command({**config, "executor": executor}, work / f"whole-clip-{executor}.yaml")
        for executor in EXECUTORS
    }
    commands["naive"] = [
        sys.executable,
        "-m",
        "benchmarks.naive_clip",
        str(clip_dir),
        str(work / "naive-scores.parquet"),
        *map(str, paths),
    ]
    result = {name: spread([wall for wall, _ in runs], images) for name, runs in take_turns(commands, repeats).items()}
    for executor in EXECUTORS:
        result[f"vlpipe_{executor}_over_naive"] = round(
            result[f"vlpipe_{executor}"]["images_per_s"] / result["naive"]["images_per_s"], 3
        )
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
    """A demo-sized run as a whole process, with each executor: wall time and where it went (the
    median run of ``repeats``)."""
    imports = [timed([sys.executable, "-c", "import jobs.cli, pipelines.run"])[0] for _ in range(repeats)]
    commands = {
        executor: vlpipe_command({**config, "executor": executor}, work / f"fixed-cost-{executor}.yaml", quiet=False)
        for executor in EXECUTORS
    }
    result: dict = {"imports_s": round(statistics.median(imports), 3)}
    for executor, done in take_turns(commands, repeats).items():
        done.sort(key=lambda run: run[0])
        wall, stderr = done[len(done) // 2]
        phases = parse_timings(stderr)
        inside = sum(v for k, v in phases.items() if k != "execute_until_first_file")
        result[executor] = {
            "wall": seconds_spread([w for w, _ in done]),
            "phases_s": phases,
            "outside_run_s": round(wall - inside, 3),
        }
    return result
