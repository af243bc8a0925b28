"""Choose the adapter scale by measurement: task gain against general ability, one evaluation per scale.

WiSE-FT (W0 + scale x the LoRA delta, `model.adapter_scale`) trades some of the fine-tune's task gain
for the base's general ability. Which scale is right is an empirical question, so each scale is
evaluated the way `evaluate` does it: the task metric (ROUGE-L F1) and the general benchmarks, each
paired against the base on the same items. The choice is made on the run's EVAL split, never on the
test split: the test papers stay unseen for the final report. The chosen scale is the one with the
best task metric among those whose general comparisons all allow "no measurable loss"; when none
does, nothing is chosen and the summary says so.

    sweep_adapter_scale(cfg, "runs/smollm2-aclsum", [0.25, 0.5, 0.75, 1.0])
    # -> runs/smollm2-aclsum/sweep/{sweep.json, sweep.png, scale-0.25/, ...}

Then `qlora-llm merge RUN model.adapter_scale=<chosen>` writes the merged model at that scale.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_llm.atomic import atomic_write_text
from qlora_llm.config import Config
from qlora_llm.errors import QloraError

log = logging.getLogger(__name__)

TASK_METRIC = "rougeL"


class SweepError(QloraError):
    """The sweep cannot run (no adapter, no scales); the message says why."""


@dataclass
class SweepResult:
    output_dir: Path
    rows: list[dict[str, Any]]
    chosen: float | None


def _row(scale: float, metrics: dict[str, Any]) -> dict[str, Any]:
    """One scale's figures: the task metric (base and tuned), the general comparisons and their verdicts."""
    task = next(r for r in metrics["table"] if r["metric"] == TASK_METRIC)
    general = metrics.get("general") or {"likelihood": [], "generative": [], "kl": None}
    compared = [r | {"kind": "likelihood"} for r in general["likelihood"] if r["metric"] == "acc"]
    compared += [r | {"kind": "generative"} for r in general["generative"] if r["metric"] == "acc"]
    lik = [r for r in general["likelihood"] if r["metric"] == "acc"]
    mean = next((r for r in lik if r["task"] == "mean"), lik[0] if lik else None)
    return {
        "scale": scale,
        "task_metric": TASK_METRIC,
        "task_base": task["base"],
        "task_tuned": task["tuned"],
        "general_mean_base": mean["base"] if mean else None,
        "general_mean_tuned": mean["tuned"] if mean else None,
        "general": [
            {k: r[k] for k in ("task", "kind", "base", "tuned", "diff", "lo", "hi", "verdict")}
            for r in compared
        ],
        "kl": (general.get("kl") or {}).get("kl"),
        "keeps_general": all(r["verdict"] != "measurable loss" for r in compared),
    }


def choose(rows: list[dict[str, Any]]) -> float | None:
    """The best task metric among the scales with no measurable general loss (ties: the smaller scale)."""
    kept = [r for r in rows if r["keeps_general"] and r["task_tuned"] is not None]
    if not kept:
        return None
    return max(kept, key=lambda r: (r["task_tuned"], -r["scale"]))["scale"]


