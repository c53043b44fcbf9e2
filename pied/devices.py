"""Which accelerator the engine runs on, decided in the daemon without loading torch.

``--device auto`` means CUDA when the driver shows this process a device (``CUDA_VISIBLE_DEVICES``
honoured), else CPU; ``$PIED_DEVICE`` overrides ``auto``. The daemon asks the CUDA driver
(``libcuda``) directly: ``cuInit`` and ``cuDeviceGetCount`` create no context and take
milliseconds, where importing torch to ask it takes seconds and hundreds of MiB in the frontend.
"""

from __future__ import annotations

import ctypes
import functools
import os

from proto.config import ConfigError


@functools.lru_cache(maxsize=1)
def num_cuda_devices() -> int:
    """CUDA devices visible to this process (0 without a driver)."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def resolve_device(device: str, num_devices: int | None = None) -> str:
    """``device`` (auto, cpu, cuda, cuda:N) as the workers will use it; ConfigError when it is
    not there. ``num_devices`` defaults to what the driver reports."""
    if device == "auto":
        device = os.environ.get("PIED_DEVICE", "").strip() or "auto"
        if device == "auto":
            return "cuda" if (num_cuda_devices() if num_devices is None else num_devices) else "cpu"
    if device == "cpu":
        return device
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ConfigError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N.")
    available = num_cuda_devices() if num_devices is None else num_devices
    if available == 0:
        raise ConfigError(
            f"--device {device}: no CUDA device is visible (no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides them); "
            "use --device cpu."
        )
    if index and int(index) >= available:
        raise ConfigError(f"--device {device}: only {available} CUDA device(s) are visible (cuda:0 .. cuda:{available - 1}).")
    return device
