"""Tar shards for tests, written member by member with plain ``tarfile`` (any order, any content)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path


def tar_bytes(members: list[tuple[str, bytes | str | dict]]) -> bytes:
    """A tar with these (name, payload) members in this order; dicts become JSON, str UTF-8."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, payload in members:
            if isinstance(payload, dict):
                payload = json.dumps(payload)
            data = payload.encode() if isinstance(payload, str) else payload
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes | str | dict]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tar_bytes(members))
    return path