def sweep_adapter_scale(
    cfg: Config, target: str | Path, scales: list[float], *, output_dir: Path | None = None
) -> SweepResult:
    """Evaluate TARGET at each adapter scale on its eval split; write sweep.json and sweep.png; choose."""
    from qlora_llm.evaluate import evaluate
    from qlora_llm.model import find_target

    if not scales:
        raise SweepError("no adapter scales to sweep: give e.g. --adapter-scales 0.25,0.5,0.75,1")
    found = find_target(target, cfg.model)
    if found.adapter_dir is None:
        raise SweepError(f"{target}: has no LoRA adapter to scale (give a run folder or an adapter folder).")
    out = Path(output_dir or (found.path / "sweep"))
    rows = []
    for scale in sorted(set(scales)):
        at = cfg.model_copy(deep=True)
        at.model.adapter_scale = scale
        at.eval.data_file = None  # the run's own held-out eval split: the test split is never chosen on
        at.eval.benchmark_prompts = None  # 8 keyword prompts cannot tell one scale from another
        log.info("adapter scale %g: evaluating on the eval split", scale)
        result = evaluate(at, found.path, output_dir=out / f"scale-{scale:g}")
        rows.append(_row(scale, result.metrics))
    chosen = choose(rows)
    summary = {
        "target": str(found.path),
        "split": "eval (the run's held-out split; the test split is not used)",
        "rule": f"best {TASK_METRIC} among the scales whose general comparisons all allow no measurable loss",
        "chosen": chosen,
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sweep.json", json.dumps(summary, indent=2) + "\n")
    _plot(rows, chosen, out / "sweep.png")
    if chosen is None:
        log.warning("no adapter scale kept general ability on the eval split: see %s", out / "sweep.json")
    else:
        log.info("adapter scale %g: the best %s with no measurable general loss", chosen, TASK_METRIC)
    return SweepResult(out, rows, chosen)


def _general_series(rows: list[dict[str, Any]]) -> dict[str, list[tuple[float, dict[str, Any]]]]:
    """The general comparisons to draw, each as (scale, comparison) points: the likelihood tasks through
    their mean (each alone where there is one), every generative task on its own."""
    names = list(dict.fromkeys(g["task"] for r in rows for g in r["general"]))
    kinds = {g["task"]: g.get("kind") for r in rows for g in r["general"]}
    if "mean" in names:
        names = [n for n in names if n == "mean" or kinds[n] != "likelihood"]
    series = {}
    for name in names:
        label = "likelihood tasks (mean)" if name == "mean" else name
        series[label] = [(r["scale"], g) for r in rows for g in r["general"] if g["task"] == name]
    return series


def _plot(rows: list[dict[str, Any]], chosen: float | None, png: Path) -> None:
    """Per scale, against the base (scale 0): the task gain, each general comparison's change with its 95%
    interval, and the KL to the base: the three things a scale trades, on one shared x axis of scales."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [0.0] + [r["scale"] for r in rows]
    fig, (task, general, kl) = plt.subplots(1, 3, figsize=(13, 4), sharex=True)
    gains = [0.0] + [
        100 * (r["task_tuned"] - r["task_base"]) if None not in (r["task_tuned"], r["task_base"]) else None
        for r in rows
    ]
    task.plot(scales, gains, "-o", color="tab:blue")
    task.set_ylabel("ROUGE-L F1 gain over the base, points")
    task.set_title("task (eval split)")
    series = _general_series(rows)
    for i, (label, points) in enumerate(series.items()):
        dodge = 0.015 * (i - (len(series) - 1) / 2)  # side by side, so the intervals do not hide each other
        xs = [x + dodge for x in [0.0] + [x for x, _ in points]]
        ys = [0.0] + [100 * g["diff"] for _, g in points]
        below = [0.0] + [100 * (g["diff"] - g["lo"]) for _, g in points]
        above = [0.0] + [100 * (g["hi"] - g["diff"]) for _, g in points]
        general.errorbar(xs, ys, yerr=[below, above], fmt="-o", capsize=3, label=label)
    general.axhline(0, color="black", linewidth=0.8)
    general.set_ylabel("accuracy change, points (95% interval)")
    general.set_title("general ability")
    if general.get_legend_handles_labels()[0]:
        general.legend(loc="lower left", fontsize="small")
    if all(r["kl"] is not None for r in rows):
        kl.plot(scales, [0.0] + [r["kl"] for r in rows], "-o", color="tab:red")
    kl.set_ylabel("KL(base || tuned), nats per token")
    kl.set_title("drift from the base")
    for ax in (task, general, kl):
        ax.set_xticks(scales, [f"{x:g}" for x in scales])
        ax.set_xlabel("adapter scale (0 = the base)")
        ax.grid(alpha=0.3)
        if chosen is not None:
            ax.axvline(chosen, color="tab:green", linestyle="--", linewidth=1)
    fig.suptitle(
        "Adapter scale: what each scale gains and costs"
        + (f" (chosen: {chosen:g}, dashed)" if chosen is not None else " (none kept general ability)")
    )
    fig.tight_layout()
    tmp = png.with_name("." + png.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png)
