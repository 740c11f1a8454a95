"""How a served VLM is reached: an OpenAI-compatible chat-completions endpoint (vLLM, SGLang, TGI, hosted APIs).

``caption.endpoint`` and ``ask.endpoint`` take this section in place of ``model``: the same prompt and
question rules, answered by a server instead of a model loaded into vlpipe's own workers.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from operators.resources import Resources

# An environment variable's name: what the config holds instead of the key itself.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Prices(BaseModel):
    """What the endpoint charges, for the run record's cost estimate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_per_million: float = Field(ge=0)  # per million prompt tokens
    completion_per_million: float = Field(ge=0)  # per million completion tokens
    currency: str = Field("USD", min_length=1, max_length=8)


class EndpointConfig(BaseModel):
    """The server, how images reach it, and how hard one worker may drive it.

    ``concurrency``, ``requests_per_second`` and ``tokens_per_minute`` hold per worker; ``workers``
    workers run at once on Ray (one in process).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(min_length=1)  # up to and including /v1: http://vllm:8000/v1
    model: str = Field(min_length=1)  # the model name the server serves
    # The name of the environment variable holding the API key, read where the requests are sent;
    # the key itself is never in the config, the logs, the report, the table or the run record.
    api_key_env: str | None = None
    temperature: float = Field(0.0, ge=0.0, le=2.0)  # 0: greedy
    # Ask for the first answer token's top log-probabilities (ask.yes_no's answer_yes_prob); off for
    # servers that refuse the field.
    logprobs: bool = True
    top_logprobs: int = Field(20, ge=1, le=20)
    # Images go as data URLs, made no larger than this on their longest side (null: as the input holds
    # them, never re-encoded); or, with image_url_column, as the URL in that column for the server to fetch.
    image_longest_side: int | None = Field(1024, ge=16)
    image_format: Literal["jpeg", "png"] = "jpeg"  # of a resized image
    jpeg_quality: int = Field(90, ge=1, le=100)
    image_url_column: str | None = Field(None, min_length=1)
    concurrency: int = Field(32, ge=1, le=4096)  # requests in flight per worker
    requests_per_second: float | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(None, ge=1)
    timeout_s: float = Field(120.0, gt=0, le=3600)  # one request, the whole answer included
    max_retries: int = Field(6, ge=0, le=50)  # after 429, 5xx, timeouts and dropped connections
    max_backoff_s: float = Field(30.0, gt=0, le=600)  # the longest wait between tries (Retry-After included)
    # A server that answers nothing for this long, while rows wait, fails the run.
    unreachable_s: float = Field(120.0, gt=0, le=86_400)
    prices: Prices | None = None
    workers: int = Field(1, ge=1, le=256)
    batch_size: int = Field(256, ge=1)  # rows a worker takes at a time

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https:// (e.g. http://vllm:8000/v1)")
        return url.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _a_name_not_a_key(cls, name: str | None) -> str | None:
        if name is not None and not _ENV_NAME.fullmatch(name):
            # Never echo it: a key pasted here by mistake must not reach the error message.
            raise ValueError("api_key_env is the name of an environment variable (letters, digits, _), not the key")
        return name

    @property
    def resources(self) -> Resources:
        """A light worker: no GPU, no model, a quarter of a CPU for encoding images and parsing answers."""
        return Resources(num_cpus=0.25, num_gpus=0, concurrency=self.workers, batch_size=self.batch_size)

    @property
    def chat_url(self) -> str:
        return f"{self.base_url}/chat/completions"


def check_one_form(section: BaseModel, name: str, in_process_only: tuple[str, ...]) -> None:
    """``model`` or ``endpoint``, exactly one; with ``endpoint``, none of the settings only a loaded model has."""
    model, endpoint = section.model, section.endpoint
    if (model is None) == (endpoint is None):
        raise ValueError(f"set exactly one of {name}.model (a model vlpipe loads) and {name}.endpoint (a served model)")
    if endpoint is None:
        return
    # Compared with the defaults, not by which keys were given: a recorded config (the report's) holds every key.
    defaults = type(section).model_fields
    misplaced = [field for field in in_process_only if getattr(section, field) != defaults[field].get_default()]
    if misplaced:
        verb = "applies" if len(misplaced) == 1 else "apply"
        raise ValueError(
            f"{', '.join(f'{name}.{field}' for field in misplaced)} {verb} only to a model vlpipe loads; with "
            f"{name}.endpoint the server decodes (greedy unless {name}.endpoint.temperature) and "
            f"{name}.endpoint.workers, batch_size and concurrency size the requests"
        )
