"""Stages whose models ship in optional packages (``pip install 'vlpipe[ocr]'``): a missing one is named.

The plan checks before any work that the package can be imported (``installed``); the worker imports
it (``require``), so a node without it fails with the same words.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from operators.models.load import ModelLoadError
from operators.resources import Resources


def missing_extra(module: str, extra: str, key: str) -> str | None:
    """Why ``key`` cannot run here, or None where ``module`` can be imported."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else _message(module, extra, key)


def require(module: str, extra: str, key: str) -> ModuleType:
    """``module``, imported; a ``ModelLoadError`` naming the extra where it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModelLoadError(_message(module, extra, key)) from None


def onnx_threads(resources: Resources) -> int:
    """ONNX Runtime's intra-op threads for a stage: the whole CPUs it asks for, at least one."""
    return max(1, int(resources.num_cpus))


def _message(module: str, extra: str, key: str) -> str:
    return f"{key} needs the {extra} extra ({module} is not installed): pip install 'vlpipe[{extra}]'"
