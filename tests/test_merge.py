"""Merge: full-precision base + adapter -> a verified, plain-transformers folder, written atomically;
and the merged model evaluates like the unmerged adapter."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from qlora_llm.data import load_examples
from qlora_llm.evaluate import score_tokens, tokenize_for_scoring
from qlora_llm.merge import MergeError, merge
from qlora_llm.model import load_target


@pytest.fixture(scope="module")
def merged(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "model"
    return merge(tiny_run, out, device="cpu", benchmark_prompts=tiny_run.parent / "bench.json")


def test_merged_folder_is_plain_transformers_and_matches_the_adapter(merged, tiny_run, tiny_mistral):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merged.out_dir
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "manifest.json",
        "config.yaml",
        "merge_verification.json",
    } <= {p.name for p in out.iterdir()}
    assert not any(p.name.startswith("adapter") for p in out.iterdir())
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # full precision, never merged into 4-bit
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.float32
    adapter = load_target(tiny_run, device="cpu")
    ids = tokenizer("[INST] What comes after a? [/INST]", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, adapter.model(ids).logits, atol=1e-4, rtol=1e-4)
    # The LoRA delta went into the weights: q_proj differs from the base, the embeddings do not.
    base, new = load_file(tiny_mistral / "model.safetensors"), load_file(out / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(base[q], new[q])
    assert torch.equal(base["model.embed_tokens.weight"], new["model.embed_tokens.weight"])
    v = json.loads((out / "merge_verification.json").read_text())
    assert v["passed"] and v["logits"]["max_abs_diff"] <= v["logits"]["tolerance"] == 1e-3
    assert v["greedy_answers"]["identical"] == v["greedy_answers"]["prompts"] == 1
    # Scored on the run's own eval examples; answered on the benchmark prompts.
    assert v["logits"]["from"] == str(tiny_run.parent / "eval.jsonl") and v["logits"]["sequences"] == 4
    assert v["greedy_answers"]["from"] == str(tiny_run.parent / "bench.json")
    assert merged.verification == v
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}


def test_merged_and_unmerged_perplexity_agree(merged, tiny_run):
    records = load_examples(tiny_run.parent / "eval.jsonl")
    unmerged = load_target(tiny_run, device="cpu")
    as_merged = load_target(merged.out_dir, device="cpu")
    assert as_merged.target.kind == "merged" and as_merged.template == unmerged.template == "mistral"
    rows = tokenize_for_scoring(records, unmerged.tokenizer, unmerged.template)
    a, b = score_tokens(unmerged.model, rows).perplexity(), score_tokens(as_merged.model, rows).perplexity()
    # Relative: the tiny random model's perplexity is in the tens of thousands.
    assert a["perplexity_completion"] == pytest.approx(b["perplexity_completion"], rel=1e-6)
    assert a["perplexity_full"] == pytest.approx(b["perplexity_full"], rel=1e-6)


def test_merge_refuses_to_overwrite_and_leaves_nothing_on_failure(
    tiny_run, tmp_path, monkeypatch, tiny_mistral
):
    out = tmp_path / "m"
    out.mkdir()
    with pytest.raises(MergeError, match=r"already exists; pass --force"):
        merge(tiny_run, out, device="cpu")
    for source in (tiny_run, tiny_run / "final_adapter", tiny_run.parent):
        with pytest.raises(MergeError, match="would replace the adapter being merged"):
            merge(tiny_run, source, device="cpu", force=True)
    with pytest.raises(MergeError, match="has no LoRA adapter to merge"):
        merge(tiny_mistral, tmp_path / "x", device="cpu")
    from transformers import PreTrainedModel

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        merge(tiny_run, tmp_path / "half", device="cpu", benchmark_prompts=tiny_run.parent / "bench.json")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no half-written folder, no staging left


def test_a_merge_that_does_not_verify_writes_nothing(tiny_run, tmp_path):
    with pytest.raises(MergeError, match=r"does not match the adapter model .* nothing was written"):
        merge(
            tiny_run,
            tmp_path / "m",
            device="cpu",
            tolerance=-1.0,
            benchmark_prompts=tiny_run.parent / "bench.json",
        )
    assert not (tmp_path / "m").exists()


def test_merge_loads_the_base_unquantized_and_refuses_quantized_weights(tiny_run, tmp_path, monkeypatch):
    import qlora_llm.merge as merge_module

    calls = []

    def quantized(target, **kwargs):
        calls.append(kwargs)
        loaded = load_target(target, **kwargs)
        # What a 4-bit load (or a base saved pre-quantized) looks like to transformers.
        loaded.model.config.quantization_config = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
        return loaded

    monkeypatch.setattr(merge_module, "load_target", quantized)
    with pytest.raises(MergeError, match=r"loaded quantized; .* only into full-precision weights"):
        merge(tiny_run, tmp_path / "m", device="cpu")
    # The run trained with model.quantization=nf4 (the default); the merge still loads the base unquantized.
    assert calls == [{"device": "cpu", "quantization": "none"}]
    assert not (tmp_path / "m").exists()


def test_merge_of_a_run_takes_the_compute_dtype_it_is_given(tiny_run, tmp_path, capsys):
    from qlora_llm.cli import main

    out = tmp_path / "bf16"
    bench = tiny_run.parent / "bench.json"
    args = ["merge", str(tiny_run), "--out", str(out), f"eval.benchmark_prompts={bench}"]
    assert main([*args, "model.compute_dtype=bfloat16", "model.device=cpu"]) == 0
    assert "(bfloat16)" in capsys.readouterr().out
    weights = load_file(out / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


@pytest.mark.slow
def test_a_real_smollm2_qlora_run_merges_and_answers_the_same(smollm2_run, capsys):
    """configs/smollm2-cpu.yaml (NF4 training) on the real model: merge, then the same greedy answer."""
    from transformers import AutoModelForCausalLM

    from qlora_llm.cli import main

    run = smollm2_run
    data_dir = run.parent  # the fixture's train.jsonl and eval.jsonl
    short = [json.loads(x) for x in (data_dir / "train.jsonl").read_text().splitlines()]
    assert main(["merge", str(run)]) == 0
    assert "4/4 greedy answers identical" in capsys.readouterr().out
    v = json.loads((run / "merged" / "merge_verification.json").read_text())
    assert v["passed"] and v["dtype"] == "float32" and v["logits"]["from"] == str(data_dir / "eval.jsonl")
    assert AutoModelForCausalLM.from_pretrained(run / "merged").config.model_type == "llama"
    prompt = f"{short[0]['instruction']}\n\n{short[0]['input']}"
    answers = []
    for target in (run, run / "merged"):
        assert main(["generate", str(target), prompt, "--temperature", "0", "--max-new-tokens", "24"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0].strip()


@pytest.mark.slow
def test_a_merge_killed_mid_write_leaves_the_previous_merge_as_it_was(merged, tiny_run, tmp_path):
    import shutil
    import subprocess
    import sys

    out = tmp_path / "merged"
    shutil.copytree(merged.out_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    script = (
        "import os, signal, sys\n"
        "from transformers import PreTrainedTokenizerBase\n"
        "def killed(self, *a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)  # kill -9 with the new weights written\n"
        "PreTrainedTokenizerBase.save_pretrained = killed\n"
        "from qlora_llm.merge import merge\n"
        "merge(sys.argv[1], sys.argv[2], device='cpu', force=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tiny_run), str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _logits_of(loaded, text: str = "[INST] What comes after a? [/INST]") -> torch.Tensor:
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return loaded.model(ids).logits


def test_adapter_scale_zero_is_the_base_and_one_is_the_merged_model(merged, tiny_run, tiny_mistral):
    """WiSE-FT through PEFT's own scaling: W0 + scale x delta. 0 gives the base's logits exactly, 1 the
    merged model's, and a scale between gives neither."""
    from qlora_llm.config import ModelConfig

    def at(scale: float):
        return _logits_of(load_target(tiny_run, model_cfg=ModelConfig(adapter_scale=scale), device="cpu"))

    base = _logits_of(load_target(tiny_run, device="cpu", adapter=False))
    as_merged = _logits_of(load_target(merged.out_dir, device="cpu"))
    assert torch.equal(at(0.0), base)
    torch.testing.assert_close(at(1.0), as_merged, atol=1e-4, rtol=1e-4)
    half = at(0.5)
    assert not torch.allclose(half, base, atol=1e-4) and not torch.allclose(half, as_merged, atol=1e-4)
    assert not torch.allclose(base, as_merged, atol=1e-4)  # the adapter moved the model at all


