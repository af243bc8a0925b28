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
    compared = [r for r in general["likelihood"] + general["generative"] if r["metric"] == "acc"]
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
            {k: r[k] for k in ("task", "base", "tuned", "diff", "lo", "hi", "verdict")} for r in compared
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


def _plot(rows: list[dict[str, Any]], chosen: float | None, png: Path) -> None:
    """Task metric against general accuracy, one point per scale, the base as a reference cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    xs = [r["general_mean_tuned"] for r in rows]
    ys = [r["task_tuned"] for r in rows]
    if all(x is not None for x in xs):
        ax.plot(xs, ys, "-o", color="tab:blue", label="fine-tuned at scale")
        for r in rows:
            ax.annotate(
                f"{r['scale']:g}" + (" (chosen)" if r["scale"] == chosen else ""),
                (r["general_mean_tuned"], r["task_tuned"]),
                textcoords="offset points",
                xytext=(6, 4),
            )
        base = rows[0]
        if base["general_mean_base"] is not None and base["task_base"] is not None:
            ax.plot([base["general_mean_base"]], [base["task_base"]], "kx", markersize=10, label="base")
        ax.set_xlabel("general ability: likelihood tasks, mean accuracy")
    else:
        ax.plot([r["scale"] for r in rows], ys, "-o", color="tab:blue")
        ax.set_xlabel("adapter scale (no general benchmarks were run)")
    ax.set_ylabel(f"task: {TASK_METRIC} F1 on the eval split")
    ax.set_title("Adapter scale: task gain vs general ability")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    tmp = png.with_name("." + png.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png)
