"""Memory, measured one way everywhere: a process's peak, a device's total, what is free now.

On CUDA the allocator's own counters; on CPU the kernel's (VmHWM, MemTotal, MemAvailable). Training
reports the whole process's peak (`peak_bytes`); an evaluation measures one model's window, which the
kernel's high-water mark cannot (it only grows), so `PeakMemory` samples the resident size instead.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any


def peak_bytes(device: str) -> int:
    """The process's peak so far: CUDA's peak allocated bytes, or the peak RSS (VmHWM)."""
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    # The peak, not the moment's RSS, which misses the loss's transients and the loading of the weights.
    # VmHWM, not getrusage's ru_maxrss: Linux carries the forked parent's RSS into ru_maxrss across exec
    # (a 3 GiB test runner made a 1.3 GiB run read 3.3 GiB), while VmHWM belongs to this program's own
    # memory map.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def total_bytes(device: str) -> int | None:
    """The device's memory: GPU 0's, or the machine's RAM; None where neither can be read."""
    if device == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:  # psutil comes with accelerate, but is not a direct dependency
        return _meminfo("MemTotal:")


def available_bytes(device: str) -> int | None:
    """RAM available now (MemAvailable), on CPU: other processes' memory is not ours to plan with."""
    if device != "cpu":
        return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return _meminfo("MemAvailable:")


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:  # not Linux
        pass
    return None


class PeakMemory:
    """The peak memory of one window (one model's evaluation): CUDA's own peak counter, or on CPU the
    largest resident size a sampling thread sees (every 10 ms).

    Not by resetting the kernel's high-water mark (/proc/self/clear_refs): that also erases the whole
    process's peak, which `/usr/bin/time` and rusage then under-report.
    """

    def __init__(self, device: str):
        self.device = device
        self._stop = threading.Event()
        if device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
            return
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self._thread.start()

    @staticmethod
    def _rss() -> int:
        import psutil

        return int(psutil.Process().memory_info().rss)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    def stop(self) -> dict[str, Any]:
        """CUDA: allocated and peak allocated vs total; CPU: the peak RSS vs total RAM."""
        if self.device == "cuda":
            import torch

            return {
                "kind": "cuda",
                "allocated_bytes": torch.cuda.memory_allocated(),
                "peak_bytes": torch.cuda.max_memory_allocated(),
                "total_bytes": total_bytes("cuda"),
            }
        self._stop.set()
        self._thread.join()
        return {
            "kind": "cpu peak RSS",
            "peak_bytes": max(self.peak, self._rss()),
            "total_bytes": total_bytes("cpu"),
        }
