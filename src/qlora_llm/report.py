"""The evaluation report: report.md, report.html and metrics.png from `evaluate`'s metrics dict.

Kept apart from the measuring (evaluate.py) so a report can be redrawn from a saved metrics.json
(`write_report(json.load(open(".../metrics.json")), out)`) without loading a model or a metric library.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from qlora_llm.atomic import atomic_file, atomic_write_text
from qlora_llm.benchmarks import stock_name


def interval_text(r: dict[str, Any]) -> str:
    """'+1.0 points (95% CI -2.0 to +4.0): no measurable loss'."""
    if r["diff"] is None:
        return "-"
    return (
        f"{r['diff'] * 100:+.1f} points (95% CI {r['lo'] * 100:+.1f} to {r['hi'] * 100:+.1f}): {r['verdict']}"
    )


def _general_sentence(g: dict[str, Any]) -> str:
    """General ability in one sentence: the likelihood mean (or the one task), each generative task, KL."""
    parts = []
    lik = [r for r in g["likelihood"] if r["metric"] == "acc"]
    mean = next((r for r in lik if r["task"] == "mean"), lik[0] if len(lik) == 1 else None)
    if mean is not None:
        what = f"mean of {len(lik) - 1} tasks" if mean["task"] == "mean" else stock_name(mean["task"])
        parts.append(
            f"likelihood benchmarks ({what}, lm-eval) acc {mean['base']:.1%} → {mean['tuned']:.1%}, "
            + interval_text(mean)
            if mean["base"] is not None
            else f"likelihood benchmarks ({what}, lm-eval) acc {mean['tuned']:.1%}"
        )
    for r in g["generative"]:
        parts.append(
            f"generative {stock_name(r['task'])} {r['base']:.1%} → {r['tuned']:.1%}, " + interval_text(r)
            if r["base"] is not None
            else f"generative {stock_name(r['task'])} {r['tuned']:.1%}"
        )
    if g["kl"] is not None:
        parts.append(f"KL(base‖tuned) {g['kl']['kl']:.4f} nats/token over {g['kl']['prompts']} prompts")
    return "General ability: " + "; ".join(parts) + "." if parts else ""


SHORT_LABELS = {
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
    "rougeLsum": "ROUGE-Lsum",
    "stop_rate": "stop rate",
    "benchmark_score": "benchmark",
    "perplexity_completion": "answers",
    "perplexity_full": "full text",
    "tokens_per_s": "tokens/s",
    "peak_memory_gib": "peak GiB",
}


def fmt_value(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _change_text(row: dict[str, Any]) -> str:
    if row["change"] is None:
        return "-"
    sign = "+" if row["change"] >= 0 else "-"
    if row["format"] == "{:.0%}":  # a change of a rate is in percentage points, not percent
        return f"{sign}{abs(row['change']) * 100:.0f} points" + _verdict(row)
    text = sign + fmt_value(abs(row["change"]), row["format"])
    if row["relative"] is not None:
        text += f" ({row['relative']:+.0%})"
    return text + _verdict(row)


# Speed and memory are timed once per model: a few percent either way is the host, not the fine-tune
# (TTFT 0.241 -> 0.242 s and peak memory +3% on the demo were marked worse), so no verdict under 5%.
MEASUREMENT_NOISE = {"tokens_per_s": 0.05, "ttft_s": 0.05, "peak_memory_gib": 0.05}


def _improved(row: dict[str, Any]) -> bool | None:
    """Whether the change is better (True), worse (False), or neither / within a measurement's noise."""
    if not row["change"] or row["better"] == "neither" or row.get("timing_noise"):
        return None
    noise = MEASUREMENT_NOISE.get(row["metric"])
    if noise is not None and row["relative"] is not None and abs(row["relative"]) < noise:
        return None
    return (row["change"] < 0) == (row["better"] == "lower")


def _verdict(row: dict[str, Any]) -> str:
    improved = _improved(row)
    return "" if improved is None else (" ✓" if improved else " ✗")


