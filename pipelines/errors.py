"""Every way a run or a command can end, and the exit code each one gets: one table, ``EXIT_CODES``."""

from __future__ import annotations

EXIT_CODES = {
    0: "succeeded",
    1: "anything else (a model that cannot load, a Ray failure, a bug)",
    2: "bad config or usage (the message names the field)",
    3: "partial: some input shards failed; the good ones were committed",
    4: "no usable input: nothing matched input.uri, or no shard could be read",
    5: "another run committed this run's partition first; nothing was committed",
    6: "storage or the Ray cluster cannot be reached, or refuses access",
    130: "interrupted (SIGINT or SIGTERM)",
}


class VlpipeError(Exception):
    """An expected way for a command to fail: one line for the user, no traceback."""

    exit_code = 1


class ConfigError(VlpipeError, ValueError):
    """The config cannot be used; the message names the offending keys."""

    exit_code = 2


class PlanError(ConfigError):
    """The stages of a config do not fit together (a column nothing produces, resources the cluster lacks)."""


class NoInputError(VlpipeError):
    """No input shard can be processed: the glob matched nothing, or every shard is unusable."""

    exit_code = 4


class ConcurrentRunError(VlpipeError):
    """Another run changed this run's partition after this run started; nothing was committed."""

    exit_code = 5


class UnreachableError(VlpipeError):
    """Storage or the cluster cannot be reached, or refuses: ``<what> <where>: <cause>``."""

    exit_code = 6


class Interrupted(VlpipeError):
    """The run was stopped by SIGINT or SIGTERM."""

    exit_code = 130


SUCCEEDED, PARTIAL_EXIT = 0, 3


def exit_code_for(error: BaseException) -> int:
    """The exit code of a command that ended with ``error``."""
    if isinstance(error, KeyboardInterrupt):
        return Interrupted.exit_code
    return error.exit_code if isinstance(error, VlpipeError) else 1
