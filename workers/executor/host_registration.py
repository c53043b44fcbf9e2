"""CUDA registration of host segments (DESIGN.md "Host memory hygiene", "Loads on CUDA").

Each segment is registered once, when the executor maps it, with ``cudaHostRegisterPortable |
cudaHostRegisterMapped`` on the executor's device: page-locked, so the copy engine's copies are
truly asynchronous DMA, and mapped into the device's address space, so a kernel can read it through
a list of page addresses (``workers.executor.triton_host_pages``). It is unregistered before it is
unmapped. Segments are large on CUDA (``workers.memory.host_plan.CUDA_SEGMENT_BYTES``): each
registration pins and maps every page, so few large calls beat many small ones.

Page-locking counts against ``RLIMIT_MEMLOCK``. Rather than refuse to start when the soft limit looks
too small (root and CAP_IPC_LOCK ignore it; the hard limit may be higher), the executor raises the
soft limit to the hard one and tries: a registration that fails is a warning, once, and that segment
stays pageable — the copy engine still moves it, synchronously and slower. The CUDA runtime is
injected (``cudart``), so the logic runs on CPU in the tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import resource
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from workers.memory.host_pool import HostSegment

logger = logging.getLogger(__name__)

CUDA_HOST_REGISTER_PORTABLE = 0x01  # registered for every CUDA context, not only the current one
CUDA_HOST_REGISTER_MAPPED = 0x02  # and mapped into the device's address space
REGISTER_FLAGS = CUDA_HOST_REGISTER_PORTABLE | CUDA_HOST_REGISTER_MAPPED


class CudaRuntime(Protocol):
    """The calls of ``torch.cuda.cudart()`` used here (each returns a cudaError_t; 0 is success)."""

    def cudaHostRegister(self, pointer: int, size: int, flags: int) -> Any: ...  # noqa: N802

    def cudaHostUnregister(self, pointer: int) -> Any: ...  # noqa: N802


def raise_memlock_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_MEMLOCK to the hard one (allowed without privileges); returns the
    (soft, hard) limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # a sandbox may refuse even that: registration will tell
            pass
    return soft, hard


def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's last error after a failed registration, so the next kernel launch
    check does not report it. Best effort: through the libcudart torch already loaded."""
    for name in ("libcudart.so.12", "libcudart.so.13", "libcudart.so"):
        try:
            ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_LAZY).cudaGetLastError()
            return
        except (OSError, AttributeError):
            continue


def _limit_text(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else f"{limit / (1 << 30):.3f} GiB"


class HostRegistrar:
    """Registers host segments with CUDA once each; tracks which are registered."""

    def __init__(self, device: torch.device, cudart: CudaRuntime | None = None) -> None:
        """``cudart``: the CUDA runtime (default: ``torch.cuda.cudart()``; tests inject a fake)."""
        self.device = device
        self.cudart = cudart if cudart is not None else torch.cuda.cudart()
        self._clear_error = _clear_cuda_error if cudart is None else (lambda: None)
        self.memlock_soft, self.memlock_hard = raise_memlock_limit()
        self._registered: dict[int, int] = {}  # id(segment) -> registered address
        self.num_failed = 0

    @contextlib.contextmanager
    def _on_device(self) -> Iterator[None]:
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                yield
        else:
            yield

    def register(self, segment: HostSegment) -> bool:
        """Page-lock and device-map ``segment``; False (and a warning, the first time) if CUDA refused."""
        if id(segment) in self._registered:
            return True
        address, size = segment.address, segment.num_bytes
        with self._on_device():
            status = int(self.cudart.cudaHostRegister(address, size, REGISTER_FLAGS))
        if status != 0:
            self._clear_error()
            if not self.num_failed:
                logger.warning(
                    "cudaHostRegister failed (error %d) for host segment %d (%d MiB; memlock limit %s, hard %s): "
                    "host KV stays pageable and is copied synchronously, which is slower. Raise the memlock "
                    "limit (LimitMEMLOCK=infinity in the unit, or ulimit -l) or lower --host-kv-gib.",
                    status,
                    segment.info.segment_id,
                    size >> 20,
                    _limit_text(self.memlock_soft),
                    _limit_text(self.memlock_hard),
                )
            self.num_failed += 1
            return False
        self._registered[id(segment)] = address
        return True

    def is_registered(self, segment: HostSegment) -> bool:
        return id(segment) in self._registered

    def unregister(self, segment: HostSegment) -> None:
        """Before unmapping: CUDA must let go of the pages first. A no-op for an unregistered segment."""
        address = self._registered.pop(id(segment), None)
        if address is None:
            return
        with self._on_device():
            status = int(self.cudart.cudaHostUnregister(address))
        if status != 0:
            self._clear_error()
            logger.warning("cudaHostUnregister failed (error %d) for host segment %d", status, segment.info.segment_id)
