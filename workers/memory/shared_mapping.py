"""A host segment's mapping in one process: shared, writable, holding no descriptor, and released
deterministically even if a stale tensor view of it survives (DESIGN.md "Host memory hygiene").

Not ``mmap.mmap``: it keeps a duplicate of the descriptor for as long as the mapping lives (a mapper
must hold no descriptor of a segment), and its ``close`` unmaps the range under any tensor view
still pointing into it, where a later allocation may land (silent corruption through the view).
Here :func:`map_shared` gives the buffer and a ``release``: the segment's pages are let go at once
(the memfd is freed when its last mapping and descriptor are), and the address range is kept,
inaccessible, until the last view is gone, so a stale view faults instead of reading another
allocation. The range is unmapped when the buffer's last view is collected.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import weakref
from collections.abc import Callable

# Linux's values on x86-64 and arm64 (the mmap module does not export them).
PROT_NONE = 0
MAP_FIXED = 0x10
MAP_NORESERVE = 0x4000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _mmap(address: int | None, size: int, prot: int, flags: int, fd: int) -> int:
    result = _libc.mmap(address, size, prot, flags, fd, 0)
    if result is None or result == _MAP_FAILED:
        error = ctypes.get_errno()
        raise OSError(error, f"mmap of {size} bytes of host KV failed: {os.strerror(error)}")
    return int(result)


def map_shared(fd: int, size: int) -> tuple[memoryview, Callable[[], None]]:
    """``(buffer, release)``: ``size`` bytes of ``fd`` mapped shared and writable (the caller may
    close ``fd`` at once), and the function that lets the pages go (see the module doc)."""
    address = _mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd)
    lock = threading.Lock()
    unmapped = [False]

    # NOTE: the two run on whichever threads drop the last view and close the segment: the lock
    # keeps release from mapping over a range that unmap already gave back (someone else's by then).
    def unmap() -> None:
        with lock:
            _libc.munmap(address, size)
            unmapped[0] = True

    def release() -> None:
        with lock:
            if not unmapped[0]:
                flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE
                _mmap(address, size, PROT_NONE, flags, -1)

    pages = (ctypes.c_char * size).from_address(address)
    weakref.finalize(pages, unmap)
    return memoryview(pages).cast("B"), release
