"""Config loading: typos and bad values fail early, secrets never leak."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import ConfigError, load_config, validate_config

BASE = {"input": {"uri": "/data"}, "clip": {"model": {"source": "/m"}}, "output": {"uri": "/out"}}


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_misspelt_keys_are_named_with_a_suggestion(tmp_path):
    path = write(tmp_path, "input: {uri: /d, colums: {key: id}}\nclip: {model: {source: /m}}\noutput: {uri: /o}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "unknown key 'input.colums'" in str(err.value)
    assert "did you mean 'columns'" in str(err.value)


def test_bad_values_name_the_field_and_never_echo_it(tmp_path):
    raw = {**BASE, "filter": {"min_clip_score": 7}, "storage": {"secret_access_key": ["not-a-string-SECRET"]}}
    with pytest.raises(ConfigError) as err:
        validate_config(raw)
    assert "filter.min_clip_score" in str(err.value) and "storage.secret_access_key" in str(err.value)
    assert "SECRET" not in str(err.value)


def test_missing_required_sections_are_named():
    with pytest.raises(ConfigError, match="missing required key 'output'"):
        validate_config({k: v for k, v in BASE.items() if k != "output"})


def test_set_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, "input: {uri: /d}\nclip: {model: {source: /m}}\noutput: {uri: /o}\n")
    config = load_config(path, ["filter.min_clip_score=0.25", "output.kept_only=true", "decode.resources.batch_size=8"])
    assert config.filter.min_clip_score == 0.25 and config.output.kept_only is True
    assert config.decode.resources.batch_size == 8
    with pytest.raises(ConfigError, match="unknown key 'filter.min_score'"):
        load_config(path, ["filter.min_score=0.2"])


def test_credentials_are_masked_and_do_not_change_the_hash():
    with_secret = validate_config(
        {**BASE, "storage": {"access_key_id": "AKIAPLANTED", "secret_access_key": "s3cr3t-planted"}}
    )
    plain = validate_config(BASE)
    dumped = str(with_secret.public_dump()) + repr(with_secret) + str(with_secret)
    assert "s3cr3t-planted" not in dumped and "AKIAPLANTED" not in dumped
    assert with_secret.hash() == plain.hash()
    assert validate_config({**BASE, "filter": {"min_clip_score": 0.3}}).hash() != plain.hash()


def test_runs_table_defaults_to_a_hidden_folder_of_the_output():
    assert validate_config(BASE).output.run_records_uri == "/out/_vlpipe_runs"


def test_relative_paths_are_resolved_on_the_driver_but_do_not_change_the_hash(tmp_path, monkeypatch):
    (tmp_path / "models" / "clip").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    raw = {"input": {"uri": "shards/"}, "clip": {"model": {"source": "models/clip"}}, "output": {"uri": "out/t"}}
    config = validate_config(raw)
    absolute = config.with_absolute_paths()
    assert absolute.input.uri == f"{tmp_path}/shards/"
    assert absolute.output.uri == f"{tmp_path}/out/t"
    assert absolute.clip.model.source == f"{tmp_path}/models/clip"
    assert absolute.output.run_records_uri == f"{tmp_path}/out/t/_vlpipe_runs"

    remote = validate_config(
        {**raw, "input": {"uri": "s3://b/crawl/"}, "clip": {"model": {"source": "openai/clip-vit-base-patch32"}}}
    )
    assert remote.with_absolute_paths().input.uri == "s3://b/crawl/"
    assert remote.with_absolute_paths().clip.model.source == "openai/clip-vit-base-patch32"
    monkeypatch.chdir("/")
    assert validate_config(raw).hash() == config.hash()


def test_optional_stage_sections_are_checked_like_the_others():
    raw = {**BASE, "caption": {"model": {"source": "/m"}, "max_new_token": 20}}
    with pytest.raises(ConfigError, match="unknown key 'caption.max_new_token' \\(did you mean 'max_new_tokens'"):
        validate_config(raw)


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_example_configs_are_valid(path):
    config = load_config(path)
    assert config.output.uri and config.clip.model.source


RED = {"positives": ["a red circle"], "negatives": ["a blue circle"]}


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"tags": {"red": {"positives": ["a red circle"]}}}, "missing required key 'tags.red.negatives'"),
        (
            {"tags": {"red": {"positives": [], "negatives": ["x"]}}},
            "tags.red.positives: Tuple should have at least 1 item",
        ),
        ({"tags": {"red": {"positives": [" "], "negatives": ["x"]}}}, "tags.red.positives: a prompt is empty"),
        ({"tags": {"red": {**RED, "negative": ["x"]}}}, "unknown key 'tags.red.negative'"),
        (
            {"tags": {"red": RED}, "filter": {"tags": {"blue": {"min": 0.5}}}},
            "filter.tags: no tag 'blue' in tags: \\(red\\)",
        ),
        (
            {"language": {"candidates": ["en", "de"]}, "filter": {"caption_languages": ["fr"]}},
            "filter.caption_languages fr not in language.candidates \\(en, de\\)",
        ),
        ({"heads": {"aesthetic": {"source": "/h", "arch": "x"}}}, "unknown key 'heads.aesthetic.arch'"),
        ({"heads": {"watermark": {"source": "/h"}}}, "unknown key 'heads.watermark'"),
        (
            {"filter": {"classifier_scores": {"watermark": {"max": 0.5}}}},
            "filter.classifier_scores: no score 'watermark' in classifier.scores: \\(no classifier configured\\)",
        ),
        (
            {"classifier": {"model": {"source": "/m"}, "scores": {}}},
            "classifier.scores: Dictionary should have at least 1",
        ),
        (
            {"ask": {"model": {"source": "/m"}, "question": "Is it red?", "question_column": "q"}},
            "ask: set exactly one of question, template, question_column \\(got question, question_column\\)",
        ),
        (
            {"ask": {"model": {"source": "/m"}, "template": "Is it {caption!r}?"}},
            "ask: template: .* not a column placeholder",
        ),
        (
            {"filter": {"min_answer_yes_prob": 1.5}},
            "filter.min_answer_yes_prob: Input should be less than or equal to 1",
        ),
    ],
)
def test_quality_signal_settings_fail_at_load_naming_the_key(sections, message):
    with pytest.raises(ConfigError, match=message):
        validate_config({**BASE, **sections})


def test_a_language_filter_turns_the_language_stage_on_with_its_defaults():
    config = validate_config({**BASE, "filter": {"caption_languages": ["EN"]}})
    assert config.language_on and config.language is None and config.filter.caption_languages == ("en",)
    assert not validate_config(BASE).language_on


def test_an_extra_column_that_collides_with_an_output_column_names_both():
    """img2dataset's `status` would otherwise die inside Ray: 'Field "status" exists 2 times in schema'."""
    raw = {**BASE, "input": {"uri": "/data", "extra_columns": ["url", "sha256", "status"]}}
    with pytest.raises(ConfigError) as err:
        validate_config(raw)
    message = str(err.value)
    assert (
        "input.extra_columns" in message
        and "'status'" in message
        and "extra_columns: {status: input_status}" in message
    )


