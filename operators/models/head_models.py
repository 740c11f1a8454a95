"""The released heads on a CLIP image embedding, layer for layer (imported only where torch runs).

Module and parameter names follow the original code, so a released state dict loads
with its own key names:

- ``aesthetic-v2``: LAION's improved aesthetic predictor (christophschuhmann/
  improved-aesthetic-predictor, ``MLP`` in ``simple_inference.py``): five linear layers
  in an ``nn.Sequential`` called ``layers``, dropout between the first four and no
  activation at all (the ReLUs are commented out in the original), one output, the
  mean rating (about 1-10). Input: the L2-normalised ViT-L/14 image embedding.
- ``nsfw``: LAION's CLIP-based NSFW detector as NVIDIA NeMo Curator ports it from
  the Keras original: a ``Normalization`` (``(x - mean) / sqrt(variance)``, no
  epsilon), three ReLU linear layers, a sigmoid output, 0-1. Input: the L2-normalised
  ViT-L/14 image embedding (NeMo's CLIP embedder normalises before the head).
"""

from __future__ import annotations

import torch
from torch import nn


class AestheticV2(nn.Module):
    def __init__(self, embedding_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embedding_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


class Normalization(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("variance", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.variance.sqrt()


class NsfwDetector(nn.Module):
    def __init__(self, embedding_dim: int = 768):
        super().__init__()
        self.norm = Normalization(embedding_dim)
        self.linear_1 = nn.Linear(embedding_dim, 64)
        self.linear_2 = nn.Linear(64, 512)
        self.linear_3 = nn.Linear(512, 256)
        self.linear_4 = nn.Linear(256, 1)
        self.act = nn.ReLU()
        self.act_out = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        x = self.act(self.linear_1(x))
        x = self.act(self.linear_2(x))
        x = self.act(self.linear_3(x))
        return self.act_out(self.linear_4(x)).squeeze(-1)


ARCHITECTURES = {"aesthetic-v2": AestheticV2, "nsfw": NsfwDetector}
# The weight whose input width is the embedding dimension.
INPUT_WEIGHT = {"aesthetic-v2": "layers.0.weight", "nsfw": "linear_1.weight"}


def build(arch: str, embedding_dim: int) -> nn.Module:
    """An untrained head of ``arch`` for embeddings of ``embedding_dim``, in eval mode."""
    return ARCHITECTURES[arch](embedding_dim).eval()
