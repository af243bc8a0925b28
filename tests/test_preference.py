"""Preference tuning (DPO, ORPO) on the 4-bit base, with everything `train` guarantees."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
import torch
from conftest import read_metrics, tiny_overrides
from safetensors.torch import load_file

from qlora_llm.config import load_config
from qlora_llm.errors import TrainError
from qlora_llm.train import train

# beta 1: with DPO's usual 0.1 the tiny model needs ten times the steps to show the same move.
LEARNS = ("train.learning_rate=1e-2", "train.beta=1.0", "lora.dropout=0")

# General benchmarks are scored in tests/test_benchmarks.py: a few items keep these evaluations quick.
FEW_GENERAL = ["eval.general_limit=6", "eval.general_generative_limit=4", "eval.general_max_new_tokens=4"]


def pair_cfg(model, pairs, out, *extra, steps=40, every=20):
    return load_config(
        None, tiny_overrides(model, pairs, out, *LEARNS, *extra, steps=steps, batch=4, every=every)
    )


def adapter(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def test_dpo_loss_falls_and_reward_accuracy_rises_on_the_tiny_model(tiny_mistral, tiny_pairs, tmp_path):
    out = tmp_path / "dpo"
    result = train(pair_cfg(tiny_mistral, tiny_pairs, out, "train.method=dpo"))
    assert result.stopped == "completed" and result.global_step == 40
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    # Step 0: the policy is its reference, so every pair scores ln 2 and no margin.
    assert evals[0]["eval_loss"] == pytest.approx(0.6931, abs=1e-4) and evals[0]["eval_reward_margin"] == 0
    assert (
        evals[-1]["eval_loss"] < 0.6 and evals[-1]["eval_reward_accuracy"] > evals[0]["eval_reward_accuracy"]
    )
    assert evals[-1]["eval_reward_margin"] > 0.5
    final = out / "final_adapter"
    assert not (final / "ref").exists()  # the frozen reference copy is not part of the result
    assert json.loads((out / "manifest.json").read_text())["method"] == "dpo"
    assert (out / "loss.png").stat().st_size > 0


def test_dpo_resume_is_exact(tiny_mistral, tiny_pairs, tmp_path, monkeypatch):
    import qlora_llm.trainer as qtrainer

    straight = tmp_path / "straight"
    train(
        pair_cfg(
            tiny_mistral, tiny_pairs, straight, "train.method=dpo", "lora.dropout=0.1", steps=12, every=6
        )
    )
    real = qtrainer.trainer_class

    def interrupted(*a):
        class Interrupted(real(*a)):
            def training_step(self, *args, **kwargs):
                if self.state.global_step == 5:
                    os.kill(os.getpid(), signal.SIGTERM)
                return super().training_step(*args, **kwargs)

        return Interrupted

    monkeypatch.setattr(qtrainer, "trainer_class", interrupted)
    split = tmp_path / "split"
    cfg = pair_cfg(tiny_mistral, tiny_pairs, split, "train.method=dpo", "lora.dropout=0.1", steps=12, every=6)
    first = train(cfg)
    assert (first.stopped, first.global_step) == ("SIGTERM", 6)
    monkeypatch.undo()
    assert train(cfg, resume="auto").global_step == 12
    a, b = adapter(straight / "final_adapter"), adapter(split / "final_adapter")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_dpo_continues_an_sft_adapter_which_is_also_its_reference(
    tiny_mistral, tiny_data, tiny_pairs, tmp_path
):
    sft = tmp_path / "sft"
    train(load_config(None, tiny_overrides(tiny_mistral, tiny_data, sft, steps=4, batch=4, every=4)))
    out = tmp_path / "dpo"
    train(
        pair_cfg(tiny_mistral, tiny_pairs, out, "train.method=dpo", f"model.adapter={sft}", steps=8, every=4)
    )
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    # A reference other than the SFT adapter (the bare base) would score the SFT model apart from it at step 0.
    assert evals[0]["eval_reward_margin"] == 0 and evals[0]["eval_loss"] == pytest.approx(0.6931, abs=1e-4)
    start, tuned = adapter(sft / "final_adapter"), adapter(out / "final_adapter")
    assert start.keys() == tuned.keys() and any(not torch.equal(start[k], tuned[k]) for k in start)
    assert json.loads((out / "manifest.json").read_text())["start_adapter"] == str(sft)


def test_orpo_runs_end_to_end(tiny_mistral, tiny_pairs, tmp_path):
    out = tmp_path / "orpo"
    result = train(pair_cfg(tiny_mistral, tiny_pairs, out, "train.method=orpo", steps=8, every=4))
    assert result.stopped == "completed" and (out / "final_adapter" / "adapter_model.safetensors").is_file()
    rows = read_metrics(out)
    train_losses = [r["loss"] for r in rows if "loss" in r]
    assert len(train_losses) == 8 and all(l == l for l in train_losses)  # noqa: E741 - finite, logged each step
    assert any("eval_reward_accuracy" in r for r in rows)


@pytest.mark.parametrize("method, data, message", [
    ("sft", "pairs", "holds preference pairs: set train.method=dpo or orpo"),
    ("dpo", "examples", "train.method=dpo needs preference pairs (prompt, chosen, rejected)"),
])  # fmt: skip
def test_a_method_and_data_of_different_kinds_are_refused(
    tiny_mistral, tiny_data, tiny_pairs, tmp_path, method, data, message
):
    folder = tiny_pairs if data == "pairs" else tiny_data
    cfg = pair_cfg(tiny_mistral, folder, tmp_path / "run", f"train.method={method}")
    with pytest.raises(TrainError, match=re.escape(message)):
        train(cfg)


def test_evaluating_a_dpo_run_reports_reward_accuracy_base_vs_tuned(tiny_mistral, tiny_pairs, tmp_path):
    from qlora_llm.evaluate import evaluate

    out = tmp_path / "dpo"
    train(pair_cfg(tiny_mistral, tiny_pairs, out, "train.method=dpo"))
    cfg = load_config(None, ["model.device=cpu", "eval.max_new_tokens=4", "eval.speed_runs=1", *FEW_GENERAL])
    result = evaluate(cfg, out)
    rows = {r["metric"]: r for r in result.metrics["table"]}
    assert rows["reward_accuracy"]["base"] == 0 and rows["reward_accuracy"]["tuned"] >= 0.75
    assert rows["reward_margin"]["tuned"] > 0.5
    assert rows["preference_accuracy"]["tuned"] > rows["preference_accuracy"]["base"]
    assert "rougeL" in rows  # the usual metrics too, on the chosen answers
    report = (out / "eval" / "report.md").read_text()
    assert "reward accuracy" in report


def test_the_plan_counts_both_answers_and_the_reference_copy():
    from qlora_llm.plan import format_plan, plan

    sft, dpo = (plan(load_config("configs/smollm2-cpu.yaml", [f"train.method={m}"])) for m in ("sft", "dpo"))
    assert dpo.estimate.lora_weights == 2 * sft.estimate.lora_weights  # the frozen reference copy
    assert dpo.estimate.activations > 1.9 * sft.estimate.activations  # chosen and rejected: 2 x batch
    assert dpo.estimate.base_weights == sft.estimate.base_weights  # no second model
    assert "the reference is the base with a frozen copy of the adapter, not a second model" in format_plan(
        dpo
    )


def test_dpo_with_a_supervised_term_keeps_the_chosen_answers_likely(tiny_mistral, tiny_pairs, tmp_path):
    """train.sft_weight adds the NLL of the chosen answers (RPO): the chosen answers get more likely, not
    only more likely than the rejected ones."""
    from qlora_llm.evaluate import evaluate

    out = tmp_path / "rpo"
    train(
        pair_cfg(
            tiny_mistral, tiny_pairs, out, "train.method=dpo", "train.sft_weight=1.0", steps=20, every=10
        )
    )
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    assert evals[0]["eval_loss"] > 1.0  # ln 2 plus the chosen answers' NLL
    assert evals[-1]["eval_reward_accuracy"] > evals[0]["eval_reward_accuracy"]
    cfg = load_config(None, ["model.device=cpu", "eval.max_new_tokens=4", "eval.speed_runs=1", *FEW_GENERAL])
    rows = {r["metric"]: r for r in evaluate(cfg, out).metrics["table"]}
    assert rows["perplexity_completion"]["tuned"] < rows["perplexity_completion"]["base"]
