"""The reference side of the parity tests: a model's own processor, on transformers' Pillow backend.

vlpipe decodes and resizes with Pillow, as that backend (and these models' original preprocessing)
does, so both give the same uint8 pixels. Where torchvision is installed, as on the GPU machine's
image, transformers 5 loads its torchvision backend unless told otherwise. Its resize rounds
differently: up to one level in 255 on some pixels, about 1e-4 on a CLIP score, past the 1e-5
these tests hold vlpipe to. Measured with torch 2.14.1, torchvision 0.29.1, transformers 5.17.0.
"""

from __future__ import annotations

from pathlib import Path


def reference_processor(model_dir: Path, auto_class=None):
    """``AutoProcessor`` (or ``auto_class``) from ``model_dir``, with its images on the Pillow backend."""
    from transformers import AutoProcessor

    return (auto_class or AutoProcessor).from_pretrained(model_dir, backend="pil")
