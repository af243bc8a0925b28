"""Shared fixtures: the real Mistral tokenizer and a tiny random-weight Mistral model, built once per session.

Everything here is offline: the tokenizer is a test asset (tests/assets/mistral-tokenizer, the real
Mistral-7B-Instruct v0.1/v0.2 tokenizer from mistral-common), and the model is built from `MistralConfig`
with random weights, so the exact `[INST]` path is exercised without a download.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
MISTRAL_TOKENIZER = ROOT / "tests" / "assets" / "mistral-tokenizer"


@pytest.fixture(scope="session")
def mistral_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MISTRAL_TOKENIZER)


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory, mistral_tokenizer) -> Path:
    """A 2-layer, hidden-16 MistralForCausalLM with the real 32k Mistral tokenizer, saved as a HF folder."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(mistral_tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=mistral_tokenizer.bos_token_id,
        eos_token_id=mistral_tokenizer.eos_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-mistral")
    MistralForCausalLM(config).save_pretrained(folder)
    mistral_tokenizer.save_pretrained(folder)
    # save_pretrained drops `legacy`; the asset's config is the one that encodes like the Hub's v0.2.
    (folder / "tokenizer_config.json").write_text((MISTRAL_TOKENIZER / "tokenizer_config.json").read_text())
    return folder


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> Path:
    """A model cache holding the real SmolLM2-135M-Instruct, converted from the packaged GGUF once."""
    from qlora_llm.model import convert_builtin

    cache = tmp_path_factory.mktemp("qlora-cache")
    convert_builtin("smollm2-135m-instruct", cache)
    return cache


@pytest.fixture(scope="session")
def tiny_run(tiny_mistral, tmp_path_factory) -> Path:
    """A 3-step LoRA run of the tiny Mistral (non-zero adapter, dropout off), with eval data and one benchmark prompt."""
    from qlora_llm.config import load_config
    from qlora_llm.train import train

    folder = tmp_path_factory.mktemp("tiny-run")
    rows = [
        {"instruction": f"What comes after {w}?", "input": "", "output": f"{v} comes after {w}."}
        for w, v in zip("abcdefgh", "bcdefghi", strict=True)
    ] * 3
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:20]))
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[20:]))
    (folder / "bench.json").write_text(
        json.dumps(
            {"prompts": [{"id": "next", "set": "tiny", "prompt": "What comes after a?", "keywords": ["b"]}]}
        )
    )
    cfg = load_config(
        None,
        [
            f"model.name={tiny_mistral}",
            "model.device=cpu",
            f"data.train_file={folder / 'train.jsonl'}",
            f"data.eval_file={folder / 'eval.jsonl'}",
            "data.max_seq_length=64",
            f"train.output_dir={folder / 'run'}",
            "train.max_steps=3",
            "train.batch_size=4",
            "train.eval_steps=3",
            "train.save_steps=3",
            "train.learning_rate=5e-2",
            "train.warmup_ratio=0",
            "lora.dropout=0",
            f"eval.benchmark_prompts={folder / 'bench.json'}",
            "eval.max_new_tokens=4",
            "eval.speed_runs=2",
        ],
    )
    return train(cfg).run_dir


@pytest.fixture(scope="session")
def smollm2_run(smollm2_cache, tmp_path_factory) -> Path:
    """configs/smollm2-cpu.yaml on the real model (NF4 QLoRA), 2 steps on 8 short ACLSum papers, via the CLI.

    Trained once and shared by the slow evaluate and merge tests, which only read it (and write eval/ and
    merged/ inside it).
    """
    from qlora_llm.cli import main

    folder = tmp_path_factory.mktemp("smollm2-run")
    rows = [json.loads(x) for x in (ROOT / "data" / "aclsum" / "train.jsonl").read_text().splitlines()]
    short = [r for r in rows if len(r["input"]) < 700][:10]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short[:8]))
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short[8:]))
    run = folder / "run"
    overrides = [
        f"model.cache_dir={smollm2_cache}",
        f"data.train_file={folder / 'train.jsonl'}",
        f"data.eval_file={folder / 'eval.jsonl'}",
        f"train.output_dir={run}",
        "train.max_steps=2",
        "train.eval_steps=2",
        "train.save_steps=2",
        "train.batch_size=2",
    ]
    assert main(["train", str(ROOT / "configs" / "smollm2-cpu.yaml"), *overrides]) == 0
    return run
