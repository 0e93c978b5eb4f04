"""Give freed heap memory back to the operating system after a model is unloaded."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache


@cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """glibc keeps freed arenas mapped; ``malloc_trim(0)`` returns them so RSS reflects
    that a model was really unloaded."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024


@cache
def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> None:
    """Serve every allocation of ``threshold`` bytes or more with its own mmap.

    glibc raises its mmap threshold each time a large mmapped block is freed, so after the
    first unload a model's buffers land in the heap, where they stay mapped after the next
    unload: RSS would grow by a model's size instead of returning to where it was. A fixed
    threshold turns that dynamic behaviour off. Buffers this large are mostly model weights and
    artefacts; a request tensor of 4 MiB or more pays one mmap/munmap pair, which is small next
    to the inference that reads or produces it."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)


def available_memory_bytes() -> int | None:
    """RAM a new model can still take: the kernel's MemAvailable, lowered to what is left under
    this process's cgroup limit (containers); None where neither can be read."""
    found: list[int] = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
                found.append(max(0, int(limit) - int(f.read().strip())))
    except (OSError, ValueError):
        pass
    return min(found) if found else None
