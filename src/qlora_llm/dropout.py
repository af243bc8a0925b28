"""LoRA dropout on a CPU with masks from a counter-based hash instead of PyTorch's generator.

PEFT applies `nn.Dropout` to the input of every LoRA layer: 7 projections x every decoder layer, twice a
step under gradient checkpointing (the recompute draws the same masks again). On a CPU, `nn.Dropout` draws
each mask element from PyTorch's Mersenne Twister one at a time, on one thread (~6 ns an element here):
`bench/profile_train.py` found `aten::bernoulli_` taking 26% (fp32) to 35% (bf16) of a checkpointed QLoRA
step of SmolLM2 at dropout 0.05, more than every matmul in bf16. No library offers a faster CPU dropout
(inductor's compiled dropout measured no faster), so the mask is computed here: the element's index mixed
with a 32-bit key by murmur3's finalizer, in whole-tensor int32 operations that run vectorized on every
thread, two elements from each 32-bit hash, compared with the keep probability to 1/65536, and the
mask made and applied as 0/1 in 2 bytes (bool tensors are slow on a CPU).

The key is drawn from PyTorch's own CPU generator for every mask, so everything that relies on that
generator still holds: `train.seed` decides the masks, a resumed run restores them with the RNG state, and
gradient checkpointing's recompute (which restores the generator before it) draws the same masks again.
CUDA tensors keep `nn.Dropout` (its generator is parallel there).

    swapped = use_hash_dropout(peft_model)   # every LoRA dropout of the model; the count
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import torch

GOLDEN = -1640531535  # 0x9E3779B1 as int32: spreads consecutive indices over the 32 bits
FMIX = ((16, -2048144789), (13, -1028477387), (16, None))  # murmur3 fmix32: 0x85EBCA6B, 0xC2B2AE35
RESOLUTION = 1 << 16

_indices = torch.empty(0, dtype=torch.int32)


def _index(n: int) -> torch.Tensor:
    """0..n-1, kept for the largest input seen (half the MLP's down projection: 4 bytes a hash)."""
    global _indices
    if _indices.numel() < n:
        _indices = torch.arange(n, dtype=torch.int32)
    return _indices[:n]


def keep_mask(n: int, key: int, p: float, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """n values in `dtype`: 1 where an element is kept, 0 where it is dropped (each dropped with
    probability `p`, to 1/65536), a function of (index, key) alone.

    Each 32-bit hash gives two elements, its two 16-bit halves (read as int16; kept below the threshold):
    half the integer work of one hash an element. The mask is made by integer arithmetic and applied by a
    multiply: on a CPU, comparisons that make a bool tensor, its cast and `masked_fill` with it each cost
    ~4-6x a multiply of the same size (measured: 122, 231 and 384 us against 62 us for 4 x 240 x 576
    elements in bf16).
    """
    threshold = _threshold(p)
    if threshold >= RESOLUTION // 2:
        return torch.ones(n, dtype=dtype)
    h = torch.mul(_index((n + 1) // 2), GOLDEN).bitwise_xor_(key)
    for shift, multiplier in FMIX:
        # Logical shifts: torch's >> on int32 is arithmetic, so the sign bits it copies in are masked off.
        h.bitwise_xor_((h >> shift).bitwise_and_((1 << (32 - shift)) - 1))
        if multiplier is not None:
            h.mul_(multiplier)
    # half - threshold is negative exactly where the element is kept: its sign bit, shifted down, is -1.
    kept = h.view(torch.int16)[:n].to(torch.int32).sub_(threshold).bitwise_right_shift_(31).neg_()
    return kept.to(dtype)


def _threshold(p: float) -> int:
    """The int16 half below which an element is kept: keep probability 1 - p, to 1/65536."""
    return round((1 - p) * RESOLUTION) - RESOLUTION // 2


def _hash_dropout(x: torch.Tensor, key: torch.Tensor, threshold: torch.Tensor, scale: float) -> torch.Tensor:
    """`x * keep_mask(...) / (1 - p)` written for torch.compile: inductor fuses the index, the hash, the
    comparison and the multiply into one C++ loop, and the backward recomputes the mask from the key
    instead of keeping it. The same masks as `keep_mask`, bit for bit (tested). `key` and `threshold` are
    int32 tensors: dynamo would make a float p symbolic, and the threshold's rounding with it."""
    index = torch.arange(x.numel(), dtype=torch.int32, device=x.device)
    # Element i takes half of hash i // 2: the low 16 bits for even i, the high ones for odd i (keep_mask's
    # int16 view), read as int16. Each hash is computed twice, but in one vectorized loop with no buffer.
    h = (index >> 1).mul(GOLDEN).bitwise_xor(key)
    for shift, multiplier in FMIX:
        h = h.bitwise_xor((h >> shift).bitwise_and((1 << (32 - shift)) - 1))
        if multiplier is not None:
            h = h.mul(multiplier)
    half = torch.where((index & 1) == 0, h, h >> 16).bitwise_and(0xFFFF)
    half = half - ((half & 0x8000) << 1)
    return torch.where(half < threshold, x * scale, 0)


class _CompiledDropout(torch.autograd.Function):
    """The compiled masks in both directions: the backward applies the same mask, from the same key, to the
    gradient, so nothing of the mask is kept (AOTAutograd's partitioner would keep it as a bool)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, key: torch.Tensor, threshold: torch.Tensor, scale: float
    ) -> torch.Tensor:
        ctx.save_for_backward(key, threshold)
        ctx.scale = scale
        return _apply_compiled(x, key, threshold, scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        key, threshold = ctx.saved_tensors
        return _apply_compiled(grad, key, threshold, ctx.scale), None, None, None


def _apply_compiled(
    x: torch.Tensor, key: torch.Tensor, threshold: torch.Tensor, scale: float
) -> torch.Tensor:
    """One compiled graph per dtype: dynamo guards on rank, strides, requires_grad and autocast, so the
    input is given flat, contiguous, detached and outside autocast, as in every call."""
    with torch.autocast("cpu", enabled=False):
        return _compiled(x.detach().contiguous().view(-1), key, threshold, scale).view(x.shape)


def _int32(value: int) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int32)


_compiled: Any = None
"""torch.compile'd `_hash_dropout` once `fuse_hash_dropout` chose it; None: the eager masks."""
_compiled_once: Any = None
"""The one torch.compile wrapper: dynamo keeps its graphs per function, so a process compiles once per
dtype; the inputs are flattened so every shape is one graph (fullgraph=False: past dynamo's recompile
limit it runs the function eagerly, the same masks)."""


def _eager_dropout(x: torch.Tensor, key: int, p: float) -> torch.Tensor:
    """x with `keep_mask`'s mask applied and scaled, in whole-tensor torch ops."""
    # 0/1 in 2 bytes (exact) even for an fp32 x: autograd keeps the mask for the backward, not x. The
    # scale is applied apart: folded into a bf16 mask, 1/0.95 would round to 1.0547.
    mask = keep_mask(x.numel(), key, p, x.dtype if x.element_size() <= 2 else torch.bfloat16)
    return (x * mask.view(x.shape)).mul_(1 / (1 - p))


class HashDropout(torch.nn.Module):
    """`nn.Dropout(p)` whose CPU masks come from `keep_mask`; the same module otherwise (p, train/eval)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or x.numel() >= 2**31:
            return torch.nn.functional.dropout(x, self.p, self.training)
        key = torch.randint(-(2**31), 2**31 - 1, (), dtype=torch.int64)
        if _compiled is not None:
            return _CompiledDropout.apply(
                x, key.to(torch.int32), _int32(_threshold(self.p)), 1 / (1 - self.p)
            )
        return _eager_dropout(x, int(key), self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_hash_dropout(model: Any) -> int:
    """Replace every LoRA dropout of a PEFT model (`lora_dropout[adapter]`, an `nn.Dropout`) by a
    HashDropout with its p; the number replaced (0 where dropout is 0: PEFT puts an Identity there)."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, layer in dropouts.items():
            if type(layer) is torch.nn.Dropout:
                dropouts[name] = HashDropout(layer.p)
                swapped += 1
    return swapped


COMPILE_PAYS_AFTER_S = 10.0
"""Compile the masks only when the run would spend longer than this drawing them eagerly: compiling took
2-5 s (inductor's disk cache warm) to 13 s (cold) on 2 cores, once a process, and in isolation the
compiled masks took a quarter to a half of the eager time: from 10 s on compiling can pay. Whether it
does is then measured (a whole step gained little on a CPU with AMX: docs/train.md)."""


def lora_input_dtypes(compute: torch.dtype, upcast: bool) -> tuple[torch.dtype, ...]:
    """The dtypes LoRA inputs come in: the residual stream's (fp32 on an upcast 4-bit base) and the compute
    dtype (o_proj's input is attention's output)."""
    return tuple(dict.fromkeys([compute, torch.float32 if upcast else compute]))


def mask_draws(dropouts: int, steps: int, accumulation: int, checkpointed: bool) -> int:
    """Masks a run draws: every LoRA dropout in every micro-batch, twice under checkpointing (the recompute)."""
    return dropouts * steps * accumulation * (2 if checkpointed else 1)


TIMED_ELEMENTS = 1 << 22
"""The most elements a mask is timed on (4M, ~10 ms eager here); a larger one's time is scaled from it
(elementwise work: linear in the elements), so `plan` never allocates what an absurd batch would."""


@functools.lru_cache(maxsize=16)
def eager_mask_seconds(p: float, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> float:
    """One eager mask at `shape`, forward and backward, in seconds (the best of 3, averaged over `dtypes`).

    Cached, so `plan` inside `train` and the run it plans decide the same way on the same timing."""
    inputs, scale = _timing_inputs(shape, dtypes)
    return scale * min(_timed(lambda x: _eager_dropout(x, 0, p), inputs) for _ in range(3))


def _timing_inputs(
    shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]
) -> tuple[list[torch.Tensor], float]:
    """Flat inputs of at most TIMED_ELEMENTS, and what their times are multiplied by for `shape`."""
    n = math.prod(shape)
    timed = max(1, min(n, TIMED_ELEMENTS))
    return [torch.randn(timed, dtype=dtype, requires_grad=True) for dtype in dtypes], n / timed


def _timed(dropout: Any, inputs: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for x in inputs:
        dropout(x).sum().backward()
    return (time.perf_counter() - start) / len(inputs)


def compiles(
    p: float, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...], draws: int, mode: str = "auto"
) -> bool:
    """Whether `fuse_hash_dropout` will compile the masks for such a run: `compiled`, or `auto` on a run
    that would spend COMPILE_PAYS_AFTER_S or more in eager masks, where a C++ compiler is found for
    inductor. Compiled masks keep no tensor for the backward (the key redraws them), so `plan` asks too.
    (`auto` also drops compiled masks that measure slower than eager: never seen, and not predicted.)"""
    if mode not in ("auto", "compiled") or p == 0 or not _compiler_found():
        return False
    return mode == "compiled" or eager_mask_seconds(p, shape, dtypes) * draws >= COMPILE_PAYS_AFTER_S


@functools.cache
def _compiler_found() -> bool:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # noqa: BLE001 - no compiler (or no inductor): torch.compile would fail
        return False
    return True


def fuse_hash_dropout(
    p: float, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...], draws: int, mode: str = "auto"
) -> str:
    """Compile the hash dropout (inductor: C++) when it pays on this CPU for this run; what was chosen.

    `shape`: a LoRA input at the run's batch and length; `dtypes`: the dtypes LoRA inputs will have;
    `draws`: masks the run will draw (`mask_draws`). The eager masks are timed first (forward and
    backward, `eager_mask_seconds`); only a run that would spend more than COMPILE_PAYS_AFTER_S in them
    compiles (`compiles`), and keeps the compiled masks if they measure faster. Both give the same
    masks, bit for bit. A CPU without a C++ compiler, or any compile error, keeps eager masks.
    `mode`: `auto` as above, `compiled` compiles (if it can) without measuring, `hash` stays eager.
    """
    global _compiled, _compiled_once

    _compiled = None
    if mode == "hash":
        return "eager (lora.dropout_masks=hash)"
    if not _compiler_found():
        return "eager (no C++ compiler found for torch.compile)"
    always = mode == "compiled"
    eager_s = 0.0 if always else eager_mask_seconds(p, shape, dtypes)
    if not compiles(p, shape, dtypes, draws, mode):
        return f"eager ({eager_s * draws:.0f} s of masks in this run: too few to pay for compiling)"
    key = torch.zeros((), dtype=torch.int32)
    inputs, per_input = _timing_inputs(shape, dtypes)  # the timed inputs' time x per_input = the run's
    threshold, keep_scale = _int32(_threshold(p)), 1 / (1 - p)

    def fused(x: torch.Tensor) -> torch.Tensor:
        return _CompiledDropout.apply(x, key, threshold, keep_scale)

    if _compiled_once is None:
        _compiled_once = torch.compile(_hash_dropout, dynamic=True)
    _compiled = _compiled_once
    try:
        compile_s = _timed(fused, inputs) * len(inputs)
    except Exception as err:  # noqa: BLE001 - any failure to compile means: stay eager
        _compiled = None
        return f"eager (torch.compile failed: {type(err).__name__}: {str(err).splitlines()[0][:120]})"
    if always:
        return f"compiled by torch.compile (lora.dropout_masks=compiled; {compile_s:.0f} s to compile)"
    fused_s = per_input * min(_timed(fused, inputs) for _ in range(3))
    if fused_s >= eager_s:
        _compiled = None
        return f"eager ({eager_s * 1e3:.1f} ms a mask, compiled {fused_s * 1e3:.1f} ms)"
    return (
        f"compiled by torch.compile, {eager_s / fused_s:.1f}x as fast as eager ({compile_s:.0f} s to compile)"
    )
