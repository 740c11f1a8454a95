"""The GPU run's helpers that need no GPU: phase windows of the GPU samples, wheel requirement markers."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from packaging.requirements import Requirement

from benchmarks.gpu.driver import phase_windows, summarise
from benchmarks.gpu.wheels import LEFT_BEHIND, LEFT_BEHIND_MODULES, ROOT, runtime_requirements, wheel_requirements


def sample(t: float, util: int) -> dict:
    return {
        "t": t,
        "gpu_util": util,
        "mem_util": util // 2,
        "mem_used_mib": 1000.0 + t,
        "power_w": 100.0,
        "sm_mhz": 1980,
    }


def test_each_phase_gets_the_samples_inside_its_measured_seconds():
    samples = [sample(t, util) for t, util in ((10, 0), (11, 90), (12, 70), (13, 5), (20, 50))]
    report = {"clip": {"limit": {"seconds": 2.5}, "naive": {"seconds": 1.0}}}
    windows = phase_windows(report, {("clip", "limit"): 12.5, ("clip", "naive"): 30.0}, samples)
    assert windows["clip.limit"] == {
        "seconds": 2.5,
        "samples": 3,
        "gpu_util_mean": 53.3,
        "gpu_util_max": 90,
        "mem_util_mean": 26.7,
        "mem_util_max": 45,
        "power_w_mean": 100.0,
        "power_w_max": 100.0,
        "mem_used_mib_max": 1012,
        "sm_mhz_max": 1980,
    }
    assert windows["clip.naive"] == {"seconds": 1.0, "samples": 0}  # nothing sampled from 29 to 30
    assert summarise(samples, 0, 100)["samples"] == 5


def test_wheel_requirements_apply_the_device_markers_and_the_requested_extras(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(
            "pkg-1.0.dist-info/METADATA",
            "\n".join(
                [
                    "Name: pkg",
                    "Requires-Dist: click>=7",
                    'Requires-Dist: pandas>=2; extra == "data"',
                    'Requires-Dist: colorful; extra == "default"',
                    'Requires-Dist: py-spy>=0.4; python_version >= "3.12"',
                    'Requires-Dist: async-timeout; python_version < "3.11"',
                    'Requires-Dist: pywin32; sys_platform == "win32"',
                ]
            ),
        )
    names = lambda extras: sorted(r.name for r in wheel_requirements(wheel, extras))  # noqa: E731
    assert names(set()) == ["click", "py-spy"]  # the device's python is 3.12 on Linux, whatever runs this
    assert names({"data"}) == ["click", "pandas", "py-spy"]


def test_the_wheels_left_behind_are_never_imported_by_what_the_gpu_run_imports():
    import tomllib

    declared = {
        Requirement(line).name
        for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    carried = {req.name for req in runtime_requirements()}
    assert carried == declared - LEFT_BEHIND.keys() and LEFT_BEHIND.keys() <= declared
    # The run's entry points: the benchmark, the pipeline, the GPU tests (imported, not run).
    code = (
        "import sys, benchmarks.bench, benchmarks.gpu.driver, pipelines.run, tests.operators.models.test_gpu; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {LEFT_BEHIND_MODULES!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
