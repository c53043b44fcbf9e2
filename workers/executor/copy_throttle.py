"""Tests and benchmarks only: a cap on the CPU copy thread's bandwidth, to make stalls on purpose.

On the CPU there is no link to share, so a slower link, or a second tenant taking part of it, is
emulated by throttling the copy thread (``ThreadCopyEngine``). Two ways to set it, both read by the
executor only:

- fixed for the run: ``copy_throttle_bytes_per_s`` in the config's ``extra``, else
  ``$PIED_COPY_THROTTLE_BYTES_PER_S`` (read once, at start);
- changeable while the engine runs: ``copy_throttle_file`` in ``extra``, else
  ``$PIED_COPY_THROTTLE_FILE``, names a file holding bytes/s. The executor looks at it between
  steps (one ``stat``) and re-reads it when it changed, so a benchmark or a test can cut the link to
  a quarter halfway through a stream. An absent or empty file means no throttle; a file, when
  named, wins over the fixed value. Write it atomically (``os.replace``), so a step never reads
  half a number. Under tensor parallelism a ``{rank}`` in the file's name is the rank's number, so
  a test can cut one rank's link and not the others' (the controller steers by the slowest rank).

Not a production setting: the daemon's CLI has no flag for it.
"""

from __future__ import annotations

import os
from pathlib import Path

from proto.config import ConfigError, EngineConfig

COPY_THROTTLE_ENV = "PIED_COPY_THROTTLE_BYTES_PER_S"
COPY_THROTTLE_FILE_ENV = "PIED_COPY_THROTTLE_FILE"
COPY_THROTTLE_KEY = "copy_throttle_bytes_per_s"
COPY_THROTTLE_FILE_KEY = "copy_throttle_file"


def parse_throttle(value: object, where: str) -> float | None:
    """Bytes/s from ``value`` (None or empty: no throttle); anything but a positive number is an
    error naming ``where`` it came from."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        throttle = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        throttle = -1.0
    if not throttle > 0 or throttle == float("inf"):
        raise ConfigError(
            f"{where}: the copy throttle must be a positive number of bytes per second, got {value!r}."
        )
    return throttle


class CopyThrottle:
    """The throttle in force: ``bytes_per_s`` (None: none), re-read from ``path`` when it changes."""

    def __init__(self, bytes_per_s: float | None = None, path: str | Path | None = None) -> None:
        self.bytes_per_s = bytes_per_s
        self.path = Path(path) if path else None
        self._seen: tuple[int, int, int] | None = None  # (inode, mtime_ns, size) last read
        if self.path is not None:
            self.poll()

    @classmethod
    def from_config(cls, config: EngineConfig, rank: int = 0) -> CopyThrottle:
        """The throttle ``config`` (or the environment) asks for, for tensor-parallel rank ``rank``."""
        fixed = config.extra.get(COPY_THROTTLE_KEY, os.environ.get(COPY_THROTTLE_ENV))
        path = config.extra.get(COPY_THROTTLE_FILE_KEY, os.environ.get(COPY_THROTTLE_FILE_ENV))
        path = str(path).replace("{rank}", str(rank)) if path else None
        return cls(parse_throttle(fixed, COPY_THROTTLE_KEY), path)

    def poll(self) -> bool:
        """Re-read the file if it changed since the last look; whether ``bytes_per_s`` changed."""
        if self.path is None:
            return False
        try:
            stat = self.path.stat()
            seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            seen = None
        if seen == self._seen and self._seen is not None:
            return False
        self._seen = seen
        text = self.path.read_text() if seen is not None else ""
        throttle = parse_throttle(text, str(self.path))
        changed = throttle != self.bytes_per_s
        self.bytes_per_s = throttle
        return changed
