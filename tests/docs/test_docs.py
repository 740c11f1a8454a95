"""The documentation site builds, and what it shows runs: configs validate, commands parse.

Conventions these tests rely on (docs/development.md says them too): a ```yaml block is a vlpipe
config, whole or partial; commands go in ```bash blocks, or in ```console blocks after a `$ `
prompt; program output goes in ```text blocks.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.cli import parser
from pipelines.config import load_config, validate_config
from pipelines.errors import ConfigError
from tests.docs import DOCS, README, ROOT, fenced_blocks, markdown_files, reference

# What a partial snippet is merged into: the three required keys, nothing else.
BASE_CONFIG = {
    "input": {"uri": "s3://bucket/shards/"},
    "clip": {"model": {"source": "openai/clip-vit-base-patch32"}},
    "output": {"uri": "s3://bucket/enriched"},
}
COMMAND_LANGUAGES = {"bash", "sh", "shell", "console"}


def _mkdocs_build(config_file: Path, site_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's end-of-life banner, not a build problem
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(config_file),
            "--site-dir",
            str(site_dir),
        ],
        cwd=config_file.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _snippets(language: str) -> list:
    return [
        pytest.param(text, id=f"{path.relative_to(ROOT)}:{line}")
        for path in markdown_files()
        for lang, line, text in fenced_blocks(path)
        if lang == language
    ]


def _command_lines() -> list:
    """Every `vlpipe ...` line of a command block, continuation lines joined."""
    params = []
    for path in markdown_files():
        for language, start, text in fenced_blocks(path):
            if language not in COMMAND_LANGUAGES:
                continue
            lines = text.splitlines()
            for offset, line in enumerate(lines):
                line = line.strip()
                if language == "console":
                    if not line.startswith("$ "):
                        continue
                    line = line[2:]
                if not line.startswith("vlpipe "):
                    continue
                k = offset
                while line.endswith("\\") and k + 1 < len(lines):
                    k += 1
                    line = line[:-1] + " " + lines[k].strip()
                params.append(pytest.param(line, id=f"{path.relative_to(ROOT)}:{start + offset + 1}"))
    return params


def _merge(base: dict, snippet: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in snippet.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


YAML_SNIPPETS = _snippets("yaml")
COMMANDS = _command_lines()


def test_the_site_builds_strict_with_the_generated_reference(tmp_path):
    result = _mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    columns = (tmp_path / "site" / "reference" / "columns.html").read_text()
    assert "image_embedding" in columns and "reject_reason" in columns
    for page in ("config", "cli", "exit-codes"):
        assert (tmp_path / "site" / "reference" / f"{page}.html").is_file()
    assert not (tmp_path / "site" / "hooks").exists(), "the build hook must not be published"


def test_a_broken_anchor_fails_the_strict_build(tmp_path):
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(DOCS, tmp_path / "docs")
    with (tmp_path / "docs" / "index.md").open("a") as page:
        page.write("\nSee [nowhere](guide/running.md#no-such-heading).\n")
    result = _mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "does not contain an anchor '#no-such-heading'" in result.stdout + result.stderr


def test_every_code_block_names_its_language():
    """An unlabelled block would escape the checks below (a command in it is never parsed)."""
    unlabelled = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in markdown_files()
        for language, line, _ in fenced_blocks(path)
        if not language
    ]
    assert not unlabelled, unlabelled


def test_the_docs_show_configs_and_commands():
    assert len(YAML_SNIPPETS) >= 10 and len(COMMANDS) >= 20  # the extraction still finds them


@pytest.mark.parametrize("snippet", YAML_SNIPPETS)
def test_every_yaml_snippet_is_a_valid_config(snippet):
    raw = yaml.safe_load(snippet)
    assert isinstance(raw, dict), "a yaml block must be a vlpipe config (a mapping)"
    try:
        validate_config(_merge(BASE_CONFIG, raw), source="the snippet")
    except ConfigError as err:
        pytest.fail(str(err))


@pytest.mark.parametrize("line", COMMANDS)
def test_every_command_line_parses(line, capsys):
    argv = shlex.split(line, comments=True)[1:]
    try:
        args = parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"vlpipe {' '.join(argv)}: {capsys.readouterr().err.strip()}")
    config = getattr(args, "config", None)
    if config and args.command in ("run", "plan", "nightly", "submit") and (ROOT / config).is_file():
        load_config(ROOT / config, args.overrides)  # the file and its --set overrides validate


def _table_keys(text: str):
    """The config keys in the first column of every `| key | ... |` table."""
    in_table = False
    for line in text.splitlines():
        if line.startswith("| key |"):
            in_table = True
            continue
        if not line.startswith("|"):
            in_table = False
            continue
        if not in_table or line.startswith("|---"):
            continue
        parent = ""
        for span in re.findall(r"`([^`]+)`", line.split("|")[1]):
            key = re.sub(r"<[a-z]+>", "<name>", span)
            if key.startswith("."):
                key = parent + key
            else:
                parent = key.rsplit(".", 1)[0]
            yield key


def test_the_guide_key_tables_name_real_config_keys():
    known = {row[0] for row in reference().config_rows()}
    named = {(path.name, key) for path in markdown_files() for key in _table_keys(path.read_text())}
    assert len(named) > 50
    unknown = sorted(f"{page}: {key}" for page, key in named if key not in known)
    assert not unknown, "keys in the guide's tables that the config does not have: " + ", ".join(unknown)


def test_the_guide_lists_every_exit_code():
    running = (DOCS / "guide" / "running.md").read_text()
    table = running.split("## Exit codes and run records", 1)[1]
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", table, flags=re.M)}
    assert documented == {code for code, _ in reference().exit_code_table()}


def test_the_reference_covers_every_config_key_and_command():
    config_page, cli_page = reference().config_page(), reference().cli_page()
    for key, *_ in reference().config_rows():
        assert f"| `{key}` |" in config_page
    cli = parser()
    for sub, _ in reference()._subcommands(cli):
        assert f"## `{sub.prog}`" in cli_page


def test_readme_links_point_at_files():
    text = README.read_text()
    targets = re.findall(r"\]\(((?!https?:|#)[^)#\s]+)(?:#[^)]*)?\)", text)
    assert targets
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, missing


def test_readme_stays_short():
    assert len(README.read_text().splitlines()) <= 250
