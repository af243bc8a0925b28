"""memory.py: a process's peak, the machine's total and free memory, and one window's peak, on CPU."""

from __future__ import annotations

import mmap
import time
from pathlib import Path

import pytest
import torch

from qlora_llm.memory import PeakMemory, available_bytes, peak_bytes, total_bytes


def _meminfo(key: str) -> int:
    line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith(key))
    return int(line.split()[1]) * 1024


def _status(key: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
    return int(line.split()[1]) * 1024


def _resident(mib: int) -> mmap.mmap:
    """`mib` MiB made resident in pages of their own, returned to the kernel on close().

    Not a torch tensor: after a long test session the allocator may serve it from memory it already
    holds (RSS does not grow) and keep it when freed (RSS does not fall), which the full suite hit.
    """
    block = mmap.mmap(-1, mib * 2**20)
    torch.frombuffer(block, dtype=torch.uint8).fill_(1)  # every page touched, no copy made
    return block


def test_the_process_peak_is_the_high_water_mark_and_keeps_a_freed_allocation():
    block = _resident(300)  # 300 MiB resident...
    during = _status("VmRSS:")
    block.close()  # ...then freed
    assert peak_bytes("cpu") == _status("VmHWM:")
    # The kernel folds per-thread RSS counters in lazily: the mark may trail by a few pages.
    assert peak_bytes("cpu") >= during - 4 * 2**20
    assert _status("VmRSS:") < during - 250 * 2**20  # freed, yet still the peak


def test_total_and_available_are_the_kernels_figures():
    assert total_bytes("cpu") == _meminfo("MemTotal:")
    # MemAvailable moves with every other process: within 5% of a fresh read.
    assert available_bytes("cpu") == pytest.approx(_meminfo("MemAvailable:"), rel=0.05)
    assert available_bytes("cuda") is None  # only RAM is shared with other processes


def test_a_window_sees_its_own_transient_peak_not_the_process_peak():
    _resident(500).close()  # an earlier, larger peak of the process
    window = PeakMemory("cpu")
    start = window.peak
    block = _resident(200)
    time.sleep(0.1)  # the sampler reads every 10 ms
    block.close()
    seen = window.stop()
    assert seen["kind"] == "cpu peak RSS" and seen["total_bytes"] == total_bytes("cpu")
    assert seen["peak_bytes"] - start >= 150 * 2**20  # the block, seen by the sampler
    assert seen["peak_bytes"] < peak_bytes("cpu")  # not the process's earlier, larger peak
