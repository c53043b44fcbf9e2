"""A progress bar for long work (model loading, benchmarks): drawn on a terminal, silent otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``with Progress(total, "loading weights") as bar: bar.update()`` — draws ``label [####....] 3/8``
    on ``stream`` (stderr) only when it is a terminal, at most ten times a second."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, width: int = 30) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.done = 0
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_draw = 0.0

    def update(self, count: int = 1) -> None:
        self.done = min(self.total, self.done + count)
        now = time.monotonic()
        if self.enabled and (now - self._last_draw >= 0.1 or self.done == self.total):
            self._last_draw = now
            self.stream.write("\r" + self.render())
            self.stream.flush()

    def render(self) -> str:
        filled = self.width * self.done // self.total
        return f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total}"

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
