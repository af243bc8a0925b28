"""LoRA dropout on CPU from a counter-based hash: a real dropout, keyed by torch's generator."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_cfg

from qlora_llm.dropout import HashDropout, keep_mask, use_hash_dropout


def test_a_mask_keeps_each_element_with_its_probability_independently_of_its_neighbours():
    n, keep = 1_000_001, 0.95  # odd: the last element has half a hash of its own

    def kept(n, key, keep):
        mask = keep_mask(n, key, 1 - keep)
        assert mask.dtype == torch.bfloat16 and ((mask == 0) | (mask == 1)).all()
        return mask == 1

    mask = kept(n, 12345, keep)
    assert mask.dtype == torch.bool and mask.shape == (n,)
    # 4.4 standard deviations of a binomial: a biased generator fails, a fair one essentially never.
    assert abs(mask.float().mean().item() - keep) < 4.4 * (keep * (1 - keep) / n) ** 0.5
    both_dropped = (~mask[:-1] & ~mask[1:]).float().mean().item()  # neighbours share a hash, not a fate
    assert abs(both_dropped - (1 - keep) ** 2) < 4.4 * ((1 - keep) ** 2 / n) ** 0.5
    for stride in (2, 64, 576):  # rows of a hidden state: no pattern along them either
        assert abs((~mask[:-stride] & ~mask[stride:]).float().mean().item() - 0.0025) < 0.0003
    assert torch.equal(kept(n, 12345, keep), mask)  # a function of (index, key)
    other = kept(n, 12346, keep)
    assert abs((mask ^ other).float().mean().item() - 2 * keep * (1 - keep)) < 0.001  # unrelated masks
    assert kept(n, 7, 0.5).float().mean().item() == pytest.approx(0.5, abs=0.002)
    assert kept(n, 7, 1 - 1e-6).all()  # below 1/65536 nothing is dropped
    assert torch.equal(keep_mask(n, 9, 0.3, torch.float32) == 1, kept(n, 9, 0.7))  # any dtype alike


def test_hash_dropout_scales_what_it_keeps_zeroes_the_rest_and_follows_torchs_generator():
    drop = HashDropout(0.1)
    x = torch.randn(4, 50, 64, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    assert 0.85 < kept.float().mean().item() < 0.95
    assert torch.allclose(y[kept], x[kept] / 0.9)
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / 0.9)  # the gradient flows through the kept entries only
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # train.seed decides the masks
    assert not torch.equal(drop(x), y)  # and each call draws a new one
    drop.eval()
    assert drop(x) is x
    # In bf16 the kept values are scaled by 1/(1-p) itself: a scale rounded to bf16 (1.0547 for 1/0.95)
    # would bias every kept value by 0.2%.
    xb = torch.randn(64, 1000, dtype=torch.bfloat16)
    yb = HashDropout(0.05)(xb)
    ratio = (yb[yb != 0].float() / xb[yb != 0].float()).mean().item()
    assert abs(ratio - 1 / 0.95) < 5e-4


def test_gradient_checkpointings_recompute_draws_the_same_masks():
    """The recompute restores torch's generator and so redraws the key: gradients as without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    layer, drop = torch.nn.Linear(64, 64), HashDropout(0.3)
    x = torch.randn(8, 64)

    def grads(checkpointed: bool) -> torch.Tensor:
        layer.zero_grad()
        torch.manual_seed(3)

        def block(h):
            return layer(drop(h)).tanh()

        out = checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
        out.square().sum().backward()
        return layer.weight.grad.clone()

    assert torch.equal(grads(True), grads(False))