def test_a_scaled_merge_verifies_against_the_scaled_adapter_and_says_its_scale(
    merged, tiny_run, tiny_mistral, tmp_path
):
    from qlora_llm.config import ModelConfig

    cfg = ModelConfig(adapter_scale=0.5, device="cpu")
    half = merge(tiny_run, tmp_path / "half", model_cfg=cfg, benchmark_prompts=tiny_run.parent / "bench.json")
    v = json.loads((half.out_dir / "merge_verification.json").read_text())
    assert v["passed"] and v["adapter_scale"] == 0.5 and merged.verification["adapter_scale"] == 1.0
    scaled = _logits_of(load_target(tiny_run, model_cfg=cfg, device="cpu"))
    torch.testing.assert_close(
        _logits_of(load_target(half.out_dir, device="cpu")), scaled, atol=1e-4, rtol=1e-4
    )
    # The merged weights sit half-way between the base and the full merge: W0 + 0.5 x delta.
    q = "model.layers.0.self_attn.q_proj.weight"
    w0 = load_file(tiny_mistral / "model.safetensors")[q]
    full, halfway = (load_file(f / "model.safetensors")[q] for f in (merged.out_dir, half.out_dir))
    torch.testing.assert_close(halfway - w0, 0.5 * (full - w0), atol=1e-6, rtol=1e-4)
