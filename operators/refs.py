"""Which model a stage loads: the ground floor that the stage contract and the model loaders share."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ModelRef(BaseModel):
    """Which model to load and how far to trust it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False
