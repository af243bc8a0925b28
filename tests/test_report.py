"""report.py: the report is drawn from metrics.json alone, so a saved evaluation can be redrawn."""

from __future__ import annotations

import json

from qlora_llm.config import load_config
from qlora_llm.evaluate import evaluate
from qlora_llm.report import headline, write_report


def test_a_report_redrawn_from_metrics_json_is_the_same_report(tiny_run, tmp_path):
    cfg = load_config(
        tiny_run / "config.yaml", [f"eval.output_dir={tmp_path / 'eval'}", "eval.max_examples=3"]
    )
    out = evaluate(cfg, tiny_run).output_dir
    metrics = json.loads((out / "metrics.json").read_text())
    again = tmp_path / "again"
    again.mkdir()
    write_report(metrics, again)  # no model, no metric library: only the saved figures
    for name in ("report.md", "report.html"):
        assert (again / name).read_text() == (out / name).read_text()
    assert (again / "metrics.png").stat().st_size > 10_000
    assert headline(metrics["table"], metrics["general"]) == metrics["headline"]
    # Named without a direction: the tuned model is as often the faster one.
    assert ". Speed: generation tokens/s (p50) " in metrics["headline"], metrics["headline"]
    md = (again / "report.md").read_text()
    rouge = next(r for r in metrics["table"] if r["metric"] == "rougeL")
    assert f"| {rouge['label']} | {rouge['base']:.4f} | {rouge['tuned']:.4f} |" in md


def test_speed_and_memory_within_five_percent_get_no_verdict_but_quality_does():
    from qlora_llm.report import _change_text

    def row(metric, better, base, tuned, fmt="{:.3f}"):
        return {
            "metric": metric,
            "better": better,
            "base": base,
            "tuned": tuned,
            "change": tuned - base,
            "relative": (tuned - base) / base,
            "format": fmt,
        }

    assert _change_text(row("ttft_s", "lower", 0.241, 0.242)) == "+0.001 (+0%)"
    assert _change_text(row("peak_memory_gib", "lower", 2.39, 2.47, "{:.2f}")) == "+0.08 (+3%)"
    assert _change_text(row("tokens_per_s", "higher", 24.6, 20.0, "{:.1f}")) == "-4.6 (-19%) ✗"
    # The same computation on both sides (a merged fine-tune): whatever the timing says, no verdict.
    noise = row("tokens_per_s", "higher", 24.6, 20.0, "{:.1f}") | {"timing_noise": True}
    assert _change_text(noise) == "-4.6 (-19%)"
    assert _change_text(row("perplexity_completion", "lower", 26.769, 26.7)) == "-0.069 (-0%) ✓"
