"""Heads on the image embedding: parity with plain torch.nn, conversion of released files, bad heads."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from operators import schema as col
from operators.models.heads import (
    HeadConversionError,
    HeadRef,
    HeadsConfig,
    HeadScorer,
    check_head_dir,
    convert_head,
)
from operators.models.load import ModelLoadError
from operators.storage import StorageOptions


def reference_aesthetic(dim: int) -> nn.Module:
    """The improved aesthetic predictor's MLP as its repository writes it (``self.layers``)."""
    module = nn.Module()
    module.layers = nn.Sequential(
        nn.Linear(dim, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )
    module.forward = lambda x: module.layers(x)
    return module


class ReferenceNormalization(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("variance", torch.ones(dim))

    def forward(self, x):
        return (x - self.mean) / self.variance.sqrt()


class ReferenceNsfw(nn.Module):
    """LAION's CLIP-based NSFW detector as NeMo Curator ports it."""

    def __init__(self, dim):
        super().__init__()
        self.norm = ReferenceNormalization(dim)
        self.linear_1, self.linear_2 = nn.Linear(dim, 64), nn.Linear(64, 512)
        self.linear_3, self.linear_4 = nn.Linear(512, 256), nn.Linear(256, 1)

    def forward(self, x):
        x = self.norm(x)
        x = torch.relu(self.linear_1(x))
        x = torch.relu(self.linear_2(x))
        x = torch.relu(self.linear_3(x))
        return torch.sigmoid(self.linear_4(x))


def released(kind: str, dim: int, seed: int = 0) -> nn.Module:
    """A reference head with random weights (and a non-trivial normalisation), as a release would hold."""
    torch.manual_seed(seed)
    module = reference_aesthetic(dim) if kind == "aesthetic-v2" else ReferenceNsfw(dim)
    if kind == "nsfw":
        module.norm.mean.uniform_(-0.05, 0.05)
        module.norm.variance.uniform_(0.5, 2.0)
    return module.eval()


@pytest.fixture
def head_dirs(tmp_path):
    """Released files converted to head directories, with their reference modules."""
    out = {}
    for name, arch in (("aesthetic", "aesthetic-v2"), ("nsfw", "nsfw")):
        module = released(arch, 32, seed=len(name))
        torch.save(module.state_dict(), tmp_path / f"{name}.pth")
        convert_head(tmp_path / f"{name}.pth", tmp_path / name, arch, clip_model="tiny-clip")
        out[name] = (tmp_path / name, module)
    return out


def embeddings(n: int, dim: int = 32, seed: int = 1) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def embedding_table(rows: list) -> pa.Table:
    return pa.table(
        {col.KEY: [str(i) for i in range(len(rows))], col.IMAGE_EMBEDDING: pa.array(rows, col.EMBEDDING_TYPE)}
    )


def test_heads_match_plain_torch_on_the_same_weights(head_dirs):
    config = HeadsConfig(**{name: HeadRef(source=str(d)) for name, (d, _) in head_dirs.items()})
    emb = embeddings(16)
    out = HeadScorer(config, StorageOptions())(embedding_table(list(emb)))
    for name, column in (("aesthetic", col.AESTHETIC_SCORE), ("nsfw", col.NSFW_SCORE)):
        with torch.no_grad():
            expected = head_dirs[name][1](torch.from_numpy(emb)).squeeze(-1).numpy()
        got = out.column(column)
        assert got.type == pa.float32()
        np.testing.assert_allclose(got.to_numpy(), expected, atol=1e-6, rtol=0)
    assert ((out.column(col.NSFW_SCORE).to_numpy() > 0) & (out.column(col.NSFW_SCORE).to_numpy() < 1)).all()


def test_missing_and_non_finite_embeddings_get_null_scores_not_errors(head_dirs):
    config = HeadsConfig(aesthetic=HeadRef(source=str(head_dirs["aesthetic"][0])))
    emb = embeddings(4)
    emb[1, 3] = np.nan
    emb[2, 0] = np.inf
    out = HeadScorer(config, StorageOptions())(embedding_table([emb[0], emb[1], emb[2], None, emb[3]]))
    scores = out.column(col.AESTHETIC_SCORE).to_pylist()
    assert [s is None for s in scores] == [False, True, True, True, False]
    assert col.NSFW_SCORE not in out.column_names  # only configured heads add columns (the writer nulls the rest)


def test_an_embedding_of_the_wrong_width_names_both_widths(head_dirs):
    config = HeadsConfig(nsfw=HeadRef(source=str(head_dirs["nsfw"][0])))
    with pytest.raises(ValueError, match="heads.nsfw expects 32-value embeddings, but image_embedding has 8"):
        HeadScorer(config, StorageOptions())(embedding_table(list(embeddings(2, dim=8))))


def test_convert_head_keeps_the_original_key_names_and_values(tmp_path, head_dirs):
    for name, (head_dir, module) in head_dirs.items():
        saved = load_file(head_dir / "model.safetensors")
        original = module.state_dict()
        assert sorted(saved) == sorted(original)
        for key, value in original.items():
            assert torch.equal(saved[key], value)
        spec = json.loads((head_dir / "config.json").read_text())
        assert spec == {
            "arch": "aesthetic-v2" if name == "aesthetic" else "nsfw",
            "embedding_dim": 32,
            "clip_model": "tiny-clip",
        }
    assert sorted(load_file(head_dirs["aesthetic"][0] / "model.safetensors")) == [
        f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("bias", "weight")
    ]


def test_convert_head_refuses_unknown_keys_other_architectures_and_full_pickles(tmp_path):
    state = released("aesthetic-v2", 32).state_dict()
    torch.save({**state, "layers.9.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(HeadConversionError, match="unknown key\\(s\\) layers.9.weight"):
        convert_head(tmp_path / "extra.pth", tmp_path / "a", "aesthetic-v2")
    torch.save(state, tmp_path / "aesthetic.pth")
    with pytest.raises(HeadConversionError, match="not an nsfw head: unknown key.*missing key\\(s\\) linear_1.bias"):
        convert_head(tmp_path / "aesthetic.pth", tmp_path / "b", "nsfw")
    torch.save(released("nsfw", 32), tmp_path / "module.pth")  # a whole pickled module, not a state dict
    with pytest.raises(HeadConversionError, match="weights_only=True refused it"):
        convert_head(tmp_path / "module.pth", tmp_path / "c", "nsfw")
    assert not (tmp_path / "a" / "config.json").exists() and not (tmp_path / "c").exists()


def test_bad_head_directories_say_what_is_wrong_and_the_way_out(tmp_path, head_dirs):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "sac+logos+ava1-l14-linearMSE.pth").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="pickle file .*vlpipe convert-head .*--arch aesthetic-v2"):
        check_head_dir(pickled, "aesthetic", str(pickled))
    with pytest.raises(ModelLoadError, match="pickle file .*vlpipe convert-head"):
        check_head_dir(pickled / "sac+logos+ava1-l14-linearMSE.pth", "aesthetic", "x.pth")
    with pytest.raises(ModelLoadError, match="head directory not found"):
        check_head_dir(tmp_path / "nope", "nsfw", "nope")
    with pytest.raises(ModelLoadError, match="is a nsfw head, heads.aesthetic takes aesthetic-v2"):
        check_head_dir(head_dirs["nsfw"][0], "aesthetic", "nsfw-dir")
