"""The demo recipe over several seeds: does fine-tuning help by a margin, or by luck?

    python bench/demo_seeds.py [--seeds 42 1 2] [--runs-dir runs/seeds]

Runs `qlora-llm run configs/smollm2-cpu.yaml train.seed=S` for each seed (each in its own run folder,
each stage skipped when already done, the base model evaluated once and reused), then prints, per seed
and as min / median / max over the seeds, base vs fine-tuned on the 50 held-out ACLSum test papers:
ROUGE-L/1/2 F1, answer perplexity, stop rate, and the demo's criteria (ROUGE-L at least 5 points above
the base, lower answer perplexity, stop rate at least 90%, no drop in ROUGE-1 or ROUGE-2). Numbers,
never asserted; the tables in docs/demo.md come from this script.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_table import print_seed_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("qlora-llm")
METRICS = [
    ("rougeL", "ROUGE-L F1", 100, "{:.1f}"),
    ("rouge1", "ROUGE-1 F1", 100, "{:.1f}"),
    ("rouge2", "ROUGE-2 F1", 100, "{:.1f}"),
    ("perplexity_completion", "answer perplexity", 1, "{:.2f}"),
    ("stop_rate", "stop rate %", 100, "{:.0f}"),
]


def run_seed(seed: int, runs_dir: Path) -> dict:
    out = runs_dir / f"seed-{seed}"
    cmd = [str(CLI), "run", "configs/smollm2-cpu.yaml", f"train.seed={seed}", f"train.output_dir={out}"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((ROOT / out / "eval" / "metrics.json").read_text())
    return {row["metric"]: row for row in metrics["table"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/seeds"))
    args = ap.parse_args()
    tables = {seed: run_seed(seed, args.runs_dir) for seed in args.seeds}

    print_seed_table("metric", "base", tables, METRICS)
    print()
    for seed in args.seeds:
        t = tables[seed]
        checks = {
            "ROUGE-L >= base + 5 points": t["rougeL"]["tuned"] - t["rougeL"]["base"] >= 0.05,
            "answer perplexity lower": t["perplexity_completion"]["tuned"]
            < t["perplexity_completion"]["base"],
            "stop rate >= 90%": t["stop_rate"]["tuned"] >= 0.9,
            "ROUGE-1, ROUGE-2 not lower": all(t[k]["tuned"] >= t[k]["base"] for k in ("rouge1", "rouge2")),
        }
        failed = [k for k, ok in checks.items() if not ok]
        print(f"seed {seed}: " + ("all criteria met" if not failed else "NOT met: " + ", ".join(failed)))


if __name__ == "__main__":
    main()
