"""Evaluation: perplexity against a direct per-token computation, ROUGE against rouge-score, keyword
benchmarks, and the whole report on a tiny trained run (checked in headless Chromium when installed)."""

from __future__ import annotations

import html.parser
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from qlora_llm.config import load_config
from qlora_llm.evaluate import (
    EvalError,
    _windows,
    compute_rouge,
    evaluate,
    load_benchmark_prompts,
    score_keywords,
    score_tokens,
)
from qlora_llm.model import load_target

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tiny_mistral):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_mistral, dtype=torch.float32).eval()


def random_rows(lengths: list[int], prompt_len: int = 3, seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = [1] + torch.randint(100, 30000, (n - 1,), generator=g).tolist()
        rows.append({"input_ids": ids, "completion_mask": [0] * prompt_len + [1] * (n - prompt_len)})
    return rows


def direct_nll(model, row: dict[str, list[int]]) -> tuple[float, int, float, int]:
    """Token by token, no batching, no padding: the definition the batched code must match."""
    ids = torch.tensor([row["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    full = comp = 0.0
    n_full = n_comp = 0
    for t in range(1, len(row["input_ids"])):
        nll = -float(logp[t - 1, row["input_ids"][t]])
        full, n_full = full + nll, n_full + 1
        if row["completion_mask"][t]:
            comp, n_comp = comp + nll, n_comp + 1
    return full, n_full, comp, n_comp


@pytest.mark.parametrize("tile_tokens", [None, 3])
def test_perplexity_matches_direct_per_token_computation(tiny_model, monkeypatch, tile_tokens):
    if tile_tokens:  # the LM head over 3 positions at a time: tiles end inside rows and inside padding
        vocab = tiny_model.get_output_embeddings().weight.shape[0]
        monkeypatch.setattr("qlora_llm.evaluate.EVAL_LOGITS_TILE_BYTES", 8 * vocab * tile_tokens)
    rows = random_rows([7, 12, 5, 20, 9])
    got = score_tokens(tiny_model, rows, batch_size=3).perplexity()  # batches mix lengths: padding present
    direct = [direct_nll(tiny_model, r) for r in rows]
    full = math.exp(sum(d[0] for d in direct) / sum(d[1] for d in direct))
    comp = math.exp(sum(d[2] for d in direct) / sum(d[3] for d in direct))
    assert got["perplexity_full"] == pytest.approx(full, rel=1e-4)
    assert got["perplexity_completion"] == pytest.approx(comp, rel=1e-4)
    # Token-weighted over the set, not a mean of per-example perplexities (which differs here).
    mean_of_ppl = sum(math.exp(d[2] / d[3]) for d in direct) / len(direct)
    assert abs(got["perplexity_completion"] - mean_of_ppl) > 1e-3
    assert got["tokens_full"] == sum(len(r["input_ids"]) - 1 for r in rows)
    assert got["tokens_completion"] == sum(sum(r["completion_mask"][1:]) for r in rows)


def test_padding_is_never_scored(tiny_model):
    rows = random_rows([4, 30, 6])
    one = score_tokens(tiny_model, rows, batch_size=1)
    padded = score_tokens(tiny_model, rows, batch_size=3)  # the short rows carry 26 and 24 pads
    assert padded.tokens_full == one.tokens_full == [3, 29, 5]
    for a, b in zip(padded.nll_full, one.nll_full, strict=True):
        assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize(
    ("length", "window", "stride"), [(50, 16, 8), (50, 16, 15), (17, 16, 4), (5, 16, 8), (2, 2, 1)]
)
def test_sliding_windows_score_every_token_exactly_once(length, window, stride):
    scored = []
    for begin, end, first in _windows(length, window, stride):
        assert end - begin <= window and begin < first
        scored += range(first, end)
    assert scored == list(range(1, length))


def test_long_texts_are_scored_with_a_strided_window(tiny_model):
    row = random_rows([50])[0]
    got = score_tokens(tiny_model, [row], max_length=16, stride=8)
    assert got.tokens_full == [49]
    # By hand: each window scores its new tokens with the window's own context.
    ids, expected = row["input_ids"], 0.0
    for begin, end, first in _windows(50, 16, 8):
        with torch.no_grad():
            logp = torch.log_softmax(
                tiny_model(input_ids=torch.tensor([ids[begin:end]])).logits[0].double(), -1
            )
        expected -= sum(float(logp[t - begin - 1, ids[t]]) for t in range(first, end))
    assert got.nll_full[0] == pytest.approx(expected, rel=1e-4)
    # A window as long as the text is the plain computation.
    whole = score_tokens(tiny_model, [row], max_length=64, stride=8)
    assert whole.nll_full[0] == pytest.approx(direct_nll(tiny_model, row)[0], rel=1e-4)
    with pytest.raises(EvalError, match="stride 16 must be between 1 and the window 16 - 1"):
        score_tokens(tiny_model, [row], max_length=16, stride=16)


def test_rouge_known_pairs_against_rouge_score():
    from rouge_score import rouge_scorer

    identical = compute_rouge(["The cat sat on the mat."], ["The cat sat on the mat."])
    assert all(identical[k] == 1.0 for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"))
    disjoint = compute_rouge(["dogs bark loudly"], ["the cat sat on the mat"])
    assert all(disjoint[k] == 0.0 for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"))
    # By hand: unigrams the,the,cat,on shared of 6 each -> 4/6; bigrams "the cat","on the" of 5 -> 2/5;
    # LCS "the cat on the" -> 4/6.
    partial = compute_rouge(["the cat sat on the mat"], ["the cat lay on the rug"])
    assert partial["rouge1"] == pytest.approx(4 / 6)
    assert partial["rouge2"] == pytest.approx(2 / 5)
    assert partial["rougeL"] == pytest.approx(4 / 6)
    # Stemming on: "running" and "runs" both stem to "run".
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    stemmed = compute_rouge(["he runs"], ["he running"])
    assert stemmed["rouge1"] == pytest.approx(scorer.score("he running", "he runs")["rouge1"].fmeasure) == 1.0
    # The mean is over examples, and each example's scores are kept.
    both = compute_rouge(["the cat sat on the mat", "dogs bark"], ["the cat sat on the mat", "cats meow"])
    assert both["rouge1"] == 0.5 and [e["rouge1"] for e in both["per_example"]] == [1.0, 0.0]
    japanese = compute_rouge(["東京は日本の首都です"], ["東京は日本の首都です"])
    assert japanese["texts_mostly_non_ascii"] == 2 and japanese["rouge1"] == 0.0  # the stated limit


def test_benchmark_keywords_and_the_shipped_prompts(tmp_path):
    assert score_keywords("The capital is PARIS.", ["paris"]) == {"passed": True, "matched": ["paris"]}
    assert score_keywords("They propose a parser.", ["propose", "relation"], 2)["passed"] is False
    assert score_keywords("They propose relation extraction.", ["propose", "relation"], 2)["passed"] is True
    shipped = load_benchmark_prompts(ROOT / "configs" / "benchmark_prompts.json")
    assert {p["set"] for p in shipped} == {"aclsum", "general"} and len(shipped) >= 10
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"prompts": [{"id": "a", "prompt": "hi", "keywords": []}]}))
    with pytest.raises(EvalError) as err:
        load_benchmark_prompts(bad)
    assert str(err.value) == f'{bad}: prompts[0]: "keywords" must be a non-empty list of strings.'
    bad.write_text('{"prompts": [\n  {"id": "a",}\n]}')
    with pytest.raises(EvalError, match=r"b\.json:2: invalid JSON"):
        load_benchmark_prompts(bad)


# --------------------------------------------------------------------------------------------------
# The whole stage on a tiny trained run


class _Checker(html.parser.HTMLParser):
    VOID = {"meta", "img", "br", "link", "hr", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def test_evaluate_run_writes_the_comparison_report(tiny_run, tmp_path):
    cfg = load_config(tiny_run / "config.yaml")
    result = evaluate(cfg, tiny_run)
    out = tiny_run / "eval"
    assert result.output_dir == out
    assert {p.name for p in out.iterdir()} == {
        "metrics.json",
        "examples.jsonl",
        "report.md",
        "report.html",
        "metrics.png",
    }
    m = json.loads((out / "metrics.json").read_text())
    assert m["kind"] == "run" and m["compare"] == cfg.model.name
    assert m["data"]["examples"] == 4 and len(m["data"]["sha256"]) == 64
    assert {"torch", "transformers", "peft", "rouge-score"} <= set(m["versions"])
    for side in ("base", "tuned"):
        s = m[side]
        assert s["perplexity_completion"] > 1 and s["perplexity_full"] > 1
        assert 0 <= s["rougeL"] <= 1 and 0 <= s["stop_rate"] <= 1
        assert s["speed"]["runs"] == 2 and s["speed"]["tokens_per_s"]["p50"] > 0
        assert (
            s["memory"]["kind"] == "cpu peak RSS"
            and 0 < s["memory"]["peak_bytes"] < s["memory"]["total_bytes"]
        )
    # Training moved the answers' likelihood, so base and fine-tuned differ, and the table says by how much.
    ppl = next(r for r in m["table"] if r["metric"] == "perplexity_completion")
    assert ppl["change"] == pytest.approx(ppl["tuned"] - ppl["base"]) and ppl["change"] != 0
    assert [b["id"] for b in m["benchmark_prompts"]] == ["next"]
    assert {"base", "tuned"} <= set(m["benchmark_prompts"][0])
    # Merged in memory, the fine-tune runs the base's shapes: its speed rows are timing noise, no verdict.
    timed = {r["metric"]: r.get("timing_noise") for r in m["table"]}
    assert timed["tokens_per_s"] and timed["ttft_s"] and not timed["peak_memory_gib"] and not timed["rougeL"]
    assert "(the base's shapes, merged: timing noise)" in m["headline"]
    assert any(
        n.startswith("Speed: the fine-tuned model computes with the base's exact shapes") for n in m["notes"]
    )
    examples = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert len(examples) == 4 and {"reference", "base", "tuned"} <= set(examples[0])
    md = (out / "report.md").read_text()
    assert "| perplexity (answers) |" in md and "![metrics](metrics.png)" in md
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    page = (out / "report.html").read_text()
    checker = _Checker()
    checker.feed(page)
    assert checker.errors == [] and checker.stack == []
    assert {"table", "img", "h1"} <= set(checker.tags)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:
        shot = tmp_path / "report.png"
        run = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                f"--screenshot={shot}",
                "--window-size=1200,1600",
                (out / "report.html").as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        assert shot.stat().st_size > 10_000  # a rendered page, not a blank one


def test_adapter_unmerged_and_merged_give_the_same_perplexity(tiny_run):
    from qlora_llm.data import load_examples
    from qlora_llm.evaluate import tokenize_for_scoring

    loaded = load_target(tiny_run, device="cpu")
    rows = tokenize_for_scoring(
        load_examples(tiny_run.parent / "eval.jsonl"), loaded.tokenizer, loaded.template
    )
    unmerged = score_tokens(loaded.model, rows).perplexity()
    base = load_target(tiny_run, device="cpu", adapter=False)
    merged_in_memory = load_target(tiny_run, device="cpu", merge=True)  # what evaluate scores
    from peft.tuners.lora import LoraLayer

    assert not any(isinstance(m, LoraLayer) for m in merged_in_memory.model.modules())
    merged = score_tokens(merged_in_memory.model, rows).perplexity()
    # Relative: the tiny random model's perplexity is in the tens of thousands.
    assert merged["perplexity_completion"] == pytest.approx(unmerged["perplexity_completion"], rel=1e-6)
    assert merged["perplexity_full"] == pytest.approx(unmerged["perplexity_full"], rel=1e-6)
    # The adapter does something: the base alone scores differently.
    base_ppl = score_tokens(base.model, rows).perplexity()["perplexity_completion"]
    assert base_ppl != pytest.approx(unmerged["perplexity_completion"], rel=1e-3)


def test_evaluate_without_data_names_the_fix(tiny_mistral):
    cfg = load_config(None, ["model.device=cpu", "eval.benchmark_prompts=null"])
    with pytest.raises(EvalError, match=r"no evaluation data for .*: pass --data FILE"):
        evaluate(cfg, str(tiny_mistral))


def test_cli_evaluate_prints_the_table(tiny_run, tmp_path, capsys):
    from qlora_llm.cli import main

    assert main(["evaluate", str(tiny_run), "--compare", "none", "--output-dir", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    assert "perplexity (answers)" in printed and "No comparison model" in printed
    assert f"report: {tmp_path / 'ev' / 'report.html'}" in printed
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["base"] is None and m["compare"] is None
    assert main(["evaluate", str(tiny_run), "--data", str(tmp_path / "missing.jsonl")]) == 1
    assert "missing.jsonl: evaluation data not found. Pass --data FILE" in capsys.readouterr().err


@pytest.mark.slow
def test_real_smollm2_run_from_the_shipped_config_is_evaluated(smollm2_run, smollm2_cache, capsys):
    """configs/smollm2-cpu.yaml on the real model, briefly trained, evaluated on the real ACLSum test set."""
    from qlora_llm.cli import main

    evals = [
        f"model.cache_dir={smollm2_cache}",
        "eval.max_examples=3",
        "eval.max_new_tokens=16",
        "eval.speed_runs=1",
        # General benchmarks are scored in tests/test_benchmarks.py: a few items keep this one quick.
        "eval.general_limit=8",
        "eval.general_generative_limit=4",
    ]
    assert main(["evaluate", str(smollm2_run), *evals]) == 0
    m = json.loads((smollm2_run / "eval" / "metrics.json").read_text())
    assert m["data"]["file"] == "data/aclsum/test.jsonl" and m["compare"] == "smollm2-135m-instruct"
    assert m["tuned"]["perplexity_completion"] != m["base"]["perplexity_completion"]
    # A real instruct model prompted through its own template answers a plain question.
    france = next(b for b in m["benchmark_prompts"] if b["id"] == "capital-france")
    assert france["base"]["passed"] and "Paris" in france["base"]["answer"]
    assert (smollm2_run / "eval" / "report.html").is_file() and "Fine-tuning" in capsys.readouterr().out


def test_the_base_evaluation_is_computed_once_per_model_data_and_settings(tiny_run, tmp_path, caplog):
    cfg = load_config(tiny_run / "config.yaml", [f"eval.output_dir={tmp_path / 'a'}"])
    first = evaluate(cfg, tiny_run).metrics
    with caplog.at_level("INFO", logger="qlora_llm.evaluate"):
        again = evaluate(cfg, tiny_run).metrics
    assert again["base"] == first["base"] and again["tuned"]["speed"] != first["tuned"]["speed"]
    assert any("reusing its evaluation" in r.getMessage() for r in caplog.records)
    assert any("computed by an earlier evaluation" in n for n in again["notes"])
    assert not any(n.startswith("Peak memory:") for n in again["notes"])  # the base's was measured apart
    caplog.clear()
    other = load_config(
        tiny_run / "config.yaml", [f"eval.output_dir={tmp_path / 'b'}", "eval.max_new_tokens=3"]
    )
    with caplog.at_level("INFO", logger="qlora_llm.evaluate"):
        changed = evaluate(other, tiny_run).metrics
    assert not any("reusing its evaluation" in r.getMessage() for r in caplog.records)
    assert not any("computed by an earlier evaluation" in n for n in changed["notes"])
    # The base computed here (`first` may reuse another test's base figures), in a process of its own.
    [apart] = [
        r.getMessage() for r in caplog.records if "evaluated in a process of its own" in r.getMessage()
    ]
    assert int(re.search(r"pid (\d+)", apart).group(1)) != os.getpid()
    assert any(
        n.startswith("Peak memory: each model's is the resident peak of the process")
        for n in changed["notes"]
    )


def _vm_hwm() -> int:
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def test_evaluation_measures_its_peak_without_erasing_the_process_peak(tiny_run, tmp_path):
    """/usr/bin/time and rusage report the process's high-water mark; evaluating must not reset it."""
    import torch

    block = torch.ones(400 * 2**20, dtype=torch.uint8)  # 400 MiB resident, then freed
    block.add_(1)
    del block
    before = _vm_hwm()
    cfg = load_config(tiny_run / "config.yaml", [f"eval.output_dir={tmp_path}", "eval.compare=none"])
    m = evaluate(cfg, tiny_run).metrics
    assert _vm_hwm() >= before
    assert 0 < m["tuned"]["memory"]["peak_bytes"] < before  # the model's own peak, not the process's


def test_only_a_merged_fine_tune_against_its_own_base_is_timed_as_the_same_computation(tiny_run):
    from qlora_llm.evaluate import _same_computation
    from qlora_llm.model import find_target

    cfg = load_config(tiny_run / "config.yaml")
    found = find_target(str(tiny_run), cfg.model)
    assert _same_computation(cfg, found, None) and _same_computation(cfg, found, "auto")
    assert not _same_computation(cfg, found, "another-model")  # other shapes, perhaps
    # On a 4-bit base the adapter stays unmerged: extra matmuls, a real difference in speed.
    assert not _same_computation(
        load_config(tiny_run / "config.yaml", ["eval.quantization=nf4"]), found, None
    )
