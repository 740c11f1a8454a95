"""Log lines that say which run wrote them.

``run_pipeline`` binds its run id for the duration of the run (``bind_run_id`` inside
a ``run_scope``); the handler that ``configure`` installs stamps it on every record,
from any logger, so a line from Ray Data or deltalake during a run carries it too.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import sys
from collections.abc import Callable
from typing import TypeVar

_RUN_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("vlpipe_run_id", default=None)
_OWN_PACKAGES = ("operators", "pipelines", "jobs", "vlpipe")
FORMAT = "%(asctime)s %(levelname)-7s %(name)s%(run)s: %(message)s"

F = TypeVar("F", bound=Callable)


def run_scope(fn: F) -> F:
    """Run ``fn`` in a copy of the current context, so a run id it binds is gone when it returns or raises."""

    @functools.wraps(fn)
    def scoped(*args, **kwargs):
        return contextvars.copy_context().run(fn, *args, **kwargs)

    return scoped  # type: ignore[return-value]


def bind_run_id(run_id: str) -> None:
    """Stamp ``run_id`` on every log record from here to the end of the enclosing ``run_scope``."""
    _RUN_ID.set(run_id)


def current_run_id() -> str | None:
    return _RUN_ID.get()


class RunIdFilter(logging.Filter):
    """Adds ``run_id`` (or None) and ``run`` (`` run=<id>`` or empty) to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        run_id = _RUN_ID.get()
        record.run_id = run_id
        record.run = f" run={run_id}" if run_id else ""
        return True


def configure(verbosity: int = 0) -> None:
    """Logging for the CLI: vlpipe's own lines at INFO, every other library at WARNING.

    -1 (quiet): warnings and errors from everyone. 1 (-v): debug for vlpipe's own modules, and
    INFO from the libraries too. A library that logs at INFO (torch's FakeTensor cache stats at
    exit, Ray's start-up lines) would otherwise bury vlpipe's lines and print after its last one.
    """
    handler = _Stderr()
    handler.addFilter(RunIdFilter())
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, logging.StreamHandler) and _is_ours(h)]:
        root.removeHandler(old)  # main() may run more than once in one process (tests)
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbosity > 0 else logging.WARNING)
    own = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    for name in _OWN_PACKAGES:
        logging.getLogger(name).setLevel(own)
    logging.disable(logging.NOTSET)  # a previous main() in this process (tests) may have closed it


def close() -> None:
    """vlpipe has printed its last line: nothing logs after it (libraries' atexit handlers included)."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    logging.disable(logging.CRITICAL)


class _Stderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record comes: embedders and tests swap it, and a
    handler that kept the old one wrote to a closed file."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _is_ours(handler: logging.Handler) -> bool:
    return any(isinstance(f, RunIdFilter) for f in handler.filters)
