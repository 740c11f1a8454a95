"""Named moments of a run where an installed hook is called: none in production.

Tests install one to inject faults (a worker that dies in a given stage, a
commit that another run beats). A hook is ``module:function`` in
``$VLPIPE_HOOK``, so Ray's workers, which inherit the driver's environment,
load it too; ``install`` sets one in this process only.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

ENV = "VLPIPE_HOOK"
_installed: Callable[[str], None] | None = None
_loaded: tuple[str, Callable[[str], None]] | None = None


def install(hook: Callable[[str], None] | None) -> None:
    """Call ``hook(point)`` at every point reached in this process (``None`` removes it)."""
    global _installed
    _installed = hook


def active() -> bool:
    """Whether any hook is installed: per-row points are reached only then (tests), never in production."""
    return _installed is not None or bool(os.environ.get(ENV))


def reach(point: str) -> None:
    """Run the installed hooks for ``point`` (``batch:<stage>``, ``row:<stage>:<key>``, ``commit``, ...)."""
    if _installed is not None:
        _installed(point)
    named = os.environ.get(ENV)
    if named:
        _from_env(named)(point)


def _from_env(named: str) -> Callable[[str], None]:
    global _loaded
    if _loaded is None or _loaded[0] != named:
        module, _, name = named.partition(":")
        try:
            _loaded = (named, getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError) as err:
            raise RuntimeError(f"${ENV} names {named!r}, which cannot be loaded in this process: {err}") from err
    return _loaded[1]
