"""Training throughput: the seed's literal recipe vs qlora-llm's default, same model, data and steps.

    python bench/train_throughput.py [--steps 30] [--batch-size 4] [--max-seq-length 384]

Trains SmolLM2-135M-Instruct (the bundled real model) with 4-bit NF4 QLoRA, r=16 on all 7
projections, on the bundled ACLSum data, twice, each in a fresh process so peak RSS is its own:
- seed: padded batches, group_by_length, loss on the whole sequence, and TRL's bf16 cast of the LoRA
  weights left in place (what the seed's TRL script gets);
- ours: the default config (loss on the completion only, LoRA weights kept fp32 on CPU, and
  padding-free packing when `train.packing` is on), under mimalloc as `qlora-llm train` runs it
  (src/qlora_llm/allocator.py); the seed recipe keeps glibc's malloc, as the seed's script does.
Prints trained tokens/s (real, non-padding tokens), peak RSS, and the final eval loss measured the
same way for both (mean NLL over the eval answers' tokens), then the ratios. Numbers, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from qlora_llm.allocator import ENV, preload_env

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, torch
import qlora_llm.train as qtrain
import qlora_llm.trainer as qtrainer
from qlora_llm.allocator import active_allocator
from qlora_llm.config import load_config

mode, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
if mode == "seed":
    # Keep TRL's bf16 cast of the LoRA weights, as the seed's script does (we undo it on CPU).
    real = qtrainer.trainer_class
    def keep_bf16(method="sft"):
        class Seed(real(method)):
            def train(self, *a, **k):
                for p in self.model.parameters():
                    if p.requires_grad:
                        p.data = p.data.to(torch.bfloat16)
                return super().train(*a, **k)
        return Seed
    qtrainer.trainer_class = keep_bf16
cfg = load_config(ROOT + "/configs/smollm2-cpu.yaml", overrides)
result = qtrain.train(cfg)

# Eval loss on the answers only, the same measure for both recipes, from the final adapter in fp32.
from peft import PeftModel
from transformers import AutoModelForCausalLM
from qlora_llm.model import load_tokenizer, resolve_model
from qlora_llm.data import load_examples, tokenize_examples
tok = load_tokenizer(cfg.model.name)
base = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model.name), dtype=torch.float32)
model = PeftModel.from_pretrained(base, str(result.final_adapter)).eval()
rows, _ = tokenize_examples(load_examples(cfg.data.eval_file), tok, cfg.model.template, cfg.data.max_seq_length)
nll, n = 0.0, 0
with torch.no_grad():
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor([[t if m else -100 for t, m in zip(row["input_ids"], row["completion_mask"])]])
        count = int((labels[0, 1:] != -100).sum())
        nll += float(model(input_ids=ids, labels=labels).loss) * count
        n += count
print("RESULT " + json.dumps({
    "tokens_per_s": result.summary["tokens_per_s"], "tokens": result.summary["tokens_trained"],
    "seconds": result.summary["seconds"], "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    "eval_answer_loss": nll / n, "allocator": active_allocator(),
}))
""".replace("ROOT", repr(str(ROOT)))


def run(mode: str, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = [*overrides, f"train.output_dir={tmp}/run"]
        env = {**os.environ, ENV: "system"}
        if mode == "ours":
            env = preload_env(os.environ) or dict(os.environ)
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, mode, tmp, *args], capture_output=True, text=True, env=env
        )
    if proc.returncode != 0:
        sys.exit(f"{mode} run failed:\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=384)
    parser.add_argument(
        "--packing",
        choices=["true", "false"],
        default=None,
        help="force packing for 'ours' (default: the config default)",
    )
    parser.add_argument("--recipes", default="seed,ours", help="which to run, e.g. 'ours' alone")
    a = parser.parse_args()
    common = [
        f"train.max_steps={a.steps}",
        f"train.batch_size={a.batch_size}",
        "train.gradient_accumulation_steps=1",
        f"data.max_seq_length={a.max_seq_length}",
        f"train.eval_steps={a.steps}",
        f"train.save_steps={a.steps}",
        "train.early_stopping_patience=0",
        "train.logging_steps=5",
    ]
    seed = ["train.packing=false", "train.group_by_length=true", "train.train_on_prompt=true"]
    ours = [f"train.packing={a.packing}"] if a.packing else []
    recipes = {"seed": common + seed, "ours": common + ours}
    results = {name: run(name, recipes[name]) for name in a.recipes.split(",")}
    print(
        f"SmolLM2-135M-Instruct, NF4 QLoRA r=16 x 7 projections, fp32 compute, {a.steps} steps of "
        f"batch {a.batch_size}, max length {a.max_seq_length}"
        + (f", packing={a.packing}" if a.packing else "")
    )
    print(
        f"{'recipe':<8}{'tokens/s':>10}{'tokens':>9}{'seconds':>9}{'peak RSS GiB':>14}{'eval answer loss':>18}"
        f"{'allocator':>11}"
    )
    for name, r in results.items():
        print(
            f"{name:<8}{r['tokens_per_s']:>10.1f}{r['tokens']:>9}{r['seconds']:>9.1f}{r['peak_rss_gib']:>14.2f}"
            f"{r['eval_answer_loss']:>18.4f}{r['allocator']:>11}"
        )
    if len(results) == 2:
        s, o = results["seed"], results["ours"]
        print(
            f"ours/seed: tokens/s x{o['tokens_per_s'] / s['tokens_per_s']:.2f}, "
            f"peak RSS x{o['peak_rss_gib'] / s['peak_rss_gib']:.2f}, eval answer loss {o['eval_answer_loss']:.4f} "
            f"vs {s['eval_answer_loss']:.4f}"
        )


if __name__ == "__main__":
    main()
