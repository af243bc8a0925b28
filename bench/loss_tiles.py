"""TRL's fused LM head + loss on CPU: time and transient memory per tile size.

    python bench/loss_tiles.py                  # SmolLM2's head (576 x 49152), 1024 tokens, fp32 and bf16

One forward + backward of `trl.kernels.chunked_logprob.ChunkedLogProbFunction` (what SFT training runs
for its loss, with the entropy and top-1 outputs TRL logs) per setting, each in its own process so the
peak RSS above the inputs is that setting's alone; best of 3 after a warm-up. Without Triton (CPU) TRL
folds every logits tile with plain torch ops, each holding a tile-sized fp32 temporary: the transient
grows with the tile, which train.py therefore shrinks on CPU (`CPU_LOSS_TILE`). Numbers are printed,
never asserted.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = r"""
import resource, sys, time, torch
tokens, vocab_tile, dtype_name, n, h, v = sys.argv[1:7]
tokens, vocab_tile, n, h, v = int(tokens), int(vocab_tile), int(n), int(h), int(v)
dtype = getattr(torch, dtype_name)
import trl.kernels.chunked_logprob as kernel
kernel.TOKEN_CHUNK_SIZE = tokens
g = torch.Generator().manual_seed(0)
hidden = torch.randn(n, h, generator=g, requires_grad=True)
weight = torch.randn(v, h, generator=g) * 0.02
targets = torch.randint(0, v, (n,), generator=g)
outputs = ("log_probs", "entropy", "is_top1")
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        logp, *_ = kernel.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, vocab_tile, None, 1.0, outputs)
    (-logp.mean()).backward()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
step()
times = []
for _ in range(3):
    start = time.perf_counter(); step(); times.append(time.perf_counter() - start)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(min(times), (peak - base) * 1024)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens in the batch (batch x length)")
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    tiles = [(4096, 32768), (1024, 8192), (512, 8192), (256, 8192), (256, 4096), (128, 4096)]
    print(f"{'dtype':<10}{'tile (tokens x vocab)':>24}{'ms fwd+bwd':>12}{'transient MiB':>15}")
    for dtype in args.dtypes:
        for tokens, vocab_tile in tiles:
            cmd = [sys.executable, "-c", CHILD, str(tokens), str(vocab_tile), dtype]
            cmd += [str(args.tokens), str(args.hidden), str(args.vocab)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
            seconds, transient = float(out[0]), int(out[1])
            print(
                f"{dtype:<10}{f'{tokens} x {vocab_tile}':>24}{seconds * 1000:>12.0f}{transient / 2**20:>15.0f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
