"""Declared resources of an operator, overridable from config."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Resources(BaseModel):
    """What one worker of an operator needs, and how many workers run.

    ``num_gpus=None`` means "a GPU's share if the cluster has GPUs, else none": the model stages
    left at None split each GPU evenly, one actor per GPU each (``pipelines.execute.ray``);
    ``concurrency=None`` lets the pipeline size the pool from the cluster.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # 0: never waits for a CPU slot (storage I/O); its pool is then capped, see pipelines.execute.ray.
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float | None = Field(None, ge=0)
    concurrency: int | None = Field(None, ge=1)
    batch_size: int = Field(64, ge=1)

    def with_(self, **changes: object) -> Resources:
        """A copy with some fields replaced (validated like the original)."""
        return Resources.model_validate({**self.model_dump(), **changes})
