"""memory.py: a process's peak, the machine's total and free memory, and one window's peak, on CPU."""

from __future__ import annotations

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


def test_the_process_peak_is_the_high_water_mark_and_keeps_a_freed_allocation():
    block = torch.ones(300 * 2**20, dtype=torch.uint8)  # 300 MiB resident...
    block.add_(1)
    during = _status("VmRSS:")
    del block  # ...then freed
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
    big = torch.ones(500 * 2**20, dtype=torch.uint8)  # an earlier, larger peak of the process
    big.add_(1)
    del big
    window = PeakMemory("cpu")
    start = window.peak
    block = torch.ones(200 * 2**20, dtype=torch.uint8)
    block.add_(1)
    time.sleep(0.1)  # the sampler reads every 10 ms
    del block
    seen = window.stop()
    assert seen["kind"] == "cpu peak RSS" and seen["total_bytes"] == total_bytes("cpu")
    assert seen["peak_bytes"] - start >= 150 * 2**20  # the block, seen by the sampler
    assert seen["peak_bytes"] < peak_bytes("cpu")  # not the process's earlier, larger peak
