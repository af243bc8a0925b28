"""Levers against forgetting during training: the KL-to-base term."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_overrides

from qlora_llm.config import load_config
from qlora_llm.train import train


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


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
        return [r for r in _rows(tmp_path / name) if "loss" in r]

    with_kl, plain = run("kl", "train.kl_weight=1.0"), run("plain")
    kl = [r["kl"] for r in with_kl]
    assert kl[0] == 0.0 and kl[-1] > 1e-3 and kl[-1] > kl[1]
    assert "kl" not in plain[0]
    assert with_kl[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-4)
    # The term pulls toward the base: the tuned model drifts less than without it, measured the same way.
    drift = run("kl-weighted", "train.kl_weight=5.0")
    assert drift[-1]["kl"] < kl[-1]
