"""The demo recipe over several seeds: does fine-tuning help by a margin, and what does it cost?

    python bench/demo_seeds.py [--seeds 42 1 2 3 4] [--runs-dir runs/seeds] [--set KEY=VALUE ...]
                               [--adapter-scale S]

Runs `qlora-llm run configs/smollm2-cpu.yaml train.seed=S [KEY=VALUE ...]` for each seed (each in its
own run folder, each stage skipped when already done, the base model evaluated once and reused), then
prints, per seed and as min / median / max over the seeds, base vs fine-tuned on the 50 held-out ACLSum
test papers and on general ability: ROUGE-L/1/2 F1, ROUGE-L precision/recall, answer length in words,
answer perplexity, stop rate, the general likelihood benchmarks' mean accuracy and the generative
task's accuracy (each with its paired 95% interval), KL(base || tuned), and the general keyword
prompts. Then each seed against the targets of the demo (ROUGE-L at least 5 points above the base, stop
rate at least 90%, likelihood mean within 1 point of the base, generative within 2 points) and, on the
median seed, whether any general keyword prompt the base passes fails after tuning.

`--set` trains with those overrides too (the run folders get a suffix from them), e.g. a lever against
forgetting: `--set data.replay_fraction=0.2`. `--adapter-scale S` also evaluates each run with its
adapter at scale S (WiSE-FT: W0 + S x delta; `<run>/eval-scale-S/`). `--sweep` prints, per seed and
scale, what `qlora-llm evaluate RUN --adapter-scales ...` measured on each run's EVAL split
(`<run>/sweep/sweep.json`) and the scale it chose. Numbers, never asserted; the tables in docs/demo.md
come from this script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_table import CLI, ROOT, print_seed_table  # noqa: E402

METRICS = [
    ("rougeL", "ROUGE-L F1", 100, "{:.1f}"),
    ("rougeL_precision", "ROUGE-L precision", 100, "{:.1f}"),
    ("rougeL_recall", "ROUGE-L recall", 100, "{:.1f}"),
    ("rouge1", "ROUGE-1 F1", 100, "{:.1f}"),
    ("rouge2", "ROUGE-2 F1", 100, "{:.1f}"),
    ("answer_words", "answer words", 1, "{:.1f}"),
    ("perplexity_completion", "answer perplexity", 1, "{:.2f}"),
    ("stop_rate", "stop rate %", 100, "{:.0f}"),
    ("general:mean", "likelihood mean acc %", 100, "{:.1f}"),
    ("general:generative", "generative acc %", 100, "{:.1f}"),
    ("general:kl", "KL(base||tuned)/token", 1, "{:.4f}"),
    ("benchmark_score", "keyword prompts %", 100, "{:.0f}"),
]


def read_eval(folder: Path) -> dict:
    """metrics.json's table by metric, the generative task under one name, intervals and prompts."""
    metrics = json.loads((folder / "metrics.json").read_text())
    table = {row["metric"]: row for row in metrics["table"]}
    general = metrics.get("general") or {}
    for row in general.get("generative", []):
        if row["metric"] == "acc":
            table["general:generative"] = table[f"general:{row['task']}"] | {"interval": row}
    for row in general.get("likelihood", []):
        if row["task"] == "mean" and row["metric"] == "acc":
            table["general:mean"] = table["general:mean"] | {"interval": row}
    if "general:kl" in table:
        table["general:kl"]["base"] = 0.0
    table["prompts"] = metrics.get("benchmark_prompts", [])
    return table


def run_suffix(overrides: list[str]) -> str:
    """The run folder's suffix for these overrides: train.kl_weight=1.0 -> -kl_weight1.0."""
    return "".join(
        "-" + key.split(".")[-1] + value for key, _, value in (o.partition("=") for o in overrides)
    )


