"""Run the model-heavy commands under mimalloc instead of glibc's malloc (Linux).

Why: PyTorch allocates every CPU tensor with posix_memalign(64). glibc before 2.38 (Debian 12, Ubuntu
22.04) seldom reuses the holes such blocks leave, so during a forward pass the heap grows by about the
size of each layer's temporaries although almost none of them is alive. Measured here on SmolLM2-135M,
NF4 QLoRA, batch 4 x 384 tokens, one forward and backward: peak RSS 4.9 GiB under glibc, 2.6 GiB under
mimalloc, at about the same speed (glibc's heap held 2.4 GiB free and 0.3 GiB in use after the forward).
Forcing glibc to mmap large blocks instead also fixes the memory but made each step ~1.8x slower here.

Only a preloaded allocator replaces malloc, so the CLI re-executes itself once with LD_PRELOAD set, as
PyTorch's own CPU launcher (`torch.backends.xeon.run_cpu`) does with jemalloc or tcmalloc.
`QLORA_LLM_ALLOCATOR=system` keeps glibc's malloc.

The same commands bound oneDNN's kernel caches (`bound_kernel_caches`). A bf16 matmul on CPU runs a
oneDNN kernel built for its exact shapes, and oneDNN and PyTorch's ideep layer each keep up to 1024 of
them (~2 MB each with their buffers). Batches padded to their longest row have a new length nearly every
step, so the caches grow all run: the demo's training climbed 16 MB a step, 0.6 GiB over its 40 steps,
above a run of fixed-length batches. 256 entries hold every shape one step uses (its layers share them):
the demo's training peak fell from 3.30 to 2.88 GiB at the same speed (150 vs 155 s) and with a
byte-identical adapter (a kernel built again computes the same thing).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

ENV = "QLORA_LLM_ALLOCATOR"


def mimalloc_library() -> Path | None:
    """The libmimalloc.so shipped by the `cmeel-mimalloc` wheel, or None where it is not installed."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        dist = importlib.metadata.distribution("cmeel-mimalloc")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name == "libmimalloc.so":
            path = Path(str(dist.locate_file(f)))
            return path if path.is_file() else None
    return None


def preload_env(env: Mapping[str, str]) -> dict[str, str] | None:
    """`env` with mimalloc preloaded, or None when the process should keep the allocator it has.

    None when `QLORA_LLM_ALLOCATOR` is already set (this is the re-executed process, or the user chose
    `system`) or mimalloc is not available.
    """
    if env.get(ENV):
        return None
    lib = mimalloc_library()
    if lib is None:
        return None
    preload = " ".join(x for x in (str(lib), env.get("LD_PRELOAD", "")) if x)
    return {**env, "LD_PRELOAD": preload, ENV: "mimalloc"}


KERNEL_CACHE_CAPACITY = "256"
KERNEL_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
"""oneDNN's primitive cache and ideep's (PyTorch's oneDNN layer) cache of them; read once, at first use."""


def bound_kernel_caches(env: MutableMapping[str, str] | None = None) -> None:
    """Cap oneDNN's kernel caches at 256 entries unless the user set them; before torch's first matmul."""
    env = os.environ if env is None else env
    for name in KERNEL_CACHES:
        env.setdefault(name, KERNEL_CACHE_CAPACITY)


def release_free_memory() -> None:
    """Hand the allocator's free pages back to the system: after a model is dropped, before the next loads
    (self-replay's base model, before training loads its own).

    mimalloc keeps freed pages for reuse by the same sizes, and the next model allocates others. Measured
    when evaluate scored the base and then the fine-tuned model in one process: the fine-tuned model's
    peak 2.46 GiB without this call after the base, 2.32 and 2.36 with it. Inside `make demo`'s `run` it
    did not show (2.65 GiB before, 2.64 with it): most of what stays is free pages of other threads
    (OpenMP's workers), which mi_collect from this thread does not reach, so evaluate now scores the base
    in a process of its own (apart.py; docs/plan.md).
    """
    import ctypes

    if active_allocator() == "mimalloc":
        ctypes.CDLL(None).mi_collect(True)  # force: also the pages of threads that have exited
    elif sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)  # glibc's heap; absent from other C libraries
        except AttributeError:
            pass


def active_allocator() -> str:
    """'mimalloc' when it is mapped into this process (Linux), else 'system'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "mimalloc" if "libmimalloc" in maps else "system"
