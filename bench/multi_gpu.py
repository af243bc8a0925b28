"""Multi-GPU training on a machine with GPUs: DDP and FSDP (QLoRA) measured against `qlora-llm plan`.

    python bench/multi_gpu.py                                   # every visible GPU, the 7B recipe
    python bench/multi_gpu.py --config configs/smollm2-cpu.yaml --nproc 2 --steps 10

For each of 1 process, then N under `train.distributed=ddp` and N under `fsdp`, it runs
`qlora-llm train CONFIG --nproc N` for a few steps and prints tokens/s (rank 0's count, times N since
each rank trains its own share), the peak GPU memory of rank 0's device from the run's summary, and
what `qlora-llm plan --nproc N` predicted per GPU. This is the part of multi-process training a CPU
cannot test (accelerate's FSDP needs a GPU); the CPU tests cover the launcher, rank-0 writes, parity
and resume. Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def qlora(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qlora_llm.cli", *args], capture_output=True, text=True, check=False
    )


def planned_gib(config: str, nproc: int, mode: str, gpu_bytes: int) -> float:
    from qlora_llm.config import load_config
    from qlora_llm.plan import plan

    report = plan(
        load_config(config, [f"train.distributed={mode}"]), device_memory_bytes=gpu_bytes, processes=nproc
    )
    return report.estimate.peak / 2**30


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "mistral-7b-8gb.yaml"))
    parser.add_argument("--nproc", type=int, default=torch.cuda.device_count())
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available() or args.nproc < 1:
        print("no GPU here: this benchmark is for a machine with GPUs (the CPU tests cover the rest)")
        return 0
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    rows = []
    with tempfile.TemporaryDirectory(prefix="multi-gpu-") as tmp:
        for nproc, mode in [(1, "ddp"), (args.nproc, "ddp"), (args.nproc, "fsdp")]:
            if nproc == 1 and mode == "fsdp":
                continue
            out = Path(tmp) / f"{mode}-{nproc}"
            done = qlora(
                "train", args.config, "--nproc", str(nproc), f"train.distributed={mode}",
                f"train.max_steps={args.steps}", f"train.output_dir={out}", "train.save_steps=1000000",
                "train.eval_steps=1000000",
            )  # fmt: skip
            if done.returncode != 0:
                rows.append(
                    (
                        nproc,
                        mode,
                        None,
                        None,
                        planned_gib(args.config, nproc, mode, gpu_bytes),
                        done.stderr[-300:],
                    )
                )
                continue
            summary = json.loads((out / "summary.json").read_text())
            rows.append(
                (
                    nproc,
                    mode,
                    summary["tokens_per_s"] * nproc,
                    summary["peak_memory_bytes"] / 2**30,
                    planned_gib(args.config, nproc, mode, gpu_bytes),
                    "",
                )
            )
    print(f"{'processes':>9} {'mode':>5} {'tokens/s':>9} {'peak GiB (rank 0)':>18} {'planned GiB/GPU':>16}")
    for nproc, mode, tps, peak, planned, err in rows:
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        print(f"{nproc:>9} {mode:>5} {fmt(tps):>9} {fmt(peak):>18} {fmt(planned):>16} {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
