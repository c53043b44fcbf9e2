"""Process hardening applied by every pied process that holds secrets or host KV: the daemon (the
API key, every prompt) and each worker (weights, the host KV segments, prompts in flight).

Not dumpable (``prctl(PR_SET_DUMPABLE, 0)``): no core dump, and no other process of the same user
without CAP_SYS_PTRACE can ptrace it or open its ``/proc/<pid>/fd``, ``mem``, ``environ`` or
``maps``. Nothing of pied needs those any more: host segments' descriptors travel over a Unix
socket (:mod:`workers.fd_channel`). The core size limit goes to 0 as well, in case the kernel's
``fs.suid_dumpable`` would dump a non-dumpable process anyway.

``PIED_DUMPABLE=1`` (read once, at start) keeps a process dumpable: for a debugger or ``py-spy``
attached as the service user, and for tests that inspect workers' ``/proc`` without
CAP_SYS_PTRACE. Only a new ``execve`` resets the flag, so each worker process sets it itself.
"""

from __future__ import annotations

import ctypes
import os
import resource

DUMPABLE_ENV = "PIED_DUMPABLE"
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4


def _prctl(option: int, value: int = 0) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl({option}): {os.strerror(error)}")
    return int(result)


def is_dumpable() -> bool:
    return _prctl(PR_GET_DUMPABLE) != 0


def make_non_dumpable() -> bool:
    """Make this process non-dumpable and its core limit 0, unless ``PIED_DUMPABLE=1``; returns
    whether it did."""
    if os.environ.get(DUMPABLE_ENV) == "1":
        return False
    _, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    _prctl(PR_SET_DUMPABLE, 0)
    return True
