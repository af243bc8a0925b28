"""Where a training step's time goes, by operator, in each compute dtype: `torch.profiler` over real steps.

    python bench/profile_train.py                                  # QLoRA, checkpointing on, fp32 then bf16
    python bench/profile_train.py --dtypes bfloat16 model.quantization=none train.gradient_checkpointing=false

The side-by-side job (bench/side_by_side.sh: SmolLM2-135M-Instruct, batch 4, length 256, LoRA r=16 on the
7 projections), trained by `qlora_llm.train.train` for --steps steps; steps 4 to the last run under the
profiler. Prints, per dtype, the wall time per step, the share of self CPU time by kind of work (matmul,
4-bit dequantization, attention, the loss, the optimizer, the rest elementwise) and the top operators.
Printed, never asserted. Runs under mimalloc like the CLI.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
HARNESS_DATA = Path.home() / ".cache/qlora-llm-peers/data/train200.jsonl"

KINDS = (  # first match wins; names are aten / bitsandbytes operator names
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn", "onednn")),
    ("4-bit dequantize", ("bitsandbytes", "dequantize", "gemv_4bit")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("loss (fused head)", ("log_softmax", "logsumexp", "nll_loss", "cross_entropy", "gather")),
    ("optimizer", ("_foreach", "adamw", "lerp", "addcdiv", "addcmul")),
    ("copies and casts", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, needles in KINDS:
        if any(n in low for n in needles):
            return kind
    return "other elementwise"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument(
        "--no-profile", action="store_true", help="time the steps only (no profiler overhead)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()

    from qlora_llm.allocator import preload_env

    env = preload_env(os.environ)
    if env is not None:  # mimalloc, as the CLI runs
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    from transformers import TrainerCallback

    import qlora_llm.train as train_module
    from qlora_llm.config import load_config

    data = HARNESS_DATA if HARNESS_DATA.exists() else PROJECT / "data/aclsum/train.jsonl"
    settings = [
        f"data.train_file={data}",
        "data.eval_file=null",
        "data.eval_fraction=0",
        "data.max_seq_length=256",
        "train.batch_size=4",
        "train.gradient_accumulation_steps=1",
        f"train.max_steps={args.steps}",
        "train.learning_rate=2e-4",
        "train.logging_steps=1",
        "train.early_stopping_patience=0",
        f"train.eval_steps={args.steps}",
        f"train.save_steps={args.steps}",
        "lora.dropout=0.05",
        "train.gradient_checkpointing=true",
    ]
    print(f"data: {data}; host: {os.cpu_count()} threads")
    for dtype in args.dtypes.split(","):
        profile = _profile_run(
            train_module,
            load_config,
            TrainerCallback,
            [*settings, f"model.compute_dtype={dtype}", *args.overrides],
            args.steps,
            not args.no_profile,
        )
        _print_profile(dtype, profile, args.top)
    return 0


def _profile_run(train_module, load_config, callback_base, overrides, steps, profiled):
    """Train; the wall time of steps 4..steps (median) and, if `profiled`, the profiler's key averages."""
    import statistics
    import time

    from torch.profiler import ProfilerActivity, profile

    state: dict = {"walls": []}

    class Profile(callback_base):
        def on_step_begin(self, args, st, control, **kw):
            if st.global_step == 3 and profiled:
                state["prof"] = profile(activities=[ProfilerActivity.CPU])
                state["prof"].__enter__()
            state["start"] = time.perf_counter()

        def on_step_end(self, args, st, control, **kw):
            if st.global_step > 3:
                state["walls"].append(time.perf_counter() - state["start"])
            if st.global_step == steps and "prof" in state:
                state["prof"].__exit__(None, None, None)

    make_trainer = train_module._make_trainer

    def with_profiler(*a, **kw):
        trainer = make_trainer(*a, **kw)
        trainer.add_callback(Profile())
        return trainer

    train_module._make_trainer = with_profiler
    try:
        with tempfile.TemporaryDirectory() as out:
            cfg = load_config(PROJECT / "configs/smollm2-cpu.yaml", [*overrides, f"train.output_dir={out}"])
            train_module.train(cfg, force=True)
    finally:
        train_module._make_trainer = make_trainer
    prof = state.get("prof")
    return (prof.key_averages() if prof else None), statistics.median(state["walls"]), state["walls"]


def _print_profile(dtype, profile, top):
    averages, wall, walls = profile
    print(
        f"\n== {dtype}: {wall:.3f} s a step (median wall of steps 4-{3 + len(walls)}: "
        + " ".join(f"{w:.2f}" for w in walls)
        + ")"
    )
    if averages is None:
        return
    total = sum(e.self_cpu_time_total for e in averages)
    by_kind: dict[str, float] = {}
    for e in averages:
        by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0.0) + e.self_cpu_time_total
    print(
        f"\n== {dtype}: {wall:.3f} s a step (wall), self CPU time {total / 1e6:.2f} s over the profiled steps"
    )
    for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<20} {100 * t / total:5.1f}%")
    print(f"  top {top} operators by self CPU time:")
    for e in sorted(averages, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"    {100 * e.self_cpu_time_total / total:5.1f}%  {e.count:6d}x  {e.key}")


if __name__ == "__main__":
    raise SystemExit(main())