def test_extra_columns_can_be_renamed_and_must_stay_distinct():
    raw = {**BASE, "input": {"uri": "/data", "extra_columns": {"status": "download_status", "url": "url"}}}
    assert validate_config(raw).input.extra_pairs == (("status", "download_status"), ("url", "url"))
    with pytest.raises(ConfigError, match="'status' and 'url' would both be written as 'url'"):
        validate_config({**BASE, "input": {"uri": "/data", "extra_columns": {"status": "url", "url": "url"}}})


def test_built_in_architectures_are_known_without_importing_transformers():
    from pipelines.config import _built_in

    assert _built_in("clip") and _built_in("siglip") and _built_in("blip") and _built_in("llava")
    assert not _built_in("my-own-vlm") and not _built_in(None)


def test_a_key_pasted_where_its_variable_name_goes_is_refused_without_being_echoed():
    served = {"endpoint": {"base_url": "http://vllm:8000/v1", "model": "m", "api_key_env": "sk-live-123/456"}}
    with pytest.raises(ConfigError, match="ask.endpoint.api_key_env: api_key_env is the name of an environment") as err:
        validate_config({**BASE, "ask": {**served, "question": "Is it a cat?"}})
    assert "sk-live-123" not in str(err.value)


def test_how_hard_a_served_model_is_driven_is_not_part_of_the_config_hash():
    served = {"base_url": "http://vllm:8000/v1", "model": "m"}
    first = validate_config({**BASE, "caption": {"endpoint": served}})
    faster = validate_config({**BASE, "caption": {"endpoint": {**served, "concurrency": 128, "workers": 4}}})
    other = validate_config({**BASE, "caption": {"endpoint": {**served, "temperature": 0.7}}})
    assert first.hash() == faster.hash() != other.hash()
    assert first.models()["caption"] == {"source": "m", "revision": None, "endpoint": "http://vllm:8000/v1"}


def test_a_caption_language_is_checked_against_the_detector_the_run_uses():
    fasttext = {"language": {"detector": "fasttext"}, "filter": {"caption_languages": ["ml", "en"]}}
    assert validate_config({**BASE, **fasttext}).filter.caption_languages == ("ml", "en")
    with pytest.raises(ConfigError, match="unknown ISO 639-1 language code"):
        validate_config({**BASE, "filter": {"caption_languages": ["ml"]}})  # Lingua has no Malayalam
