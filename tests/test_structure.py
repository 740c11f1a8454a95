"""The tree keeps its shape: rooms that import one way, functions that fit on a screen, one lint and format."""

from __future__ import annotations

import subprocess
import sys

import pytest
import tomllib

from tests.structure import ROOT, TOPS, circles, functions_over, imports, modules, room_edges


def test_rooms_import_one_way():
    edges = room_edges()
    assert ("pipelines.run", "pipelines.execute") in edges  # the script sees the imports it should
    assert circles(edges) == []


def test_ray_is_imported_by_the_ray_executor_and_by_no_other_step_of_a_run():
    importers = {name for name, path in modules().items() if imports(path, ("ray",))}
    # Besides the executor: the jobs that run on Ray themselves (export, index), the table as a Ray
    # Dataset for users, and the CLI's job submission and progress settings.
    assert importers == {
        "pipelines.execute.ray",
        "pipelines.export.export",
        "pipelines.search.index",
        "pipelines.table.read",
        "jobs.cli",
        "jobs.submit",
    }


def test_no_function_runs_past_fifty_lines():
    assert functions_over(50) == []


def test_only_the_three_layers_are_installed_at_the_top():
    from setuptools import find_packages

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    found = find_packages(str(ROOT), include=config["tool"]["setuptools"]["packages"]["find"]["include"])
    assert {name.split(".")[0] for name in found} == set(TOPS)


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff(command):
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
