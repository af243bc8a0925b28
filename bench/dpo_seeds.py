"""DPO after the SFT demo over several seeds: does preference tuning move the held-out pairs, or luck?

    python bench/dpo_seeds.py [--seeds 42 1 2] [--sft runs/smollm2-aclsum] [--runs-dir runs/dpo-seeds]

Needs the SFT demo run (`make demo`, or `qlora-llm train configs/smollm2-cpu.yaml`). For each seed it
runs `qlora-llm train configs/smollm2-dpo-cpu.yaml train.seed=S` (its own run folder; skipped when its
final adapter is there) and `qlora-llm evaluate` on the 30 held-out pairs against the SFT run (DPO's
reference), then prints per seed and as min / median / max: reward accuracy and margin (DPO's implicit
reward against the reference), the share of pairs whose chosen answer has the higher log-probability,
and ROUGE-L of greedy answers against the chosen (human) summaries. Numbers, never asserted; the
the preference-tuning table in docs/preference.md comes from this script.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_table import CLI, ROOT, print_seed_table  # noqa: E402

METRICS = [
    ("reward_accuracy", "reward accuracy %", 100, "{:.0f}"),
    ("reward_margin", "reward margin", 1, "{:.3f}"),
    ("preference_accuracy", "pairs preferred %", 100, "{:.0f}"),
    ("rougeL", "ROUGE-L F1", 100, "{:.1f}"),
    ("perplexity_completion", "chosen perplexity", 1, "{:.2f}"),
    ("stop_rate", "stop rate %", 100, "{:.0f}"),
]


def run_seed(seed: int, sft: Path, runs_dir: Path) -> dict:
    out = runs_dir / f"seed-{seed}"
    common = [f"model.adapter={sft}", f"eval.compare={sft}"]
    if not (ROOT / out / "final_adapter").is_dir():
        train = [str(CLI), "train", "configs/smollm2-dpo-cpu.yaml", f"train.seed={seed}"]
        train.append(f"train.output_dir={out}")
        print("$", " ".join(train + common), flush=True)
        subprocess.run(train + common, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    evaluate = [str(CLI), "evaluate", str(out)]  # the run's config.yaml: held-out pairs, against the SFT run
    print("$", " ".join(evaluate), flush=True)
    subprocess.run(evaluate, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((ROOT / out / "eval" / "metrics.json").read_text())
    return {row["metric"]: row for row in metrics["table"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    ap.add_argument("--sft", type=Path, default=Path("runs/smollm2-aclsum"))
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/dpo-seeds"))
    args = ap.parse_args()
    if not (ROOT / args.sft / "final_adapter").is_dir():
        sys.exit(f"{args.sft} has no final_adapter/: run `make demo` (the SFT demo) first")
    tables = {seed: run_seed(seed, args.sft, args.runs_dir) for seed in args.seeds}

    print_seed_table("30 held-out pairs", "SFT", tables, METRICS)


if __name__ == "__main__":
    main()
