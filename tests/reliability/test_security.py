"""What a hostile input or model cannot do, and where credentials never show up."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import re
import shutil
import socket
import traceback
from pathlib import Path

import numpy as np
import PIL
import pyarrow as pa
import pyarrow.fs
import pytest
import yaml
from PIL import (
    EpsImagePlugin,
    FitsImagePlugin,
    Image,
    PsdImagePlugin,
    UnidentifiedImageError,
    features,
)

from jobs.cli import main
from operators import schema as col
from operators.image.decode import DEFAULT_FORMATS, DecodeConfig, DecodeImages, PixelSpec
from operators.models.clip import ClipConfig, ClipScorer
from operators.models.load import ModelLoadError
from operators.refs import ModelRef
from operators.storage import StorageOptions
from tests.reliability import corpus

ROOT = Path(__file__).resolve().parents[2]

# Decoder CVEs and the Pillow release that fixed each.
PILLOW_FIXES = {
    "CVE-2023-4863": "10.0.1",  # heap overflow in the bundled libwebp
    "CVE-2023-50447": "10.2.0",  # arbitrary code execution through ImageMath.eval
    "CVE-2024-28219": "10.3.0",  # buffer overflow in _imagingcms
    "CVE-2026-25990": "12.1.1",  # out-of-bounds write loading a crafted PSD
    "CVE-2026-40192": "12.2.0",  # unbounded gzip read (decompression bomb) in FITS
}


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def test_pillow_installed_and_pinned_is_past_every_listed_decoder_cve():
    needed = max(version(v) for v in PILLOW_FIXES.values())
    pinned = re.search(r"^pillow==(\S+)$", (ROOT / "constraints.txt").read_text(), flags=re.MULTILINE | re.IGNORECASE)
    assert pinned and version(pinned.group(1)) >= needed
    assert version(PIL.__version__) >= needed
    assert version(features.version("webp")) >= (1, 3, 2)  # the libwebp release that fixed CVE-2023-4863


def test_only_allowlisted_formats_ever_reach_a_pillow_plugin(monkeypatch):
    opened = []

    def refuse(plugin):
        def _open(self):
            opened.append(plugin)
            raise SyntaxError(f"{plugin} plugin must not run")

        return _open

    for plugin, cls in (
        ("PSD", PsdImagePlugin.PsdImageFile),
        ("EPS", EpsImagePlugin.EpsImageFile),
        ("FITS", FitsImagePlugin.FitsImageFile),
    ):
        monkeypatch.setattr(cls, "_open", refuse(plugin))
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: opened.append("Ghostscript"))

    hostile = [corpus.psd(), corpus.eps(), corpus.fits()]
    table = pa.table({col.IMAGE: pa.array(hostile, pa.binary())})
    out = DecodeImages(DecodeConfig(), PixelSpec(resize=(8, 8)))(table)
    assert out.column(col.STATUS).to_pylist() == [col.UNSUPPORTED_FORMAT] * 3
    assert opened == []
    assert set(DEFAULT_FORMATS) <= {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"}
    # Without the allowlist the same bytes do reach the plugins: the spies above are live.
    for data in hostile:
        with pytest.raises(UnidentifiedImageError):  # each plugin ran and refused
            Image.open(io.BytesIO(data))
    assert opened == ["PSD", "EPS", "FITS"]


def test_pickle_weights_load_only_when_the_config_allows_them(tmp_path, tiny_clip_dir):
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_clip_dir, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(tiny_clip_dir / "model.safetensors"), pickled / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"only pickle weights \(pytorch_model.bin\).*allow_pickle_weights"):
        ClipScorer(ClipConfig(model=ModelRef(source=str(pickled))), StorageOptions())
    trusted = ClipScorer(ClipConfig(model=ModelRef(source=str(pickled), allow_pickle_weights=True)), StorageOptions())
    reference = ClipScorer(ClipConfig(model=ModelRef(source=str(tiny_clip_dir))), StorageOptions())
    np.testing.assert_allclose(
        trusted.embed_texts(["a red square"]), reference.embed_texts(["a red square"]), atol=1e-6
    )


@pytest.fixture
def model_with_code(tmp_path, tiny_clip_dir) -> tuple[Path, Path]:
    """A model directory whose config asks transformers to import its own module, which leaves a marker."""
    model, marker = tmp_path / "remote-code-model", tmp_path / "CODE_RAN"
    shutil.copytree(tiny_clip_dir, model)
    (model / "planted.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((model / "config.json").read_text())
    config.update(
        model_type="planted_clip", auto_map={"AutoConfig": "planted.PlantedConfig", "AutoModel": "planted.PlantedModel"}
    )
    (model / "config.json").write_text(json.dumps(config))
    return model, marker


def test_model_code_never_runs_without_trust_remote_code(model_with_code, tmp_path, capsys):
    model, marker = model_with_code
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "input": {"uri": str(tmp_path)},
                "output": {"uri": str(tmp_path / "out")},
                "clip": {"model": {"source": str(model)}},
            }
        )
    )
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "clip.model:" in err and "auto_map in config.json" in err and "trust_remote_code: true" in err
    # Even an operator built directly (no driver check) is stopped by transformers' own guard.
    with pytest.raises(ValueError, match="trust_remote_code"):
        ClipScorer(ClipConfig(model=ModelRef(source=str(model))), StorageOptions())
    assert not marker.exists()
    # The planted module is live: importing it is all it takes.
    spec = importlib.util.spec_from_file_location("planted", model / "planted.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert marker.read_text() == "ran"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_run_that_fails_on_storage_does_not_leak_credentials(monkeypatch, tiny_clip_dir, caplog, capfd):
    from pipelines.config import validate_config
    from pipelines.run import run_pipeline

    secret, token = "PLANTED-secret-key-5f1c9a", "PLANTED-session-token-77e0b2"
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAPLANTED")
    config = validate_config(
        {
            "input": {"uri": "s3://nowhere/crawl/"},
            # One attempt: the test is about what the failure shows, not about pyarrow's ~47 s of backoff.
            "storage": {
                "endpoint_url": f"http://127.0.0.1:{_closed_port()}",
                "region": "us-east-1",
                "secret_access_key": secret,
                "max_attempts": 1,
            },
            "clip": {"model": {"source": str(tiny_clip_dir)}},
            "output": {"uri": "s3://nowhere/out"},
        }
    )
    caplog.set_level(logging.DEBUG)
    with pytest.raises(Exception) as failure:
        run_pipeline(config)
    shown = "".join(traceback.format_exception(failure.value)) + caplog.text + "".join(capfd.readouterr())
    shown += repr(config) + str(config.public_dump())
    assert secret not in shown and token not in shown


@pytest.mark.slow
def test_the_secret_key_of_a_real_run_appears_nowhere_it_leaves_traces(
    ray_cluster, s3, s3_input, tiny_clip_dir, caplog, capfd
):
    import ray

    from pipelines.run import run_pipeline
    from pipelines.table.records import read_run_records
    from tests.pipelines.conftest import s3_config

    secret = s3.secret_access_key
    s3.create_bucket("secrets")
    config = s3_config(s3, tiny_clip_dir, output={"uri": "s3://secrets/enriched"})
    caplog.set_level(logging.DEBUG)
    record = run_pipeline(config)
    assert record.rows_in > 0 and record.status == "succeeded"  # the secret was used, and worked

    runs = read_run_records("s3://secrets/enriched/_vlpipe_runs", config.storage).to_pylist()
    assert secret not in json.dumps(runs, default=str) + repr(record)
    assert secret not in caplog.text + "".join(capfd.readouterr())
    fs = s3.filesystem()
    written = [i.path for i in fs.get_file_info(pa.fs.FileSelector("secrets", recursive=True)) if i.is_file]
    assert any("_delta_log" in p for p in written) and any(p.endswith(".parquet") for p in written)
    for path in written:  # data files, Delta log and run records: everything the run committed
        with fs.open_input_stream(path) as f:
            assert secret.encode() not in f.read(), path
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    for path in (p for p in logs.rglob("*") if p.is_file()):  # driver, worker and raylet logs
        assert secret.encode() not in path.read_bytes(), path
