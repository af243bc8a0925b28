"""The adapter-scale sweep: each scale evaluated on the run's eval split, the choice made by rule."""

from __future__ import annotations

import json

import pytest

from qlora_llm.config import load_config
from qlora_llm.sweep import SweepError, _general_series, choose, sweep_adapter_scale


def _row(scale, task, keeps):
    return {"scale": scale, "task_tuned": task, "keeps_general": keeps}


def test_the_best_task_metric_among_the_scales_that_keep_general_ability():
    rows = [_row(0.25, 0.20, True), _row(0.5, 0.24, True), _row(0.75, 0.26, False), _row(1.0, 0.27, False)]
    assert choose(rows) == 0.5
    assert choose([_row(0.5, 0.2, True), _row(1.0, 0.2, True)]) == 0.5  # a tie: the smaller change
    assert choose([_row(1.0, 0.3, False)]) is None  # none kept it: nothing is chosen


def test_the_plot_draws_the_likelihood_tasks_through_their_mean_and_each_generative_task():
    def general(kind, *names):
        return [{"task": n, "kind": kind, "diff": 0.01, "lo": 0.0, "hi": 0.02} for n in names]

    rows = [
        {"scale": s, "general": general("likelihood", "arc", "piqa", "mean") + general("generative", "qa")}
        for s in (0.5, 1.0)
    ]
    series = _general_series(rows)
    assert list(series) == ["likelihood tasks (mean)", "qa"]
    assert [x for x, _ in series["qa"]] == [0.5, 1.0]
    # One likelihood task has no mean: it is drawn itself.
    assert list(_general_series([{"scale": 1.0, "general": general("likelihood", "arc")}])) == ["arc"]


@pytest.mark.slow  # trains/evaluates several tiny runs: 75-115 s on the shared 2 cores
def test_a_sweep_on_the_tiny_run(tiny_run, tmp_path, capsys):
    """Scale 0 is the base: the same answers, no general change, KL 0. Scored on the run's eval split,
    even when the config names a test file."""
    from qlora_llm.cli import main

    general = [  # the run's config has none (conftest): a few items of one task of each kind
        "eval.general_tasks=[arc_easy]",
        "eval.general_generative=[basic_skills_common_knowledge]",
        "eval.general_limit=6",
        "eval.general_generative_limit=6",
        "eval.general_max_new_tokens=4",
    ]
    cfg = load_config(tiny_run / "config.yaml", [f"eval.data_file={tmp_path / 'never-read.jsonl'}", *general])
    result = sweep_adapter_scale(cfg, tiny_run, [1.0, 0.0], output_dir=tmp_path / "sweep")
    assert [r["scale"] for r in result.rows] == [0.0, 1.0]
    zero, one = result.rows
    assert zero["task_tuned"] == zero["task_base"] and zero["kl"] == pytest.approx(0.0, abs=1e-9)
    assert (
        len(zero["general"]) == 2 and all(g["diff"] == 0 for g in zero["general"]) and zero["keeps_general"]
    )
    assert one["kl"] > 0
    assert result.chosen in (0.0, 1.0) and result.chosen == choose(result.rows)
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert summary["chosen"] == result.chosen and len(summary["rows"]) == 2
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0
    for scale in ("0", "1"):
        metrics = json.loads((tmp_path / "sweep" / f"scale-{scale}" / "metrics.json").read_text())
        assert metrics["data"]["file"] == str(tiny_run.parent / "eval.jsonl")  # the eval split, not the test
    with pytest.raises(SweepError, match="no adapter scales"):
        sweep_adapter_scale(cfg, tiny_run, [])
    assert main(["evaluate", str(tiny_run), "--adapter-scales", "x", "model.device=cpu"]) == 2
    assert "--adapter-scales x: expected numbers" in capsys.readouterr().err
