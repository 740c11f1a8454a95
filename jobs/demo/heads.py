"""Random-weight heads of the released architectures, written as release files and converted like them."""

from __future__ import annotations

import pathlib

import torch

from operators.models.head_models import build
from operators.models.heads import HeadArch, convert_head


def build_random_head(
    out_dir: pathlib.Path, arch: HeadArch, *, embedding_dim: int, clip_model: str, seed: int = 0
) -> pathlib.Path:
    """A head directory made the way a user makes one: a ``.pth`` state dict, then ``convert_head``.

    The weights are random (seeded), so the scores exercise the real architecture and
    loading path but mean nothing; reused when the directory is already complete.
    """
    out_dir = pathlib.Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    torch.manual_seed(seed)
    module = build(arch, embedding_dim)
    release = out_dir.with_name(out_dir.name + ".pth")
    release.parent.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), release)
    convert_head(release, out_dir, arch, clip_model=clip_model)
    release.unlink()
    return out_dir