def run_seed(seed: int, runs_dir: Path, overrides: list[str], scale: float | None, run: bool = True) -> dict:
    suffix = run_suffix(overrides)
    out = runs_dir / f"seed-{seed}{suffix}"
    cmd = [str(CLI), "run", "configs/smollm2-cpu.yaml", f"train.seed={seed}", f"train.output_dir={out}"]
    if run:
        print("$", " ".join(cmd + overrides), flush=True)
        subprocess.run(cmd + overrides, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    folder = ROOT / out / "eval"
    if scale is not None:
        folder = ROOT / out / f"eval-scale-{scale:g}"
        if run and not (folder / "metrics.json").is_file():
            cmd = [
                str(CLI),
                "evaluate",
                str(out),
                f"model.adapter_scale={scale}",
                "--output-dir",
                str(folder),
            ]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return read_eval(folder)


def print_sweeps(seeds: list[int], runs_dir: Path, overrides: list[str]) -> None:
    """Each run's adapter-scale sweep on its eval split, and the median over the seeds per scale."""
    suffix = run_suffix(overrides)
    by_scale: dict[float, list[dict]] = {}
    print("adapter-scale sweep on each run's eval split (points vs base; general: paired 95% interval)")
    for seed in seeds:
        sweep = json.loads((ROOT / runs_dir / f"seed-{seed}{suffix}" / "sweep" / "sweep.json").read_text())
        for r in sweep["rows"]:
            by_scale.setdefault(r["scale"], []).append(r)
            general = "; ".join(
                f"{g['task']} {100 * g['diff']:+.1f} ({100 * g['lo']:+.1f} to {100 * g['hi']:+.1f})"
                for g in r["general"]
            )
            print(
                f"seed {seed} scale {r['scale']:g}: ROUGE-L {100 * r['task_tuned']:.1f} "
                f"({100 * (r['task_tuned'] - r['task_base']):+.1f}); {general}; KL {r['kl']:.4f}"
                + ("" if r["keeps_general"] else "; measurable loss")
            )
        print(f"seed {seed}: chosen scale {sweep['chosen']}")
    print(
        "\nmedian over seeds: scale | ROUGE-L gain | likelihood mean diff | generative diff | KL | chosen by"
    )
    chosen = [
        json.loads((ROOT / runs_dir / f"seed-{s}{suffix}" / "sweep" / "sweep.json").read_text())["chosen"]
        for s in seeds
    ]
    for scale, rows in sorted(by_scale.items()):

        def med(task: str, rows: list[dict] = rows) -> float:
            return statistics.median(
                100 * next(g["diff"] for g in r["general"] if g["task"] == task) for r in rows
            )

        generative = next(g["task"] for g in rows[0]["general"] if g["task"].startswith("basic_skills"))
        print(
            f"{scale:g} | {statistics.median(100 * (r['task_tuned'] - r['task_base']) for r in rows):+.1f} | "
            f"{med('mean'):+.1f} | {med(generative):+.1f} | {statistics.median(r['kl'] for r in rows):.4f} | "
            f"{sum(c == scale for c in chosen)} of {len(seeds)} seeds"
        )


def interval(t: dict, key: str) -> str:
    r = t[key].get("interval")
    return f"{100 * r['diff']:+.1f} ({100 * r['lo']:+.1f} to {100 * r['hi']:+.1f})" if r else "-"


def general_prompts_lost(t: dict) -> list[str]:
    """General keyword prompts the base passes and the tuned model fails."""
    return [
        p["id"]
        for p in t["prompts"]
        if p["set"] != "aclsum" and p["base"]["passed"] and not p["tuned"]["passed"]
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3, 4])
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/seeds"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--adapter-scale", type=float, default=None)
    ap.add_argument("--report-only", action="store_true", help="read the runs' reports, run nothing")
    ap.add_argument("--sweep", action="store_true", help="print the runs' adapter-scale sweeps, run nothing")
    args = ap.parse_args()
    if args.sweep:
        print_sweeps(args.seeds, args.runs_dir, args.overrides)
        return
    tables = {
        seed: run_seed(seed, args.runs_dir, args.overrides, args.adapter_scale, not args.report_only)
        for seed in args.seeds
    }

    metrics = [m for m in METRICS if all(m[0] in t for t in tables.values())]
    print_seed_table("metric", "base", tables, metrics)
    print("\npaired 95% intervals, tuned - base, points: likelihood mean | generative")
    for seed, t in tables.items():
        if "general:mean" in t:
            print(f"seed {seed}: {interval(t, 'general:mean')} | {interval(t, 'general:generative')}")
    print()
    for seed, t in tables.items():
        gain = t["rougeL"]["tuned"] - t["rougeL"]["base"]
        checks = {
            f"ROUGE-L >= base + 5 points ({100 * gain:+.1f})": gain >= 0.05,
            "stop rate >= 90%": t["stop_rate"]["tuned"] >= 0.9,
        }
        if "general:mean" in t:
            lik = t["general:mean"]["tuned"] - t["general:mean"]["base"]
            gen = t["general:generative"]["tuned"] - t["general:generative"]["base"]
            checks[f"likelihood mean within 1 point ({100 * lik:+.1f})"] = lik >= -0.01
            checks[f"generative within 2 points ({100 * gen:+.1f})"] = gen >= -0.02
        failed = [k for k, ok in checks.items() if not ok]
        print(f"seed {seed}: " + ("all criteria met" if not failed else "NOT met: " + ", ".join(failed)))
    gains = {s: t["rougeL"]["tuned"] - t["rougeL"]["base"] for s, t in tables.items()}
    median_seed = sorted(gains, key=gains.get)[len(gains) // 2]
    lost = general_prompts_lost(tables[median_seed])
    print(
        f"median seed by ROUGE-L gain ({median_seed}): "
        + (f"general keyword prompts lost: {', '.join(lost)}" if lost else "no general keyword prompt lost")
    )
    print(f"smallest ROUGE-L margin above base + 5: {100 * (min(gains.values()) - 0.05):+.1f} points")
    print(f"median ROUGE-L gain: {100 * statistics.median(gains.values()):+.1f} points")


if __name__ == "__main__":
    main()
