"""The GPU run's Python side: machine facts, model and shard preparation, the benchmark under a GPU monitor.

``benchmarks/gpu/run.sh`` calls it; each subcommand writes JSON into the run's output folder:

    env      --out run.json                       versions, GPU, driver, CPUs
    prepare  --work-dir W --archs ... --rows ...  builds the random-weight models and the shards once
    bench    --out F.json -- BENCH_ARGS           benchmarks.bench with the GPU sampled throughout
    summary  --dir OUT --steps steps.tsv          the tables, GPU utilisation per phase, step outcomes
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

log = logging.getLogger(__name__)

# What benchmarks.bench logs at the end of each measured phase, with the phase's figures.
PHASE_LOGS = {
    f"{label} {mode}: %s": (workload, mode)
    for label, workload in (("CLIP", "clip"), ("caption", "caption"))
    for mode in ("limit", "naive", "vlpipe")
}


class GpuMonitor:
    """Samples GPU 0 through NVML (what nvidia-smi dmon reads) in a thread: load, memory, power, clock."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.samples, self.unavailable = interval, [], None
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception as err:  # no NVML library, no driver or no GPU: the run goes on without samples
            self.unavailable = f"{type(err).__name__}: {err}"
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        nvml, handle = self._nvml, self._handle
        while not self._stop.is_set():
            rates = nvml.nvmlDeviceGetUtilizationRates(handle)
            self.samples.append(
                {
                    "t": time.time(),
                    "gpu_util": rates.gpu,
                    "mem_util": rates.memory,
                    "mem_used_mib": nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20,
                    "power_w": nvml.nvmlDeviceGetPowerUsage(handle) / 1000,
                    "sm_mhz": nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
                }
            )
            self._stop.wait(self.interval)

    def __enter__(self):
        if self.unavailable is None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def summarise(samples: list[dict], start: float, end: float) -> dict:
    """Mean and peak of the samples taken between ``start`` and ``end`` (epoch seconds)."""
    inside = [s for s in samples if start <= s["t"] <= end]
    out: dict = {"seconds": round(end - start, 3), "samples": len(inside)}
    if inside:
        for key in ("gpu_util", "mem_util", "power_w"):
            values = [s[key] for s in inside]
            out[f"{key}_mean"], out[f"{key}_max"] = round(sum(values) / len(values), 1), max(values)
        out["mem_used_mib_max"] = round(max(s["mem_used_mib"] for s in inside))
        out["sm_mhz_max"] = max(s["sm_mhz"] for s in inside)
    return out


