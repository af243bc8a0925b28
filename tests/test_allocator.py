"""The model commands re-execute themselves under mimalloc (glibc's heap fragments under PyTorch)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_llm.allocator import ENV, KERNEL_CACHES, bound_kernel_caches, mimalloc_library, preload_env
from qlora_llm.cli import main

pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
    reason="cmeel-mimalloc is a dependency on Linux x86_64 only",
)
CLI = Path(sys.executable).parent / "qlora-llm"


def test_mimalloc_ships_with_the_package():
    lib = mimalloc_library()
    assert lib is not None and lib.name == "libmimalloc.so" and lib.is_file()


def test_preload_env_adds_mimalloc_once_and_keeps_a_users_preload():
    env = preload_env({"PATH": "/bin", "LD_PRELOAD": "/opt/libmine.so"})
    assert env is not None
    assert env["LD_PRELOAD"] == f"{mimalloc_library()} /opt/libmine.so"
    assert env[ENV] == "mimalloc" and env["PATH"] == "/bin"
    assert preload_env(env) is None  # the re-executed process does not re-execute again
    assert preload_env({ENV: "system"}) is None


def _run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in (ENV, "LD_PRELOAD")}
    return subprocess.run(
        [str(CLI), *args], capture_output=True, text=True, timeout=120, env={**clean, **env}
    )


def test_a_model_command_runs_under_mimalloc_and_still_reports_its_errors(tmp_path):
    run = _run_cli("evaluate", str(tmp_path / "missing"))
    assert "memory allocator: mimalloc" in run.stderr
    # The re-executed process kept stderr and returns the command's own exit status and message.
    assert run.returncode == 1 and "error:" in run.stderr and "missing" in run.stderr


def test_the_system_allocator_can_be_kept(tmp_path):
    run = _run_cli("evaluate", str(tmp_path / "missing"), **{ENV: "system"})
    assert "memory allocator: system" in run.stderr and run.returncode == 1


def test_kernel_caches_are_bounded_unless_the_user_sized_them():
    env = {"LRU_CACHE_CAPACITY": "4096"}
    bound_kernel_caches(env)
    assert env == {"LRU_CACHE_CAPACITY": "4096", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "256"}


def test_a_model_command_bounds_the_kernel_caches_before_it_starts(monkeypatch, tmp_path):
    for name in KERNEL_CACHES:
        monkeypatch.delenv(name, raising=False)
    assert main(["evaluate", str(tmp_path / "missing")]) == 1
    assert [os.environ[name] for name in KERNEL_CACHES] == ["256", "256"]


# bf16 matmuls of 100 shapes (batches of 100..496 tokens), as padded batches give a training run.
SHAPES = """
import torch
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
w = torch.randn(1536, 576, dtype=torch.bfloat16, requires_grad=True)
start = rss()
for t in range(100, 500, 4):
    x = torch.randn(4 * t, 576, dtype=torch.bfloat16, requires_grad=True)
    torch.nn.functional.linear(x, w).sum().backward()
print(rss() - start)
"""


def _growth(**env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if k not in KERNEL_CACHES}
    lib = str(mimalloc_library())
    run = subprocess.run(
        [sys.executable, "-c", SHAPES],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, "LD_PRELOAD": lib, "OMP_NUM_THREADS": "1", **env},
    )
    assert run.returncode == 0, run.stderr
    return int(run.stdout)


@pytest.mark.slow
def test_bounded_kernel_caches_stop_the_growth_a_new_shape_each_step_causes():
    unbounded = _growth()
    if unbounded < 64 * 2**20:
        pytest.skip(f"this CPU's bf16 matmul keeps no per-shape kernels ({unbounded / 2**20:.0f} MiB grown)")
    bounded = _growth(**dict.fromkeys(KERNEL_CACHES, "8"))
    assert bounded < unbounded / 2, (bounded, unbounded)


# Tensors of many sizes (4-256 KB, ~350 MB in all) made and dropped in two threads and the main one: the
# allocator keeps the freed pages.
FREED = """
import threading
import torch
from qlora_llm.allocator import active_allocator, release_free_memory
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
def work():
    keep = [torch.ones(n) for n in range(1000, 64000, 23)]
    del keep
threads = [threading.Thread(target=work) for _ in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
work()
held = rss()
release_free_memory()
print(active_allocator(), held - rss())
"""


@pytest.mark.parametrize("allocator", ["mimalloc", "system"])
def test_release_free_memory_hands_freed_pages_back(allocator):
    """What evaluate calls between the base and the fine-tuned model: ~0.5 GB returned here on either."""
    clean = {k: v for k, v in os.environ.items() if k not in (ENV, "LD_PRELOAD")}
    preload = {"LD_PRELOAD": str(mimalloc_library())} if allocator == "mimalloc" else {}
    run = subprocess.run(
        [sys.executable, "-c", FREED], capture_output=True, text=True, timeout=120, env={**clean, **preload}
    )
    assert run.returncode == 0, run.stderr
    used, returned = run.stdout.split()
    assert used == allocator
    assert int(returned) > 200 * 2**20, f"{int(returned) / 2**20:.0f} MiB returned"
