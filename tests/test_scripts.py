"""The seed's own layout: scripts/prepare_data.py, train.py and evaluate.py run the same code as the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import MISTRAL_TOKENIZER

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


def script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_prepare_train_evaluate_through_the_seed_scripts(tiny_mistral, tmp_path):
    raw = tmp_path / "raw.jsonl"
    rows = [
        {"instruction": f"What comes after {w} {i}?", "output": f"{WORDS[(k + 1) % 8]}"}
        for i in range(3)
        for k, w in enumerate(WORDS)
    ]
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = script(
        "prepare_data.py",
        str(raw),
        "--model",
        str(MISTRAL_TOKENIZER),
        "--eval-fraction",
        "0.25",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "wrote 18 train, 6 eval" in done.stdout
    assert (tmp_path / "data" / "train.jsonl").is_file()  # the seed's data/ folder by default

    (tmp_path / "tiny.yaml").write_text(
        f"model: {{name: {tiny_mistral}, device: cpu}}\n"
        "data: {train_file: data/train.jsonl, eval_file: data/eval.jsonl, max_seq_length: 64}\n"
        "train: {output_dir: models/qlora-model, max_steps: 2, batch_size: 4, eval_steps: 1, save_steps: 2}\n"
        "eval: {benchmark_prompts: null, max_new_tokens: 3, speed_runs: 1, general_limit: 6,"
        " general_generative_limit: 4, general_max_new_tokens: 4}\n"
    )
    done = script("train.py", "--config", "tiny.yaml", "train.learning_rate=1e-2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "models" / "qlora-model" / "final_adapter" / "adapter_config.json").is_file()

    done = script("evaluate.py", "--model", "models/qlora-model", "--data", "data/eval.jsonl", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "perplexity (answers)" in done.stdout
    metrics = json.loads((tmp_path / "models" / "qlora-model" / "eval" / "metrics.json").read_text())
    assert metrics["data"]["examples"] == 6 and metrics["base"] is not None


def test_evaluate_script_says_what_is_missing(tmp_path):
    done = script("evaluate.py", cwd=tmp_path)
    assert done.returncode == 2 and "runs/smollm2-aclsum is not here: run `make demo`" in done.stderr
