"""The trainer (src/qlora_llm/trainer.py): fp32 LoRA, a non-finite loss stopped, the loss batching cannot change."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ONE_STEP, lora_state, patch_trainer, read_metrics, tiny_cfg, tiny_overrides

from qlora_llm.errors import TrainError
from qlora_llm.train import train


def test_trainable_weights_are_fp32_on_cpu_despite_trl_cast(tiny_mistral, tiny_data, tmp_path, monkeypatch):

    seen = {}

    class Spy:
        def train(self, *a, **k):
            seen["dtypes"] = {p.dtype for p in self.model.parameters() if p.requires_grad}
            seen["base"] = {
                type(m).__name__ for m in self.model.modules() if "Linear4bit" in type(m).__name__
            }
            return super().train(*a, **k)

    patch_trainer(monkeypatch, Spy)
    train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", *ONE_STEP))
    assert seen["dtypes"] == {torch.float32}
    assert seen["base"] == {"Linear4bit"}  # it really is QLoRA on a 4-bit base


def test_bf16_compute_on_cpu_keeps_lora_and_optimizer_state_in_fp32(
    tiny_mistral, tiny_data, tmp_path, monkeypatch
):
    """What `compute_dtype: auto` picks on a CPU with native bf16: bf16 matmuls, fp32 trainable state."""
    seen = {}

    class Observe:
        def training_step(self, model, *a, **k):
            loss = super().training_step(model, *a, **k)
            seen["lora"] = {p.dtype for p in model.parameters() if p.requires_grad}
            seen["autocast"] = torch.is_autocast_enabled("cpu") or self.args.bf16
            return loss

    patch_trainer(monkeypatch, Observe)
    cfg = tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", "model.compute_dtype=bfloat16")
    result = train(cfg)
    assert seen == {"lora": {torch.float32}, "autocast": True}
    assert result.summary["compute_dtype"] == "bfloat16"
    state = torch.load(tmp_path / "run" / "checkpoint-6" / "optimizer.pt", weights_only=False)["state"]
    assert {t.dtype for s in state.values() for t in s.values() if t.dim() > 0} == {torch.float32}
    assert result.summary["train_loss_last"] < result.summary["train_loss_first"]


@pytest.mark.parametrize("upcast", [True, False])
def test_lora_inputs_reach_the_dropout_in_the_residual_streams_dtype_under_cpu_bf16(
    tiny_mistral, tiny_data, tmp_path, monkeypatch, upcast
):
    """peft would cast each LoRA input to fp32 (it sees only CUDA's autocast); train() stops it. The stream is
    fp32 on an upcast 4-bit base and bf16 with model.upcast_layers=false (embeddings and norms in bf16).
    Before, every LoRA input arrived in fp32."""
    seen = {"inputs": set()}

    class Observe:
        def training_step(self, model, *a, **k):
            if not seen["inputs"]:
                for name, module in model.named_modules():
                    if name.endswith("lora_dropout.default"):
                        projection = name.split(".")[-3]
                        module.register_forward_pre_hook(
                            lambda m, args, p=projection: seen["inputs"].add((p, args[0].dtype))
                        )
                seen["norms"] = {m.weight.dtype for n, m in model.named_modules() if n.endswith("norm")}
            return super().training_step(model, *a, **k)

    patch_trainer(monkeypatch, Observe)
    overrides = ["model.compute_dtype=bfloat16", "lora.dropout=0.1", f"model.upcast_layers={upcast}"]
    result = train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", *overrides))
    stream = torch.float32 if upcast else torch.bfloat16
    projections = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
    # o_proj's input is the attention's output, which autocast computes in bf16 either way.
    assert seen["inputs"] == {(p, stream) for p in projections} | {("o_proj", torch.bfloat16)}
    assert seen["norms"] == {stream}
    assert result.summary["train_loss_last"] < result.summary["train_loss_first"]


def test_non_finite_loss_stops_with_step_and_keeps_last_checkpoint(
    tiny_mistral, tiny_data, tmp_path, monkeypatch
):

    class Poisoned:
        def compute_loss(self, model, inputs, *a, **k):
            loss = super().compute_loss(model, inputs, *a, **k)
            if self.state.global_step >= 4:
                return loss * float("nan")
            return loss

    patch_trainer(monkeypatch, Poisoned)
    with pytest.raises(
        TrainError, match=r"loss became nan at step 5; the last good checkpoint is .*checkpoint-3"
    ):
        train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", "train.max_steps=8"))
    ckpt = lora_state(tmp_path / "run" / "checkpoint-3")
    assert all(torch.isfinite(t).all() for t in ckpt.values())


def test_packed_and_padded_batches_give_the_same_loss(tiny_mistral, tiny_data, tmp_path, monkeypatch):
    """Padding-free packing must not let examples attend to each other: same examples, same loss."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    seen = {}

    class Spy:
        def train(self, *a, **k):
            rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in self.train_dataset][:4]
            self.model.eval()  # no dropout: the two passes must see the same function
            with torch.no_grad():
                for name, padding_free in (("padded", False), ("packed", True)):
                    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)(rows)
                    seen[name] = float(self.compute_loss(self.model, batch))
                    seen[f"{name}_shape"] = tuple(batch["input_ids"].shape)
            self.model.train()
            return super().train(*a, **k)

    patch_trainer(monkeypatch, Spy)
    train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", *ONE_STEP))
    assert seen["packed_shape"][0] == 1 and seen["padded_shape"][0] == 4
    assert seen["packed"] == pytest.approx(seen["padded"], rel=1e-5)


