"""Peak memory of this process, measured one way for the benchmarks and the trainer.

CPU: the resident-set high-water mark. ``ru_maxrss`` never goes down; on Linux
(>= 4.0) :func:`reset_peak_rss` rewinds the kernel's ``VmHWM`` to the current RSS, and
:func:`peak_rss_bytes` then reads ``VmHWM``, so a measurement can cover one phase only.
CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

__all__ = ["peak_memory_mb", "peak_rss_bytes", "reset_peak", "reset_peak_rss"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set of this process since it started or since :func:`reset_peak_rss`."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # KiB on Linux, bytes on macOS


def reset_peak_rss() -> bool:
    """Rewind the peak to the current RSS; False where the platform cannot (not Linux)."""
    try:
        _CLEAR_REFS.write_text("5")  # Linux >= 4.0: 5 resets VmHWM
    except OSError:
        return False
    return True


def reset_peak(device: torch.device) -> None:
    """Start a new peak: the CUDA allocator's on a GPU, the RSS high-water mark on CPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: CUDA allocator peak on a GPU, peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_bytes() / 2**20
