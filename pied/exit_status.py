"""The exit status of ``pied``: 2 for a configuration or model-folder error (no restart can fix it;
systemd's ``RestartPreventExitStatus=2``), 1 for a failure at run time (worth a restart).

The type of the error decides: ``ConfigError`` and ``ModelFolderError`` mean 2. The commands raise
them only from their configuration phase; past it, :func:`run_time` wraps any error, those two and
any ValueError included, as a :class:`RunTimeFailure`, which means 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

EXIT_OK = 0
EXIT_RUNTIME_FAILURE = 1
EXIT_CONFIG_ERROR = 2


class RunTimeFailure(Exception):
    """An error raised after the configuration was checked (its ``__cause__``)."""


@contextlib.contextmanager
def run_time() -> Iterator[None]:
    """Mark what runs inside as run time: any error leaving it is a RunTimeFailure."""
    try:
        yield
    except Exception as error:
        raise RunTimeFailure(str(error) or type(error).__name__) from error
