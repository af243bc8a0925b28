"""Levers against forgetting during training: the KL-to-base term and self-replay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import read_metrics, tiny_overrides

from qlora_llm.config import load_config
from qlora_llm.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # trains/evaluates several tiny runs: 75-115 s on the shared 2 cores
def test_kl_to_the_base_is_zero_at_step_zero_rises_and_is_logged(tiny_mistral, tiny_data, tmp_path):
    """train.kl_weight: KL(base || tuned) on the answer tokens, the base being the same model with the
    adapter disabled. LoRA's B starts at zero, so the first step's KL is exactly 0; then it rises. The
    first loss equals the run without the term (the same answer loss, computed from the full logits)."""

    def run(name, *extra):
        cfg = load_config(
            None,
            tiny_overrides(
                tiny_mistral, tiny_data, tmp_path / name, "lora.dropout=0", *extra, steps=8, batch=4, every=8
            ),
        )
        train(cfg)
        return [r for r in read_metrics(tmp_path / name) if "loss" in r]

    with_kl, plain = run("kl", "train.kl_weight=1.0"), run("plain")
    kl = [r["kl"] for r in with_kl]
    assert kl[0] == 0.0 and kl[-1] > 1e-3 and kl[-1] > kl[1]
    assert "kl" not in plain[0]
    assert with_kl[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-4)
    # The term pulls toward the base: the tuned model drifts less than without it, measured the same way.
    drift = run("kl-weighted", "train.kl_weight=5.0")
    assert drift[-1]["kl"] < kl[-1]


def test_self_replay_mixes_the_base_models_own_answers_with_their_source(tiny_mistral, tiny_data, tmp_path):
    """data.replay_fraction: general prompts answered by the base itself, generated once and cached (the
    second run reuses the file), recorded in the manifest like any data, each record marked as replay."""
    from qlora_llm.replay import ReplayError, read_prompts

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"Name a colour, number {i}."}) + "\n" for i in range(10))
    )
    extra = (
        "train.max_steps=2",
        "data.replay_fraction=0.25",
        f"data.replay_prompts={prompts}",
        "data.replay_max_new_tokens=6",
        f"model.cache_dir={tmp_path / 'cache'}",
    )
    cfg = load_config(
        None, tiny_overrides(tiny_mistral, tiny_data, tmp_path / "a", *extra, steps=2, batch=4, every=2)
    )
    train(cfg)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    (replay_file,) = [Path(p) for p in manifest["data"] if p.endswith(".jsonl") and "/replay/" in p]
    rows = [json.loads(x) for x in replay_file.read_text().splitlines()]
    assert rows and all(r["source"] == "replay" and r["output"] for r in rows)
    assert {r["instruction"] for r in rows} <= {f"Name a colour, number {i}." for i in range(10)}
    task = 28  # tiny_data's training examples (its eval file is separate)
    assert manifest["data"]["replay_examples"] == min(round(0.25 * task), len(rows))
    assert manifest["data"]["train_examples"] == task + manifest["data"]["replay_examples"]
    stamp = replay_file.stat().st_mtime_ns
    cfg.train.output_dir = tmp_path / "b"
    train(cfg)
    assert replay_file.stat().st_mtime_ns == stamp  # generated once, then reused

    prompts.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    with pytest.raises(ReplayError, match=r"prompts.jsonl, line 2: expected"):
        read_prompts(prompts)


def test_the_bundled_replay_prompts_are_not_evaluation_prompts():
    from qlora_llm.config import DataConfig
    from qlora_llm.replay import read_prompts

    replay = set(read_prompts(ROOT / DataConfig().replay_prompts))
    bench = {
        p["prompt"] for p in json.loads((ROOT / "configs" / "benchmark_prompts.json").read_text())["prompts"]
    }
    assert len(replay) >= 40 and not replay & bench
