"""A bad config fails through ``vlpipe run`` before any work, with exit code 2 and the field's name."""

from __future__ import annotations

import shutil

import pytest
import yaml

import pipelines.run
from jobs.cli import main


class WorkStarted(Exception):
    """Raised by the first thing a run does once the config is accepted."""


@pytest.fixture
def no_work(monkeypatch):
    """Make starting Ray or touching the output or the shards fail loudly, so 'before any work' is checked."""
    import ray

    def started(*args, **kwargs):
        raise WorkStarted

    monkeypatch.setattr(ray, "init", started)
    monkeypatch.setattr(pipelines.run, "table_version", started)
    monkeypatch.setattr(pipelines.run, "list_shards", started)


def write_config(tmp_path, model_dir, **sections) -> str:
    raw = {
        "input": {"uri": str(tmp_path / "shards")},
        "clip": {"model": {"source": str(model_dir)}},
        "output": {"uri": str(tmp_path / "out")},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"filter": {"min_clip_scor": 0.2}}, "unknown key 'filter.min_clip_scor' (did you mean 'min_clip_score'?)"),
        ({"clip": {"batch_size": 8}}, "unknown key 'clip.batch_size'"),
        ({"filter": {"min_clip_score": 7}}, "filter.min_clip_score: Input should be less than or equal to 1"),
        ({"filter": {"min_clip_score": -3}}, "filter.min_clip_score: Input should be greater than or equal to -1"),
        ({"filter": {"keep_top_fraction": 0}}, "filter.keep_top_fraction: Input should be greater than 0"),
        ({"filter": {"keep_top_fraction": 1.5}}, "filter.keep_top_fraction: Input should be less than or equal to 1"),
        ({"decode": {"formats": ["JPEG", "EPS"]}}, "decode.formats: EPS cannot be allowed"),
    ],
    ids=[
        "unknown_key",
        "unknown_nested_key",
        "min_clip_score_7",
        "min_clip_score_-3",
        "keep_top_fraction_0",
        "keep_top_fraction_1.5",
        "eps_format",
    ],
)
def test_invalid_values_exit_2_naming_the_field(section, message, tmp_path, tiny_clip_dir, no_work, capsys):
    assert main(["run", write_config(tmp_path, tiny_clip_dir, **section)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "nightly"])
def test_a_missing_model_directory_exits_2_before_any_work(command, tmp_path, no_work, capsys):
    assert main([command, write_config(tmp_path, tmp_path / "no-such-model")]) == 2
    assert f"clip.model.source: model directory not found: {tmp_path / 'no-such-model'}" in capsys.readouterr().err


def test_pickle_only_weights_exit_2_before_any_work_unless_allowed(tmp_path, tiny_clip_dir, no_work, capsys):
    model = tmp_path / "pickled"
    shutil.copytree(tiny_clip_dir, model)
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    assert main(["run", write_config(tmp_path, model)]) == 2
    err = capsys.readouterr().err
    assert "clip.model: model" in err and "only pickle weights (pytorch_model.bin)" in err
    assert "allow_pickle_weights: true" in err
    # Opting in passes the check: the run goes on to its first real step.
    assert (
        main(
            ["run", write_config(tmp_path, model, clip={"model": {"source": str(model), "allow_pickle_weights": True}})]
        )
        == 1
    )
    assert "vlpipe: WorkStarted" in capsys.readouterr().err


def test_a_model_directory_without_weights_exits_2(tmp_path, tiny_clip_dir, no_work, capsys):
    model = tmp_path / "configs-only"
    shutil.copytree(tiny_clip_dir, model)
    (model / "model.safetensors").unlink()
    assert main(["run", write_config(tmp_path, model)]) == 2
    assert "clip.model: no model weights found" in capsys.readouterr().err