def _plot(
    table: list[dict[str, Any]], png: Path, has_base: bool, general: dict[str, Any] | None = None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [
        (
            "quality (higher is better)",
            ["rouge1", "rouge2", "rougeL", "rougeLsum", "stop_rate", "benchmark_score"],
        ),
        ("perplexity (lower is better)", ["perplexity_completion", "perplexity_full"]),
        ("speed and memory", ["tokens_per_s", "peak_memory_gib"]),
    ]
    by_key = {r["metric"]: r for r in table}
    accs = [r for r in (general or {}).get("likelihood", []) + (general or {}).get("generative", [])]
    accs = [r for r in accs if r["metric"] == "acc"]
    ratios = [3, 1.2, 1.2] + ([max(1.2, 0.6 * len(accs))] if accs else [])
    fig, axes = plt.subplots(
        1, len(ratios), figsize=(14 + 3 * bool(accs), 4.2), gridspec_kw={"width_ratios": ratios}
    )
    if accs:
        _plot_general(axes[3], accs, has_base, general["kl"])
    for ax, (title, keys) in zip(axes[:3], groups, strict=True):
        keys = [k for k in keys if by_key[k]["tuned"] is not None]
        x = range(len(keys))
        width = 0.38 if has_base else 0.6
        if has_base:
            ax.bar(
                [i - width / 2 for i in x],
                [by_key[k]["base"] or 0 for k in keys],
                width,
                label="base",
                color="#9aa5b1",
            )
        ax.bar(
            [i + (width / 2 if has_base else 0) for i in x],
            [by_key[k]["tuned"] for k in keys],
            width,
            label="fine-tuned",
            color="#2f6fdf",
        )
        ax.set_xticks(list(x), [SHORT_LABELS.get(k, k) for k in keys], rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(png, "wb") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _plot_general(ax: Any, rows: list[dict[str, Any]], has_base: bool, kl: dict[str, Any] | None) -> None:
    """Accuracy per general task, base vs fine-tuned, the fine-tuned bar with its paired 95% interval."""
    x = range(len(rows))
    width = 0.38 if has_base else 0.6
    if has_base:
        ax.bar([i - width / 2 for i in x], [r["base"] for r in rows], width, label="base", color="#9aa5b1")
    err = None
    if has_base:
        # The interval is on the difference; drawn around the fine-tuned bar it reads as "where tuned could be".
        err = [
            [r["tuned"] - (r["base"] + r["lo"]) for r in rows],
            [(r["base"] + r["hi"]) - r["tuned"] for r in rows],
        ]
        err = [[max(0.0, v) for v in side] for side in err]
    ax.bar(
        [i + (width / 2 if has_base else 0) for i in x],
        [r["tuned"] for r in rows],
        width,
        yerr=err,
        capsize=3,
        label="fine-tuned",
        color="#2f6fdf",
    )
    ax.set_xticks(list(x), [stock_name(r["task"]) for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    title = "general ability (accuracy)"
    if kl is not None:
        title += f"\nKL(base||tuned) {kl['kl']:.4f}/token"
    ax.set_title(title, fontsize=10)


def headline(table: list[dict[str, Any]], general: dict[str, Any] | None = None) -> str:
    """Did it help (answer perplexity, ROUGE-L), what ROUGE rewarded (precision, recall, length), what
    regressed, how fast it answers; then general ability (benchmarks with paired intervals, KL)."""
    by_key = {r["metric"]: r for r in table}
    tail = (" " + _general_sentence(general)) if general else ""
    if by_key["perplexity_completion"]["base"] is None:
        return "No comparison model: the figures below are the target's alone." + tail

    def moved(key: str) -> str:
        r = by_key[key]
        return f"{r['label']} {fmt_value(r['base'], r['format'])} → {fmt_value(r['tuned'], r['format'])}"

    def worse(key: str) -> bool:
        r = by_key[key]
        return bool(r["change"]) and (r["change"] > 0) == (r["better"] == "lower")

    if "reward_accuracy" in by_key:  # a preference run: first whether the pairs moved, then the answers
        text = f"Preference tuning: {moved('reward_accuracy')}; {moved('preference_accuracy')}. On the chosen answers: "
        text += "; ".join(moved(k) for k in ("perplexity_completion", "rougeL", "stop_rate"))
    else:
        helped = not worse("perplexity_completion") and not worse("rougeL")
        text = ("Fine-tuning helped: " if helped else "Fine-tuning did not clearly help: ") + "; ".join(
            moved(k)
            for k in ("perplexity_completion", "rougeL", "stop_rate")
            if by_key[k]["change"] is not None
        )
    if by_key["rougeL_precision"]["change"] is not None:
        p, r, w = by_key["rougeL_precision"], by_key["rougeL_recall"], by_key["answer_words"]
        text += (
            f". ROUGE-L precision {p['base']:.4f} → {p['tuned']:.4f}, recall {r['base']:.4f} → "
            f"{r['tuned']:.4f}; answers {w['base']:.1f} → {w['tuned']:.1f} words (references "
            f"{by_key['reference_words']['tuned']:.1f})"
        )
    regressed = [
        moved(k) for k in ("stop_rate", "benchmark_score") if by_key[k]["change"] is not None and worse(k)
    ]
    if regressed:
        text += ". Regressed: " + "; ".join(regressed)
    # "Speed", not "cost": timed at a fixed length, a merged fine-tune is the base's computation, an
    # unmerged adapter more of it.
    speed = moved("tokens_per_s")
    if by_key["tokens_per_s"].get("timing_noise"):
        speed += " (the base's shapes, merged: timing noise)"
    return text + f". Speed: {speed}." + tail


def _short(text: str, n: int = 400) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


GENERAL_SECTIONS = (
    (
        "likelihood",
        "General ability: likelihood benchmarks (what the model knows)",
        "Zero-shot multiple choice scored by lm-evaluation-harness (log-likelihood of each choice; acc_norm "
        "divides by the choice's length in characters), on the same seeded items for both models.",
    ),
    (
        "generative",
        "General ability: generative task (what the model does)",
        "Short-answer questions asked through the model's chat template, answered greedily; right when the "
        "answer contains the gold answer as whole words.",
    ),
)


def _general_md(g: dict[str, Any]) -> list[str]:
    md = []
    for kind, title, what in GENERAL_SECTIONS:
        if not g[kind]:
            continue
        md += [
            f"## {title}",
            "",
            what,
            "",
            "| task | metric | items | base | fine-tuned | change (paired 95% CI) |",
        ]
        md.append("|---|---|---|---|---|---|")
        for r in g[kind]:
            md.append(
                f"| {stock_name(r['task'])} | {r['metric']} | {r['n']} | {fmt_value(r['base'], '{:.1%}')} | "
                f"{fmt_value(r['tuned'], '{:.1%}')} | {interval_text(r)} |"
            )
        md.append("")
    md += ["## Drift from the base", ""]
    if g["kl"] is not None:
        md.append(
            f"Mean per-token KL(base ‖ tuned): **{g['kl']['kl']:.4f}** nats over {g['kl']['tokens']} tokens of "
            f"{g['kl']['prompts']} general prompts (each with the base model's own greedy answer)."
        )
    else:
        md.append(
            "KL(base ‖ tuned): not measured (no comparison model, no generative task, or kl_prompts=0)."
        )
    return md + [""]


def _general_html(g: dict[str, Any]) -> str:
    e = html.escape
    parts = []
    for kind, title, what in GENERAL_SECTIONS:
        if not g[kind]:
            continue
        rows = "".join(
            f"<tr><td>{e(stock_name(r['task']))}</td><td>{e(r['metric'])}</td><td>{r['n']}</td>"
            f"<td>{fmt_value(r['base'], '{:.1%}')}</td><td>{fmt_value(r['tuned'], '{:.1%}')}</td>"
            f'<td class="{"bad" if r["verdict"] == "measurable loss" else "good" if r["verdict"] else ""}">'
            f"{e(interval_text(r))}</td></tr>"
            for r in g[kind]
        )
        parts.append(
            f'<h2>{e(title)}</h2><p>{e(what)}</p><table id="general-{kind}"><thead><tr><th>task</th>'
            "<th>metric</th><th>items</th><th>base</th><th>fine-tuned</th><th>change (paired 95% CI)</th>"
            f"</tr></thead><tbody>{rows}</tbody></table>"
        )
    # Numbers and fixed text only: nothing here to escape, and escaping would print the <b> tags.
    kl = (
        f"Mean per-token KL(base ‖ tuned): <b>{g['kl']['kl']:.4f}</b> nats over {g['kl']['tokens']} tokens of "
        f"{g['kl']['prompts']} general prompts (each with the base model's own greedy answer)."
        if g["kl"] is not None
        else "KL(base ‖ tuned): not measured."
    )
    return "".join(parts) + f'<h2>Drift from the base</h2><p id="kl">{kl}</p>'


def write_report(metrics: dict[str, Any], out: Path) -> None:
    """report.md and report.html (one page) and metrics.png from the metrics dict."""
    has_base = metrics.get("base") is not None
    _plot(metrics["table"], out / "metrics.png", has_base, metrics.get("general"))
    atomic_write_text(out / "report.md", _markdown(metrics, has_base))
    atomic_write_text(out / "report.html", _html_page(metrics, has_base))


def _row_cells(r: dict[str, Any]) -> list[str]:
    """A comparison row as text: label, base, fine-tuned, change."""
    return [
        r["label"],
        fmt_value(r["base"], r["format"]),
        fmt_value(r["tuned"], r["format"]),
        _change_text(r),
    ]


def _columns(has_base: bool) -> list[str]:
    return ["metric", "base", "fine-tuned", "change"] if has_base else ["metric", "value"]


def _markdown(metrics: dict[str, Any], has_base: bool) -> str:
    table, cols = metrics["table"], _columns(has_base)
    md = [
        f"# Evaluation: {metrics['target']}",
        "",
        metrics["headline"],
        "",
        f"Data: `{metrics['data']['file']}` ({metrics['data']['examples']} examples, sha256 "
        f"`{metrics['data']['sha256'][:16]}…`). Base: `{metrics['compare'] or '-'}`. Greedy answers, "
        f"max {metrics['settings']['max_new_tokens']} new tokens.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in table:
        cells = _row_cells(r)
        md.append("| " + " | ".join(cells if has_base else [cells[0], cells[2]]) + " |")
    md += ["", "![metrics](metrics.png)", ""]
    if metrics.get("general"):
        md += _general_md(metrics["general"])
    md += ["## Benchmark prompts", ""]
    bench_rows = metrics["benchmark_prompts"]
    md.append("| id | base | fine-tuned |" if has_base else "| id | answer |")
    md.append("|---|---|---|" if has_base else "|---|---|")

    def md_cell(r: dict[str, Any]) -> str:
        return ("✓ " if r["passed"] else "✗ ") + _short(r["answer"], 160).replace("|", "\\|").replace(
            "\n", " "
        )

    for b in bench_rows:
        cell = md_cell
        md.append(
            f"| {b['id']} | {cell(b['base'])} | {cell(b['tuned'])} |"
            if has_base
            else f"| {b['id']} | {cell(b['tuned'])} |"
        )
    md += ["", "## Lowest-scoring examples (fine-tuned ROUGE-L)", ""]
    for w in metrics["worst_examples"]:
        md += [
            f"- example {w['index']}: ROUGE-L {w['tuned_rougeL']:.3f}",
            f"  - reference: {w['reference']}",
            f"  - fine-tuned: {w['tuned'] or '(empty)'}",
        ]
        if has_base:
            md.append(f"  - base: {w['base'] or '(empty)'}")
    if metrics["notes"]:
        md += ["", "## Notes", ""] + [f"- {n}" for n in metrics["notes"]]
    return "\n".join(md) + "\n"


def _html_page(metrics: dict[str, Any], has_base: bool) -> str:
    table, cols, bench_rows = metrics["table"], _columns(has_base), metrics["benchmark_prompts"]
    e = html.escape
    head_cells = "".join(f"<th>{e(c)}</th>" for c in cols)
    body = []
    for r in table:
        cells = _row_cells(r)
        cells = cells if has_base else [cells[0], cells[2]]
        improved = _improved(r) if has_base else None
        cls = "" if improved is None else (' class="good"' if improved else ' class="bad"')
        body.append(
            "<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells[:-1]) + f"<td{cls}>{e(cells[-1])}</td></tr>"
        )
    bench_html = []
    for b in bench_rows:

        def cell(r: dict[str, Any]) -> str:
            mark = '<span class="good">pass</span>' if r["passed"] else '<span class="bad">fail</span>'
            return f"<td>{mark} {e(r['answer'])}</td>"

        bench_html.append(
            f"<tr><td>{e(b['id'])}<br><small>{e(_short(b['prompt'], 200))}</small></td>"
            + (cell(b["base"]) if has_base else "")
            + cell(b["tuned"])
            + "</tr>"
        )
    worst_html = [
        f"<tr><td>{w['index']}</td><td>{e(w['reference'])}</td><td>{e(w['tuned'] or '(empty)')}"
        f"<br><small>ROUGE-L {w['tuned_rougeL']:.3f}</small></td>"
        + (
            f"<td>{e(w['base'] or '(empty)')}<br><small>ROUGE-L {w['base_rougeL']:.3f}</small></td>"
            if has_base
            else ""
        )
        + "</tr>"
        for w in metrics["worst_examples"]
    ]
    notes = "".join(f"<li>{e(n)}</li>" for n in metrics["notes"])
    versions = ", ".join(f"{k} {v}" for k, v in metrics["versions"].items())
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Evaluation: {e(metrics["target"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #1f2328; }}
table {{ border-collapse: collapse; margin: 1em 0; width: 100%; }}
th, td {{ border: 1px solid #d0d7de; padding: 6px 10px; text-align: left; vertical-align: top; font-size: 14px; }}
th {{ background: #f6f8fa; }}
.good {{ color: #1a7f37; font-weight: 600; }}
.bad {{ color: #cf222e; font-weight: 600; }}
.headline {{ font-size: 17px; padding: 10px 14px; background: #f6f8fa; border-left: 4px solid #2f6fdf; }}
img {{ max-width: 100%; }}
small {{ color: #57606a; }}
</style>
</head>
<body>
<h1>Evaluation: {e(metrics["target"])}</h1>
<p class="headline">{e(metrics["headline"])}</p>
<p>Data: <code>{e(str(metrics["data"]["file"]))}</code> ({metrics["data"]["examples"]} examples,
sha256 <code>{e(metrics["data"]["sha256"][:16])}…</code>). Base: <code>{e(str(metrics["compare"] or "-"))}</code>.
Greedy answers, at most {metrics["settings"]["max_new_tokens"]} new tokens.</p>
<table id="comparison"><thead><tr>{head_cells}</tr></thead><tbody>
{"".join(body)}
</tbody></table>
<img src="metrics.png" alt="metrics, base vs fine-tuned">
{_general_html(metrics["general"]) if metrics.get("general") else ""}
<h2>Benchmark prompts</h2>
<table id="benchmark"><thead><tr><th>prompt</th>{"<th>base</th>" if has_base else ""}<th>fine-tuned</th></tr></thead><tbody>
{"".join(bench_html)}
</tbody></table>
<h2>Lowest-scoring examples</h2>
<table id="worst"><thead><tr><th>#</th><th>reference</th><th>fine-tuned</th>{"<th>base</th>" if has_base else ""}</tr></thead><tbody>
{"".join(worst_html)}
</tbody></table>
{f"<h2>Notes</h2><ul>{notes}</ul>" if notes else ""}
<p><small>{e(versions)}</small></p>
</body>
</html>
"""
    return page
