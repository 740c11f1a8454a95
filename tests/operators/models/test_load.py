"""Model resolution: local, object store, and what is refused."""

from __future__ import annotations

import shutil

import pytest

from operators.models.load import ModelLoadError, resolve_model_dir
from operators.refs import ModelRef
from operators.storage import StorageOptions


def test_pickle_only_checkpoints_are_refused_with_the_way_out(tmp_path, tiny_clip_dir):
    model = tmp_path / "pickled"
    shutil.copytree(tiny_clip_dir, model)
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors only.*allow_pickle_weights"):
        resolve_model_dir(ModelRef(source=str(model)), StorageOptions())
    assert resolve_model_dir(ModelRef(source=str(model), allow_pickle_weights=True), StorageOptions()) == model


def test_a_missing_local_model_names_the_path(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model_dir(ModelRef(source=str(tmp_path / "nope")), StorageOptions())


@pytest.mark.slow
def test_object_store_models_are_fetched_once_per_node(s3, tiny_clip_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("VLPIPE_CACHE", str(tmp_path / "cache"))
    s3.upload(tiny_clip_dir.iterdir(), "models/tiny-clip")
    storage = StorageOptions(
        endpoint_url=s3.endpoint_url,
        region=s3.region,
        access_key_id=s3.access_key_id,
        secret_access_key=s3.secret_access_key,
    )
    ref = ModelRef(source="s3://models/tiny-clip")
    first = resolve_model_dir(ref, storage)
    assert (first / "model.safetensors").read_bytes() == (tiny_clip_dir / "model.safetensors").read_bytes()
    assert resolve_model_dir(ref, storage) == first
    configs_only = resolve_model_dir(ref, storage, config_only=True)
    assert not list(configs_only.glob("*.safetensors")) and (configs_only / "preprocessor_config.json").exists()


def test_models_load_one_at_a_time_in_a_process(tmp_path):
    # from_pretrained patches torch's init functions process-wide while it loads; two loads at once
    # (two runs in process, in threads) left the patches in place and later models on meta tensors.
    import threading
    import time

    from operators.models.load import load_model

    active, most = [0], [0]
    lock = threading.Lock()

    class Model:
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            with lock:
                active[0] += 1
                most[0] = max(most[0], active[0])
            time.sleep(0.2)
            with lock:
                active[0] -= 1
            return cls()

        def to(self, device):
            return self

        def eval(self):
            return self

    threads = [
        threading.Thread(target=load_model, args=(Model, ModelRef(source=str(tmp_path)), tmp_path, "cpu", None))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1