class PhaseLog(logging.Handler):
    """Remembers when each measured phase of the benchmark ended."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.ends: dict[tuple[str, str], float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        phase = PHASE_LOGS.get(str(record.msg))
        if phase:
            self.ends[phase] = record.created


def phase_windows(report: dict, ends: dict[tuple[str, str], float], samples: list[dict]) -> dict:
    """GPU utilisation inside each phase: from its logged end back by its measured seconds."""
    out = {}
    for (workload, mode), end in sorted(ends.items()):
        seconds = report.get(workload, {}).get(mode, {}).get("seconds")
        if seconds is not None:
            out[f"{workload}.{mode}"] = summarise(samples, end - seconds, end)
    return out


def bench(args: argparse.Namespace) -> None:
    from benchmarks import bench as harness

    phases = PhaseLog()
    logging.getLogger("benchmarks.bench").addHandler(phases)
    # The benchmark writes its tables next to its JSON: keep both out of the folder that comes back.
    raw_out = pathlib.Path(tempfile.mkdtemp(prefix="vlpipe-bench-")) / "bench.json"
    argv = [*args.bench_args, "--out", str(raw_out)]
    started = time.time()
    with GpuMonitor(args.interval) as monitor:
        report = harness.main(argv)
    finished = time.time()
    shutil.rmtree(raw_out.parent, ignore_errors=True)  # its figures are in the file written below
    gpu = {
        "source": "NVML (nvidia-ml-py), GPU 0",
        "interval_s": args.interval,
        "unavailable": monitor.unavailable,
        "whole_run": summarise(monitor.samples, started, finished),
        "phases": phase_windows(report, phases.ends, monitor.samples),
    }
    result = {
        "label": args.label,
        "bench_args": argv[:-2],
        "started": started,
        "finished": finished,
        "bench": report,
        "gpu": gpu,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.out}")


def prepare(args: argparse.Namespace) -> None:
    """Build every model and shard set the runs use, so their time limits cover measuring only."""
    from benchmarks import models
    from benchmarks.data import write_shards

    root = args.work_dir / "models"
    started = time.perf_counter()
    built = [models.clip_dir(root, tiny=True)]
    if not args.tiny:
        built += [models.clip_dir(root, arch=arch) for arch in args.archs] + [models.blip_dir(root)]
    else:
        built.append(models.blip_dir(root, tiny=True))
    for n in sorted(set(args.rows)):
        write_shards(args.work_dir / "shards" / f"n{n}", n)  # where benchmarks.bench looks for them
    print(
        f"prepared {[p.name for p in built]} and shards {sorted(set(args.rows))} in "
        f"{time.perf_counter() - started:.1f}s"
    )


def env(args: argparse.Namespace) -> None:
    import torch

    facts = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "packages": {
            name: _version(name)
            for name in (
                "transformers",
                "tokenizers",
                "safetensors",
                "torchvision",
                "pillow",
                "numpy",
                "pyarrow",
                "pandas",
                "ray",
                "deltalake",
                "pydantic",
                "nvidia-ml-py",
                "pytest",
            )
        },
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts["gpu"] = {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "bf16": torch.cuda.is_bf16_supported(),
        }
    facts["nvidia_smi"] = _nvidia_smi()
    args.out.write_text(json.dumps({"env": facts}, indent=2) + "\n")
    print(json.dumps(facts, indent=2))


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _nvidia_smi() -> str | None:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None


def summary(args: argparse.Namespace) -> None:
    """summary.txt: each workload's table and GPU use; run.json gains the step outcomes."""
    from benchmarks.bench import format_report

    lines = []
    for path in sorted(args.dir.glob("*.json")):
        if path.name == "run.json":
            continue
        result = json.loads(path.read_text())
        lines += [f"== {result['label']}  ({' '.join(result['bench_args'])})", format_report(result["bench"]), ""]
        gpu = result["gpu"]
        if gpu["unavailable"]:
            lines.append(f"GPU utilisation: not sampled ({gpu['unavailable']})")
        for name, w in {"whole run": gpu["whole_run"], **gpu["phases"]}.items():
            if w.get("samples"):
                lines.append(
                    f"  GPU {name:<16} {w['seconds']:>8.1f}s  util mean {w['gpu_util_mean']:>5.1f}% "
                    f"max {w['gpu_util_max']:>3}%  memory max {w['mem_used_mib_max']:>6} MiB  "
                    f"power mean {w['power_w_mean']:.0f} W"
                )
        lines.append("")
    steps = [dict(zip(("step", "rc", "seconds"), line.split("\t"))) for line in args.steps.read_text().splitlines()]
    lines.append("steps: " + ", ".join(f"{s['step']} rc={s['rc']} {s['seconds']}s" for s in steps))
    text = "\n".join(lines) + "\n"
    (args.dir / "summary.txt").write_text(text)
    run = args.dir / "run.json"
    record = json.loads(run.read_text()) if run.exists() else {}
    record["steps"] = [{**s, "rc": int(s["rc"]), "seconds": int(s["seconds"])} for s in steps]
    run.write_text(json.dumps(record, indent=2) + "\n")
    print(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu.driver", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("env")
    e.add_argument("--out", type=pathlib.Path, required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--work-dir", type=pathlib.Path, required=True)
    p.add_argument("--archs", nargs="*", default=["vit-b32"])
    p.add_argument("--rows", type=int, nargs="*", default=[])
    p.add_argument("--tiny", action="store_true")
    b = sub.add_parser("bench")
    b.add_argument("--out", type=pathlib.Path, required=True)
    b.add_argument("--label", required=True)
    b.add_argument("--interval", type=float, default=0.2, help="seconds between GPU samples")
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: the arguments of benchmarks.bench")
    s = sub.add_parser("summary")
    s.add_argument("--dir", type=pathlib.Path, required=True)
    s.add_argument("--steps", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)
    if getattr(args, "bench_args", None) and args.bench_args[0] == "--":
        args.bench_args = args.bench_args[1:]
    {"env": env, "prepare": prepare, "bench": bench, "summary": summary}[args.command](args)


if __name__ == "__main__":
    main(sys.argv[1:])
