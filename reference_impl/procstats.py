"""What the server process holds right now, read cheaply from ``/proc``."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import threading

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


def rss_mib(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/statm", "rb") as fh:
        return int(fh.read().split()[1]) * PAGE_BYTES / MIB


def hwm_mib(pid: int | str = "self") -> float:
    """The kernel's own high-water mark of the process's RSS (VmHWM)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc status")


def open_files(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def snapshot() -> dict[str, float | int]:
    return {
        "rssMib": round(rss_mib(), 2),
        "hwmMib": round(hwm_mib(), 2),
        "threads": threading.active_count(),
        "openFiles": open_files(),
    }


@functools.cache
def _libc() -> ctypes.CDLL | None:
    # find_library runs ldconfig in a child process: look it up once.
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def malloc_trim() -> bool:
    """Ask glibc to hand freed heap memory back to the kernel; False off glibc."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True


def release(collect: bool, trim: bool) -> dict[str, float | bool]:
    """RSS as is, after ``gc.collect()`` and after ``malloc_trim(0)``."""
    out: dict[str, float | bool] = {"asIsMib": round(rss_mib(), 2)}
    if collect:
        gc.collect()
        out["afterGcMib"] = round(rss_mib(), 2)
    if trim:
        out["trimmed"] = malloc_trim()
        out["afterTrimMib"] = round(rss_mib(), 2)
    return out
