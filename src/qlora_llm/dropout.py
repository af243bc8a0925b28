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
    threshold = round((1 - p) * RESOLUTION) - RESOLUTION // 2
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


class HashDropout(torch.nn.Module):
    """`nn.Dropout(p)` whose CPU masks come from `keep_mask`; the same module otherwise (p, train/eval)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or x.numel() >= 2**31:
            return torch.nn.functional.dropout(x, self.p, self.training)
        key = int(torch.randint(-(2**31), 2**31 - 1, (), dtype=torch.int64))
        # 0/1 in 2 bytes (exact) even for an fp32 x: autograd keeps the mask for the backward, not x. The
        # scale is applied apart: folded into a bf16 mask, 1/0.95 would round to 1.0547.
        mask = keep_mask(x.numel(), key, self.p, x.dtype if x.element_size() <= 2 else torch.bfloat16)
        return (x * mask.view(x.shape)).mul_(1 / (1 - self.p))

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