def test_the_cpu_loss_head_scores_only_the_labelled_positions_for_the_same_loss(
    tiny_mistral, tiny_data, tmp_path, monkeypatch
):
    """TRL scores every position on CPU (no Triton) and zeroes the prompt's; train() has it gather the
    answer's positions first. Same batch, both ways: the same loss and gradients, fewer rows through the head."""
    import trl.kernels.chunked_logprob as kernel
    import trl.trainer.utils as trl_utils

    real = trl_utils._ChunkedLogProbFunction
    seen: dict = {"rows": []}

    class Count:
        @staticmethod
        def apply(hidden, *rest):
            seen["rows"].append(hidden.shape[0])
            return real.apply(hidden, *rest)

    class Spy:
        def train(self, *a, **k):
            rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in self.train_dataset][:4]
            batch = self.data_collator(rows)
            labelled = int((batch["labels"][:, 1:] != -100).sum())
            monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Count)
            self.model.eval()  # no dropout: the two passes must see the same function
            for name, compact in (("gathered", trl_utils._use_triton), ("every", kernel._use_triton)):
                monkeypatch.setattr(trl_utils, "_use_triton", compact)
                self.model.zero_grad()
                loss = self.compute_loss(self.model, dict(batch))
                loss.backward()
                seen[name] = (
                    float(loss.detach()),
                    {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None},
                )
            self.model.zero_grad()
            self.model.train()
            seen["labelled"], seen["positions"] = labelled, batch["labels"][:, 1:].numel()
            return super().train(*a, **k)

    # Registered first, so the teardown puts TRL's own function back (the Spy's patches run inside train()).
    monkeypatch.setattr(trl_utils, "_use_triton", trl_utils._use_triton)
    patch_trainer(monkeypatch, Spy)
    train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", *ONE_STEP))
    assert seen["rows"][:2] == [seen["labelled"], seen["positions"]]
    assert seen["labelled"] < seen["positions"]  # the prompts' positions were left out
    assert seen["gathered"][0] == pytest.approx(seen["every"][0], rel=1e-6)
    grads = seen["gathered"][1], seen["every"][1]
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for key, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][key], rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_matches_the_big_batch(tiny_mistral, tiny_data, tmp_path):
    """4 micro-batches of 1 and one batch of 4: the same update (SGD, so the gradient scale shows)."""
    common = [
        *ONE_STEP,
        "lora.dropout=0",
        "train.optim=sgd",
        "train.learning_rate=1",
        "train.group_by_length=false",
        "train.max_grad_norm=1e9",
    ]
    train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "big", *common, "train.batch_size=4"))
    train(
        tiny_cfg(
            tiny_mistral,
            tiny_data,
            tmp_path / "acc",
            *common,
            "train.batch_size=1",
            "train.gradient_accumulation_steps=4",
        )
    )
    a = lora_state(tmp_path / "big" / "checkpoint-1")
    b = lora_state(tmp_path / "acc" / "checkpoint-1")
    moved = [k for k in a if k.endswith("lora_B.weight")]
    assert moved and all(a[k].abs().sum() > 0 for k in moved)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_eval_loss_of_the_same_model_is_the_same_for_every_seed(tiny_mistral, tmp_path):
    """Step 0's evaluation scores the base (LoRA's B is zero): the training seed must not move it.

    Answers of 1 to 6 words, 2 to a batch: the batches' token means weigh the examples by how they are
    paired, so an order that depends on the seed (transformers' LengthGroupedSampler) moves eval loss.
    """
    from qlora_llm.config import load_config

    data = tmp_path / "data"
    data.mkdir()
    rows = [
        {
            "instruction": f"Count to {n}.",
            "input": "",
            "output": " ".join(["one", "two", "three"] * 2)[: 4 * n],
        }
        for n in range(1, 7)
    ]
    for name in ("train", "eval"):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses = {}
    for seed in (1, 2, 3):
        out = tmp_path / f"seed-{seed}"
        overrides = tiny_overrides(tiny_mistral, data, out, f"train.seed={seed}", steps=1, batch=2, every=1)
        train(load_config(None, overrides))
        losses[seed] = next(r["eval_loss"] for r in read_metrics(out) if r["step"] == 0 and "eval_loss" in r)
    assert losses[1] == losses[2] == losses[3], losses
