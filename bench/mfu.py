"""What share of this CPU's matmul peak a training run reaches, in the dtype it computes in.

    python bench/mfu.py --tokens-per-s 300 --dtype bfloat16             # SmolLM2-135M, no checkpointing
    python bench/mfu.py --tokens-per-s 240 --dtype bfloat16 --checkpointing

Peak = the best of 5 (2048 x 2048) @ (2048 x 2048) products in that dtype on this machine's threads (what
the hardware gives a large GEMM here; no vendor sheet). FLOPs per trained token, LoRA on a frozen base:
forward 2N, backward to the activations 2N (no weight gradients for the frozen base), another forward 2N
when checkpointing recomputes, N = the matmul parameters (decoder linears + LM head, from the shipped
config.json), plus LoRA's own (6 x its parameters) and attention (3 x 4·T·d per layer, T = --length).
Printed, never asserted.
"""

from __future__ import annotations

import argparse
import sys
import time


def peak_flops(dtype_name: str) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(2048, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best


def flops_per_token(model: str, r: int, length: int, checkpointing: bool) -> float:
    from qlora_llm.plan import ModelShape, load_model_config

    shape = ModelShape.from_config(load_model_config(model)[0])
    linears = shape.linears()
    n = shape.layers * sum(i * o for i, o in linears.values()) + shape.hidden * shape.vocab
    lora = shape.layers * sum(r * (i + o) for i, o in linears.values())
    attention = shape.layers * 4 * length * shape.heads * shape.head_dim  # QK^T and AV, forward
    passes = 3 if checkpointing else 2  # forward, backward to activations (+ the recomputed forward)
    return passes * 2 * n + 6 * lora + 3 * attention


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens-per-s", type=float, required=True)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--length", type=int, default=256, help="mean sequence length (attention)")
    parser.add_argument("--checkpointing", action="store_true")
    args = parser.parse_args()
    peak = peak_flops(args.dtype)
    per_token = flops_per_token(args.model, args.r, args.length, args.checkpointing)
    achieved = args.tokens_per_s * per_token
    print(f"{args.dtype} matmul peak here: {peak / 1e9:.0f} GFLOP/s")
    print(
        f"FLOPs per trained token: {per_token / 1e9:.2f} GFLOP ({'with' if args.checkpointing else 'no'} recompute)"
    )
    print(
        f"{args.tokens_per_s:g} tokens/s = {achieved / 1e9:.0f} GFLOP/s = {100 * achieved / peak:.0f}% of the peak"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