def test_training_on_cpu_uses_it_in_every_lora_layer_and_says_so(tiny_mistral, tiny_data, tmp_path, caplog):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_mistral),
        LoraConfig(r=4, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    assert use_hash_dropout(model) == 4  # 2 layers x 2 projections
    assert sum(isinstance(m, HashDropout) for m in model.modules()) == 4

    from qlora_llm.train import train

    caplog.set_level("INFO", logger="qlora_llm.train")
    cfg = tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", "train.max_steps=3", "lora.dropout=0.1")
    result = train(cfg)
    assert "LoRA dropout on CPU: masks from a counter-based hash in 14 layers" in caplog.text
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    assert result.global_step == 3 and losses and all(loss == loss for loss in losses)  # trained, finite


def _eager(x, key, p):
    return x * keep_mask(x.numel(), key, p, torch.bfloat16).view(x.shape).to(x.dtype) * (1 / (1 - p))


def test_compiled_masks_are_the_eager_ones_bit_for_bit_and_are_not_kept_for_the_backward():
    import qlora_llm.dropout as dropout

    chosen = dropout.fuse_hash_dropout(0.1, (2, 8, 16), (torch.bfloat16, torch.float32), 0, "compiled")
    assert chosen.startswith("compiled by torch.compile") and dropout._compiled is not None
    try:
        drop = HashDropout(0.1)
        for shape in ((4, 50, 64), (3, 7, 5), (1, 1, 1), (2, 33)):  # odd sizes: the last hash's half
            for dtype in (torch.bfloat16, torch.float32):
                x = torch.randn(*shape, dtype=dtype, requires_grad=True)
                torch.manual_seed(3)
                key = int(torch.randint(-(2**31), 2**31 - 1, (), dtype=torch.int64))
                torch.manual_seed(3)
                saved: list[torch.Tensor] = []
                with torch.autograd.graph.saved_tensors_hooks(
                    lambda t, kept=saved: kept.append(t) or t, lambda t: t
                ):
                    y = drop(x)
                assert y.dtype == dtype and torch.equal(y, _eager(x, key, 0.1))
                assert all(t.numel() <= 1 for t in saved), [(t.shape, t.dtype) for t in saved]
                y.backward(torch.ones_like(y))
                assert torch.equal(x.grad, _eager(torch.ones_like(x), key, 0.1))
    finally:
        dropout.fuse_hash_dropout(0.1, (1, 1, 1), (torch.float32,), 0, "hash")
    assert dropout._compiled is None


def test_auto_compiles_only_a_run_long_enough_to_pay_for_it():
    import qlora_llm.dropout as dropout

    assert dropout.fuse_hash_dropout(0.1, (4, 64, 64), (torch.float32,), 10, "auto").startswith(
        "eager (0 s of masks in this run: too few to pay for compiling)"
    )
    assert dropout._compiled is None
    assert dropout.fuse_hash_dropout(0.1, (4, 64, 64), (torch.float32,), 10**9, "hash") == (
        "eager (lora.dropout_masks=hash)"
    )


def test_auto_weighs_the_compiled_masks_at_the_runs_shape_as_it_does_the_eager_ones(monkeypatch):
    """A shape over TIMED_ELEMENTS is timed on a part and scaled: the compiled masks' time by the same
    factor as the eager ones' (here 8), or auto keeps compiled masks that are slower than eager."""
    import qlora_llm.dropout as dropout

    shape = (32, 1024, 1024)  # 8 x TIMED_ELEMENTS
    assert math.prod(shape) == 8 * dropout.TIMED_ELEMENTS
    monkeypatch.setattr(
        dropout, "_timed", lambda fn, inputs: 1e-3
    )  # every timed pass: 1 ms, nothing compiled
    monkeypatch.setattr(dropout, "eager_mask_seconds", lambda p, shape, dtypes: 0.9 * 8e-3)
    try:
        chosen = dropout.fuse_hash_dropout(0.1, shape, (torch.float32,), 10**6, "auto")
        assert chosen == "eager (7.2 ms a mask, compiled 8.0 ms)"
        assert dropout._compiled is None
    finally:
        dropout._compiled = None


def test_a_run_with_compiled_masks_trains_exactly_as_with_eager_ones(
    tiny_mistral, tiny_data, tmp_path, caplog
):
    from qlora_llm.train import train

    caplog.set_level("INFO", logger="qlora_llm.train")
    runs = {}
    for masks in ("hash", "compiled"):
        cfg = tiny_cfg(
            tiny_mistral,
            tiny_data,
            tmp_path / masks,
            "train.max_steps=3",
            "lora.dropout=0.1",
            f"lora.dropout_masks={masks}",
        )
        runs[masks] = train(cfg)
    assert "in 14 layers, eager (lora.dropout_masks=hash)" in caplog.text
    assert "in 14 layers, compiled by torch.compile" in caplog.text

    def losses(result):
        rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r.get("loss") is not None]

    assert losses(runs["hash"]) == losses(runs["compiled"]) and len(losses(runs["hash"])) == 3
    from safetensors.torch import load_file

    weights = {m: load_file(r.final_adapter / "adapter_model.safetensors") for m, r in runs.items()}
    assert all(torch.equal(weights["hash"][k], weights["compiled"][k]) for k in weights["hash"])


def test_the_eager_timing_scales_a_huge_shape_instead_of_allocating_it():
    """`plan` times the masks before it refuses a run that cannot fit: an absurd batch must not be allocated
    (it was: "you tried to allocate 16384000000000 bytes"); elementwise time is scaled from a capped size."""
    import qlora_llm.dropout as dropout

    capped = dropout.eager_mask_seconds(0.1, (dropout.TIMED_ELEMENTS,), (torch.float32,))
    huge = dropout.eager_mask_seconds(0.1, (10**9, 512, 576), (torch.float32,))
    assert 0 < capped and huge > 1000 * capped  # 70,000x the elements, timed on the same 4M
