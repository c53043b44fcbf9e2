"""The daemon's private runtime directory: where its ipc:// sockets live (nothing listens on TCP).

A fresh directory of mode 0700 is made for each engine, inside ``$RUNTIME_DIRECTORY`` when systemd
sets it (``RuntimeDirectory=`` in the unit; systemd also removes that one when the service stops,
so even a SIGKILLed daemon leaves nothing behind), else inside ``$XDG_RUNTIME_DIR`` (per-user,
tmpfs) or the system temporary directory. It is removed on :meth:`RuntimeDir.cleanup`, when the
object is collected, or at interpreter exit, whichever comes first.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import weakref
from pathlib import Path

# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107


def _usable_dir(path: str | None) -> str | None:
    if path and os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK):
        return path
    return None


def default_parent() -> str:
    """Where runtime directories are made, read from the environment once per call."""
    # systemd may list several directories separated by ':'; the first is this service's own.
    systemd_dir = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return (
        _usable_dir(systemd_dir)
        or _usable_dir(os.environ.get("XDG_RUNTIME_DIR"))
        or tempfile.gettempdir()
    )


class RuntimeDir:
    """A private directory for one engine's sockets. Use as a context manager or call cleanup()."""

    def __init__(self, parent: str | os.PathLike[str] | None = None, prefix: str = "pied-") -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=str(parent) if parent else default_parent()))
        # mkdtemp already uses 0700; make it explicit so a permissive umask or a future change to
        # mkdtemp can never expose the sockets to other users.
        os.chmod(self.path, stat.S_IRWXU)
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True)

    def socket(self, name: str) -> str:
        """The ``ipc://`` address of socket ``name`` in this directory."""
        path = self.path / f"{name}.sock"
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise OSError(
                f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes; "
                "set RUNTIME_DIRECTORY or XDG_RUNTIME_DIR to a shorter directory"
            )
        return f"ipc://{path}"

    @property
    def removed(self) -> bool:
        return not self._finalizer.alive

    def cleanup(self) -> None:
        """Remove the directory and everything in it (idempotent)."""
        self._finalizer()

    def __enter__(self) -> RuntimeDir:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"RuntimeDir({str(self.path)!r})"
