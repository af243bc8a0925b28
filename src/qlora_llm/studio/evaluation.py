"""A run's evaluation in the studio: the figures of RUN/eval/metrics.json, and its report served safely.

`qlora-llm evaluate RUN` writes RUN/eval/{metrics.json, report.html, metrics.png}. The run page shows the
task metric base vs tuned (ROUGE-L F1, the one `sweep` chooses by) with answer perplexity, the general
ability change (the likelihood benchmarks' mean, or the one task, with its paired 95% interval and
verdict; each task; KL) and embeds report.html; the runs page shows the task metric and general change.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, Response

from qlora_llm.studio.web import Refused, Studio, e, run_folder
from qlora_llm.sweep import TASK_METRIC
from qlora_llm.sweep import _row as sweep_row  # one reading of "task metric and general ability"

log = logging.getLogger(__name__)

# The files of RUN/eval/ a page may fetch, and their media types; nothing else under eval/ is served.
REPORT_FILES = {
    "report.html": "text/html; charset=utf-8",
    "report.md": "text/markdown; charset=utf-8",
    "metrics.json": "application/json",
    "metrics.png": "image/png",
}
# report.html is our own page, but it quotes the eval data and the model's answers: inside the studio's
# origin it may load its image and inline style, never a script, a form or another site.
REPORT_CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; frame-ancestors 'self'"
# metrics.json's value formats as evaluate writes them; a file holding another format string is not run.
FORMATS = {"{:.3f}", "{:.4f}", "{:.1f}", "{:.0%}"}
SHOWN = ("perplexity_completion", TASK_METRIC)  # the two figures evaluate's headline judges "helped" by


def eval_summary(run_dir: Path) -> dict[str, Any] | None:
    """RUN/eval/metrics.json reduced to what the pages show; None when the run has not been evaluated."""
    path = run_dir / "eval" / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
        row = sweep_row(1.0, metrics)
        rows = {r["metric"]: r for r in metrics["table"]}
        task = [rows[k] for k in SHOWN if k in rows]
    except (json.JSONDecodeError, KeyError, TypeError, StopIteration, UnicodeDecodeError):
        log.warning("%s: not a metrics.json written by `qlora-llm evaluate`", path)
        return {"error": "eval/metrics.json could not be read", "report": False}
    lik = [g for g in (metrics.get("general") or {}).get("likelihood", []) if g["metric"] == "acc"]
    mean = next((g for g in lik if g["task"] == "mean"), lik[0] if len(lik) == 1 else None)
    return {
        "headline": metrics.get("headline", ""),
        "task": task,
        "task_label": rows[TASK_METRIC]["label"],
        "task_base": row["task_base"],
        "task_tuned": row["task_tuned"],
        "general_mean": mean,
        "general": row["general"],
        "kl": row["kl"],
        "keeps_general": row["keeps_general"] if row["general"] else None,
        "report": (run_dir / "eval" / "report.html").is_file(),
    }


def _value(value: float | None, fmt: str = "{:.4f}") -> str:
    return "-" if value is None else (fmt if fmt in FORMATS else "{:.4g}").format(value)


def _points(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:+.1f} points"


def task_cell(summary: dict[str, Any] | None) -> str:
    """The runs page's task metric: 'ROUGE-L F1 0.1123 → 0.0943' (or the tuned value alone)."""
    if summary is None or "error" in summary:
        return ""
    if summary["task_base"] is None:
        return f"{summary['task_label']} {_value(summary['task_tuned'])}"
    return f"{summary['task_label']} {_value(summary['task_base'])} → {_value(summary['task_tuned'])}"


def general_cell(summary: dict[str, Any] | None) -> str:
    """The runs page's general-ability change: the benchmarks' mean (or one task) in points, and the verdict."""
    if summary is None or "error" in summary or summary["general_mean"] is None:
        return ""
    mean = summary["general_mean"]
    if mean["diff"] is None:
        return f"acc {mean['tuned']:.1%} (no base compared)"
    return f"{_points(mean['diff'])}: {mean['verdict']}"


def eval_section(name: str, summary: dict[str, Any] | None) -> str:
    """The run page's evaluation: the figures, the headline and the embedded report (or how to get one)."""
    if summary is None:
        return "<h2>Evaluation</h2><p id='evaluation'>Not evaluated yet: queue an evaluation below.</p>"
    if "error" in summary:
        return f"<h2>Evaluation</h2><p id='evaluation' class='error'>{e(summary['error'])}</p>"
    task = "".join(
        f"<tr><td>{e(r['label'])}</td><td>{_value(r['base'], r['format'])}</td>"
        f"<td>{_value(r['tuned'], r['format'])}</td><td>{_change(r)}</td></tr>"
        for r in summary["task"]
    )
    general = "".join(
        f"<tr><td>{e(g['task'])} acc</td><td>{_value(g['base'], '{:.0%}')}</td><td>{_value(g['tuned'], '{:.0%}')}</td>"
        f"<td>{_points(g['diff'])}"
        + (
            f" (95% CI {g['lo'] * 100:+.1f} to {g['hi'] * 100:+.1f}): {e(g['verdict'])}"
            if g["diff"] is not None
            else ""
        )
        + "</td></tr>"
        for g in summary["general"]
    )
    kl = f"<tr><td>KL(base ‖ tuned) per token</td><td></td><td>{_value(summary['kl'])}</td><td></td></tr>"
    report = ""
    if summary["report"]:
        src = f"/runs/{e(name)}/eval/report.html"
        report = (
            f"<p><a id='report-link' href='{src}' target='_blank'>The full report</a> "
            f"(also <a href='/runs/{e(name)}/eval/metrics.json'>metrics.json</a>)</p>"
            f"<iframe id='report' src='{src}' sandbox='allow-same-origin' width='100%' height='600'></iframe>"
        )
    return (
        "<h2>Evaluation</h2><div id='evaluation'>"
        f"<p class='headline'>{e(summary['headline'])}</p>"
        "<table id='eval-metrics'><tr><th>metric</th><th>base</th><th>fine-tuned</th><th>change</th></tr>"
        f"{task}{general}{kl if summary['kl'] is not None else ''}</table>{report}</div>"
    )


def _change(row: dict[str, Any]) -> str:
    if row["change"] is None:
        return "-"
    if row["format"] == "{:.0%}":
        return _points(row["change"])
    sign = "+" if row["change"] >= 0 else "-"
    text = sign + _value(abs(row["change"]), row["format"])
    return text + (f" ({row['relative']:+.0%})" if row["relative"] is not None else "")


def add_routes(app: FastAPI, studio: Studio) -> None:
    @app.get("/runs/{name}/eval/{file}")
    def eval_file(name: str, file: str) -> Response:
        """One of RUN/eval/'s report files; pages show paths relative to the studio's folders."""
        if file not in REPORT_FILES:
            raise Refused(404, "no such report file")
        path = run_folder(studio.runs, name) / "eval" / file
        if not path.is_file() or not path.resolve().is_relative_to(studio.runs.resolve()):
            raise Refused(404, "no such report file")
        headers = {"Content-Security-Policy": REPORT_CSP, "X-Content-Type-Options": "nosniff"}
        if file.endswith(".png"):
            return FileResponse(path, media_type=REPORT_FILES[file], headers=headers)
        text = studio.hide_paths(path.read_text(encoding="utf-8", errors="replace"))
        return Response(text, media_type=REPORT_FILES[file], headers=headers)
