"""The two 4-bit CPU kernels (src/qlora_llm/cpu4bit.py), both exercised on any host.

`cpu_kernel` (conftest) runs a test with `model.cpu_4bit_kernel=fused` and `=plain`; where the CPU has
no AVX512-BF16 the fused kernel is replaced by a plain-torch reference, which is checked against the
real kernel on hosts that have it.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import warnings
from pathlib import Path

import pytest
import torch
from conftest import lora_state, patch_trainer, reference_fused_gemv, tiny_cfg

from qlora_llm.config import ModelConfig
from qlora_llm.cpu4bit import KernelError, choose_kernel, fused_kernel_available, is_fused
from qlora_llm.model import load_base_model
from qlora_llm.train import train

NF4 = {"quantization": "nf4", "device": "cpu", "compute_dtype": "float32"}


def load_4bit(folder: Path, kernel: str):
    return load_base_model(ModelConfig(name=str(folder), cpu_4bit_kernel=kernel, **NF4), "cpu")


def q_proj(model):
    return model.model.layers[0].self_attn.q_proj


@pytest.mark.skipif(not fused_kernel_available(), reason="the real fused kernel needs AVX512-BF16")
def test_the_reference_is_the_real_fused_kernel():
    import bitsandbytes.functional as F
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, quantize_4bit

    torch.manual_seed(0)
    for n, k in [(32, 64), (192, 576), (576, 1536)]:
        q, state = quantize_4bit(torch.randn(n, k), blocksize=64, compress_statistics=True, quant_type="nf4")
        packed, pstate = _convert_weight_packed_for_cpu(q, copy.copy(state))
        x = torch.randn(5, k)
        real, ref = F.gemv_4bit(x, packed, state=pstate), reference_fused_gemv(x, packed, state=pstate)
        exact = x @ F.dequantize_4bit(q, state).T
        scale = exact.abs().max()
        # bf16 inputs and weights: each is within 1% of the fp32 result, and so of the other (measured:
        # 0.3-0.5% of the largest output).
        assert (real - exact).abs().max() < 0.01 * scale and (ref - exact).abs().max() < 0.01 * scale
        assert (real - ref).abs().max() < 0.01 * scale, (n, k)


def test_fused_layout_round_trip_is_exact(tiny_mistral, cpu_kernel):
    """Eval repacks, training and state_dict() get back the very bytes and quantization state."""
    model = load_4bit(tiny_mistral, cpu_kernel)
    layer = q_proj(model)
    data, state = layer.weight.data.clone(), layer.weight.quant_state
    ids = torch.tensor([[1, 415, 2936, 9060, 285]])
    model.train()
    with torch.no_grad():
        train_logits = model(ids).logits
    model.eval()
    with torch.no_grad():
        eval_logits = model(ids).logits
    assert is_fused(layer) == (cpu_kernel == "fused")
    assert not layer.support_avx512bf16_for_cpu  # bitsandbytes' own, lossy repacking is never used
    if cpu_kernel == "fused":  # bf16 math: close, not equal
        assert not torch.equal(eval_logits, train_logits)
    torch.testing.assert_close(eval_logits, train_logits, rtol=0.05, atol=0.05)
    model.state_dict()  # what every checkpoint save calls
    assert not is_fused(layer) and torch.equal(layer.weight.data, data) and layer.weight.quant_state is state
    model.eval()
    with torch.no_grad():
        model(ids)
    model.train()
    x = torch.randn(2, 64, requires_grad=True)
    layer(x).sum().backward()
    assert not is_fused(layer) and torch.equal(layer.weight.data, data) and layer.weight.quant_state is state
    assert x.grad is not None and x.grad.abs().sum() > 0  # the gradient reaches the layer's input


def test_odd_shapes_stay_plain_named_in_one_log_line(tiny_odd, cpu_kernel, caplog):
    with caplog.at_level(logging.INFO, logger="qlora_llm.cpu4bit"):
        model = load_4bit(tiny_odd, cpu_kernel)
    lines = [r.getMessage() for r in caplog.records if r.name == "qlora_llm.cpu4bit"]
    assert len(lines) == 1
    if cpu_kernel == "fused":
        assert "fused AVX512-BF16 (bf16 math) for evaluation and generation in 10 of 14 layers" in lines[0]
        assert "model.layers.*.self_attn.k_proj x2 (16 outputs, not a multiple of 32)" in lines[0]
        assert "model.layers.*.self_attn.v_proj x2 (16 outputs, not a multiple of 32)" in lines[0]
    else:
        assert lines[0].startswith("4-bit CPU kernel: plain (dequantize, then a float32 matmul) in all 14")
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 415, 2936]])).logits
    assert torch.isfinite(logits).all()
    k_proj = model.model.layers[0].self_attn.k_proj
    assert not is_fused(k_proj) and is_fused(q_proj(model)) == (cpu_kernel == "fused")


def test_evaluations_between_steps_change_no_weight(tiny_mistral, tiny_data, tmp_path, cpu_kernel):  # noqa: F811
    """8 steps evaluated after every step vs once at the end: bit-identical LoRA weights, on both kernels.

    With bitsandbytes left alone on an AVX512-BF16 CPU, the steps after an evaluation ran the bf16
    kernel with no gradient to the layers below, and the base weights changed at each checkpoint.
    """
    common = ["train.max_steps=8", "train.save_steps=8", f"model.cpu_4bit_kernel={cpu_kernel}"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*autograd kernel was not registered")
        every = train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "every", *common, "train.eval_steps=1"))
        once = train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "once", *common, "train.eval_steps=8"))
    evals = [json.loads(x) for x in (every.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum("eval_loss" in r for r in evals) == 9  # the baseline and one after each step
    a, b = lora_state(every.final_adapter), lora_state(once.final_adapter)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert every.summary["train_loss_last"] == once.summary["train_loss_last"]


def test_resume_stays_exact_across_evaluations(tiny_mistral, tiny_data, tmp_path, cpu_kernel, monkeypatch):  # noqa: F811
    """6 steps straight vs 3 + SIGTERM + resume + 3, evaluating after every step: identical weights."""
    extra = [
        "train.max_steps=6",
        "train.save_steps=3",
        "train.eval_steps=1",
        f"model.cpu_4bit_kernel={cpu_kernel}",
    ]
    straight = train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "straight", *extra))

    class Interrupted:
        def training_step(self, *a, **k):
            if self.state.global_step == 2:  # during step 3
                os.kill(os.getpid(), signal.SIGTERM)
            return super().training_step(*a, **k)

    patch_trainer(monkeypatch, Interrupted)
    assert train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "split", *extra)).global_step == 3
    monkeypatch.undo()
    resumed = train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "split", *extra), resume="auto")
    assert resumed.global_step == 6
    a, b = lora_state(straight.final_adapter), lora_state(resumed.final_adapter)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_odd_model_trains_merges_and_evaluates_in_4bit(tiny_odd, tiny_data, tmp_path, cpu_kernel):  # noqa: F811
    from qlora_llm.config import load_config
    from qlora_llm.evaluate import evaluate
    from qlora_llm.merge import merge

    run = train(
        tiny_cfg(
            tiny_odd, tiny_data, tmp_path / "run", f"model.cpu_4bit_kernel={cpu_kernel}", "lora.dropout=0"
        )
    )
    evals = [
        json.loads(x)["eval_loss"]
        for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()
        if "eval_loss" in x
    ]
    assert evals[-1] < evals[0]
    merged = merge(run.run_dir, tmp_path / "merged", device="cpu", benchmark_prompts=None)
    assert merged.verification["passed"]
    cfg = load_config(
        None,
        [
            "model.device=cpu",
            f"model.cpu_4bit_kernel={cpu_kernel}",
            "eval.quantization=nf4",
            "eval.max_new_tokens=4",
            "eval.speed_runs=1",
            "eval.general_limit=6",
            "eval.general_generative_limit=4",
            "eval.general_max_new_tokens=4",
            "eval.benchmark_prompts=null",
            f"eval.data_file={tiny_data / 'eval.jsonl'}",
            f"eval.output_dir={tmp_path / 'eval'}",
        ],
    )
    result = evaluate(cfg, str(run.run_dir))
    tuned, base = result.metrics["tuned"], result.metrics["base"]
    assert tuned["perplexity_completion"] < base["perplexity_completion"]


def test_fused_is_refused_where_the_cpu_cannot_run_it(monkeypatch):
    import qlora_llm.cpu4bit as cpu4bit

    monkeypatch.setattr(cpu4bit, "fused_kernel_available", lambda: False)
    with pytest.raises(KernelError, match="model.cpu_4bit_kernel=fused needs a CPU with AVX512-BF16"):
        choose_kernel("fused")
    assert choose_kernel("auto") == "plain" and choose_kernel("plain") == "plain"
    monkeypatch.setattr(cpu4bit, "fused_kernel_available", lambda: True)
    assert choose_kernel("auto") == "fused" and choose_kernel("plain") == "plain"


@pytest.mark.parametrize("plain_speedup, large_runs_plain", [(10.0, True), (1.3, True), (1.05, False)])
def test_auto_runs_large_calls_plain_where_the_probe_measured_plain_faster(
    tiny_mistral, monkeypatch, caplog, plain_speedup, large_runs_plain
):
    """`auto`: a decode-sized call runs fused; a larger one runs plain where the probe measured plain at
    least 1.1x as fast at 1024 rows (else fused, as before): 10x as on a Xeon with AMX in bf16, 1.3x as on
    the AMD EPYC in bf16 (where plain scored the real model 1.34x as fast). A routed layer keeps both
    layouts while it alternates (no repacking per call) and is back to its very bytes, packed copy
    dropped, for training."""
    import bitsandbytes.functional as bnb_functional

    import qlora_llm.cpu4bit as cpu4bit

    if not cpu4bit.fused_kernel_available():
        monkeypatch.setattr(cpu4bit, "fused_kernel_available", lambda: True)
        monkeypatch.setattr(bnb_functional, "gemv_4bit", reference_fused_gemv)
    monkeypatch.setattr(cpu4bit, "large_call_speedup", lambda dtype: plain_speedup)
    packs = []
    convert = bnb_functional._convert_weight_packed_for_cpu
    monkeypatch.setattr(
        bnb_functional, "_convert_weight_packed_for_cpu", lambda *a: packs.append(1) or convert(*a)
    )
    with caplog.at_level(logging.INFO, logger="qlora_llm.cpu4bit"):
        model = load_4bit(tiny_mistral, "auto")
    line = [r.getMessage() for r in caplog.records if r.name == "qlora_llm.cpu4bit"][0]
    layer = q_proj(model)
    data, state = layer.weight.data.clone(), layer.weight.quant_state
    small, large = torch.tensor([[1, 415, 2936, 9060, 285]]), torch.randint(3, 500, (2, 40))
    model.eval()
    with torch.no_grad():
        model(small)
        assert is_fused(layer)
        model(large)  # 80 rows
        if not large_runs_plain:
            assert (
                f"at 1024 rows plain measured {plain_speedup:.2f}x fused's speed here, so every call runs fused"
                in line
            )
            assert is_fused(layer)
            return
        assert (
            f"calls of more than 32 rows (scoring, prefill) run plain: it measured {plain_speedup:.2f}x as fast"
            in line
        )
        assert (
            not is_fused(layer) and torch.equal(layer.weight.data, data) and layer.weight.quant_state is state
        )
        layers_packed = len(packs)
        model(small)
        model(large)
        model(small)
    assert is_fused(layer) and len(packs) == layers_packed  # switched back and forth without repacking
    with torch.no_grad():
        model(large)
        layer.weight.data = layer.weight.data.clone()  # the weight replaced (as a merge or a load would)
        model(small)
    assert is_fused(layer) and len(packs) == layers_packed + 1  # its stale packed copy was not reused
    model.train()
    x = torch.randn(2, 64, requires_grad=True)
    layer(x).sum().backward()
    assert not is_fused(layer) and torch.equal(layer.weight.data, data) and layer.weight.quant_state is state
    assert "_qlora_packed" not in layer.__dict__ and x.grad.abs().sum() > 0


def test_the_kernel_probe_leaves_the_global_rng_as_it_found_it():
    """The probe runs while the model loads, before LoRA's random init: it must not shift that init."""
    import qlora_llm.cpu4bit as cpu4bit

    if not cpu4bit.fused_kernel_available():
        pytest.skip("the probe times the real fused kernel, which needs AVX512-BF16")
    before = torch.get_rng_state()
    cpu4bit.large_call_speedup.__wrapped__(torch.float32)
    assert torch.equal(torch.get_rng_state(), before)
