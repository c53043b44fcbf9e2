"""Progress bars show on a terminal and stay quiet elsewhere (model loading uses them)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from tiny_models import build_model_dir

from workers.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_draws_on_a_terminal_and_stays_quiet_elsewhere():
    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        with Progress(4, "loading", stream=stream) as bar:
            for _ in range(4):
                bar.update()
    assert terminal.getvalue().endswith("loading [" + "#" * 30 + "] 4/4\n")
    assert pipe.getvalue() == ""


def test_model_loading_shows_progress_only_on_a_terminal(tmp_path):
    import pty

    model_dir = build_model_dir(tmp_path, "llama")
    code = (
        "from proto.config import EngineConfig; from workers.executor.runner import ModelRunner; "
        f"ModelRunner(EngineConfig(model={str(model_dir)!r}, device_kv_blocks=8))"
    )
    piped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert "loading" not in piped.stderr
    # The same on a pseudo-terminal draws the bar.
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-c", code])
    output = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    os.waitpid(pid, 0)
    assert f"loading {model_dir.name} [".encode() in output
