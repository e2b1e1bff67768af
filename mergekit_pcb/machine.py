"""What this machine's memory and cores allow: read from the OS, with a fallback where it
cannot say."""

from __future__ import annotations

import os
from pathlib import Path

_FALLBACK = 8 << 30  # when the OS does not say: a modest laptop's memory


def physical_memory() -> int:
    """Bytes of RAM installed: the base of budgets held for a whole run."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return _FALLBACK


def available_memory() -> int:
    """Bytes the kernel could hand out now without swapping (MemAvailable): the base of a
    decision taken once, at the start of a run."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return physical_memory() // 2


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


__all__ = ["available_memory", "physical_memory", "usable_cores"]


def numeric_environment(device: str = "cpu") -> dict[str, str]:
    """What a float result depends on besides the inputs and the seed: torch's version, its
    BLAS and LAPACK, the device. An SVD (the spectral merges) differs across LAPACK builds
    and devices within rounding, so outputs record these beside the recipe."""
    import re

    import torch

    config = torch.__config__.show()

    def setting(key: str) -> str:
        found = re.search(rf"\b{key}=([^,\s]+)", config)
        return found.group(1) if found else "unknown"

    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        shown = f"{device} ({torch.cuda.get_device_name(index)})"
    else:
        shown = device
    return {"torch": torch.__version__, "blas": setting("BLAS_INFO"),
            "lapack": setting("LAPACK_INFO"), "device": shown}
