"""train(cfg) as a whole: real NF4 QLoRA on CPU with a tiny Mistral, what it writes and refuses, its memory plan."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import lora_state, patch_trainer, read_metrics, tiny_cfg, train_args

from qlora_llm.checkpoint import CHECKPOINT_FILES
from qlora_llm.config import load_config
from qlora_llm.errors import TrainError
from qlora_llm.train import train

ROOT = Path(__file__).resolve().parents[1]


def test_qlora_trains_on_cpu_loss_falls_lora_changes_base_frozen(tiny_mistral, tiny_data, tmp_path):
    from safetensors.torch import load_file

    cfg = tiny_cfg(
        tiny_mistral,
        tiny_data,
        tmp_path / "run",
        "train.max_steps=12",
        "train.save_steps=6",
        "train.eval_steps=6",
    )
    result = train(cfg)
    run = tmp_path / "run"
    assert result.stopped == "completed" and result.global_step == 12 and result.exit_code == 0
    s = result.summary
    assert s["train_loss_last"] < s["train_loss_first"]
    assert s["eval_loss_best"] < s["eval_loss_first"]

    lora = lora_state(run / "final_adapter")
    assert len(lora) == 2 * 7 * 2  # A and B for 7 projections in 2 layers
    assert all(t.dtype == torch.float32 for t in lora.values())
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in lora.items())  # B starts at 0
    base = load_file(str(Path(tiny_mistral) / "model.safetensors"))
    assert base["model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0  # the base file is untouched
    assert {p.name for p in run.iterdir()} == {
        "config.yaml",
        "manifest.json",
        "metrics.jsonl",
        "loss.png",
        "summary.json",
        "final_adapter",
        "checkpoint-6",
        "checkpoint-12",
        "README.md",
    }
    assert set(CHECKPOINT_FILES) <= {p.name for p in (run / "checkpoint-6").iterdir()}
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["tokens"] == {"bos_id": 1, "eos_id": 2, "pad_id": 0, "eos": "</s>"}
    assert manifest["template"]["example"] == "<s>[INST] What comes after alpha? [/INST] beta 0</s>"
    assert manifest["identity"]["lora_r"] == 16 and len(manifest["data"]) == 4
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 13))
    assert all(m["tokens_per_s"] > 0 and m["memory_bytes"] > 0 for m in metrics if "loss" in m)
    assert [m["step"] for m in metrics if "eval_loss" in m] == [0, 6, 12]
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_a_sequence_length_beyond_the_models_context_is_refused_before_loading(
    tiny_mistral, tiny_data, tmp_path, monkeypatch
):
    import qlora_llm.model

    monkeypatch.setattr(qlora_llm.model, "load_tokenizer", lambda *a, **k: pytest.fail("loaded first"))
    with pytest.raises(TrainError) as err:
        train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", "data.max_seq_length=5000"))
    assert str(err.value) == (
        f"data.max_seq_length=5000 is beyond the context of {tiny_mistral} (1024 tokens, its "
        "max_position_embeddings): set data.max_seq_length=1024 or less."
    )


def test_plain_lora_without_quantization(tiny_mistral, tiny_data, tmp_path):
    result = train(
        tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", "model.quantization=none", "train.max_steps=3")
    )
    assert result.summary["train_loss_last"] < result.summary["train_loss_first"]


def test_wrong_explicit_target_modules_is_an_error(tiny_mistral, tiny_data, tmp_path):
    with pytest.raises(
        TrainError, match=r"lora.target_modules \['c_attn'\] are not all in MistralForCausalLM"
    ):
        train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", "lora.target_modules=[c_attn]"))


def test_cuda_requested_without_gpu_is_an_error(tiny_mistral, tiny_data, tmp_path):
    from qlora_llm.model import DeviceError

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceError, match="model.device=cuda but no CUDA GPU is visible"):
        train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", "model.device=cuda"))


@pytest.mark.slow
def test_real_smollm2_qlora_on_cpu_eval_loss_falls(smollm2_cache, tmp_path):
    """The bundled real model, 4-bit NF4 on CPU, a few steps on real ACLSum examples: eval loss falls."""
    rows = [json.loads(x) for x in (ROOT / "data" / "aclsum" / "train.jsonl").read_text().splitlines()]
    short = [r for r in rows if len(r["input"]) < 700][:24]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short[:20]))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short[20:24]))
    cfg = load_config(
        ROOT / "configs" / "smollm2-cpu.yaml",
        [
            f"model.cache_dir={smollm2_cache}",
            f"data.train_file={tmp_path / 'train.jsonl'}",
            f"data.eval_file={tmp_path / 'eval.jsonl'}",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=6",
            "train.eval_steps=6",
            "train.save_steps=6",
            "train.logging_steps=1",
            "train.batch_size=2",
            "train.learning_rate=1e-3",
            "train.warmup_ratio=0",
        ],
    )
    result = train(cfg)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.global_step == 6
    assert result.summary["train_loss_last"] < result.summary["train_loss_first"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["base_model"]["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert manifest["base_model"]["fingerprint"].startswith("builtin:smollm2-135m-instruct:")
    assert manifest["template"]["name"] == "auto" and manifest["tokens"]["eos"] == "<|im_end|>"
    assert [m["step"] for m in metrics if "eval_loss" in m] == [0, 6]
    assert result.summary["eval_loss_best"] < result.summary["eval_loss_first"]


def test_a_run_that_cannot_fit_is_refused_unless_forced(tiny_mistral, tiny_data, tmp_path, monkeypatch):
    import qlora_llm.plan as qplan

    monkeypatch.setattr(qplan, "_device_memory", lambda device: 256 * 2**20)  # a 256 MiB machine
    refused = r"estimated not to fit: peak \d+\.\d\d GiB \(in train\) > 0\.23 GiB usable .*--force"
    with pytest.raises(TrainError, match=refused):
        train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", "train.max_steps=1"))
    assert not (tmp_path / "run").exists()  # refused before anything was loaded or written
    result = train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", "train.max_steps=1"), force=True)
    assert result.global_step == 1


def test_the_plan_inside_train_sizes_batches_by_trains_own_rows(
    tiny_mistral, tiny_data, tmp_path, monkeypatch
):
    """train hands its tokenized rows to the plan: the data is read and tokenized once, same longest row."""
    import qlora_llm.plan as qplan

    cfg = tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", "train.max_steps=1")
    longest = max(n for n, _ in qplan.example_lengths(cfg) if n <= cfg.data.max_seq_length)
    reports = []
    real_plan = qplan.plan
    monkeypatch.setattr(qplan, "plan", lambda *a, **k: reports.append(real_plan(*a, **k)) or reports[-1])
    monkeypatch.setattr(qplan, "_tokenized", lambda *a: pytest.fail("the plan tokenized the data again"))
    assert train(cfg).global_step == 1
    assert [r.setup["seq_len"] for r in reports] == [longest]


@pytest.mark.parametrize("on", [True, False])
def test_activation_checkpointing_follows_the_setting(tiny_mistral, tiny_data, tmp_path, monkeypatch, on):
    seen = []

    class Observe:
        def training_step(self, model, *a, **k):
            seen.append(model.is_activation_checkpointing)
            return super().training_step(model, *a, **k)

    patch_trainer(monkeypatch, Observe)
    extra = ("train.max_steps=1", "train.save_steps=1", "train.eval_steps=1")
    train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", *extra, f"train.gradient_checkpointing={on}"))
    assert seen == [on]


def test_in_training_evaluation_can_take_the_first_eval_examples_only(
    tiny_mistral, tiny_data, tmp_path, monkeypatch
):
    seen = []

    class Observe:
        def evaluate(self, eval_dataset=None, *a, **k):
            seen.append(len(self.eval_dataset))
            return super().evaluate(eval_dataset, *a, **k)

    patch_trainer(monkeypatch, Observe)
    extra = ("train.max_steps=1", "train.save_steps=1", "train.eval_steps=1", "train.eval_max_examples=3")
    result = train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", *extra))
    assert seen == [3, 3]  # the baseline at step 0 and step 1, on 3 of the 4 eval examples
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["data"]["eval_examples"] == 3


def test_neftune_noises_training_steps_only(tiny_mistral, tiny_data, tmp_path):
    """train.neftune_noise_alpha: the same run trains on other numbers (loss and adapter differ) while
    its step-0 evaluation, which runs without noise, is the same to the bit."""
    extra = ("train.max_steps=2", "train.save_steps=2", "train.eval_steps=2")
    plain = train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "plain", *extra))
    noisy = train(
        tiny_cfg(tiny_mistral, tiny_data, tmp_path / "noisy", *extra, "train.neftune_noise_alpha=15")
    )
    a, b = read_metrics(plain.run_dir), read_metrics(noisy.run_dir)
    assert a[0]["eval_loss"] == b[0]["eval_loss"]  # evaluation runs without noise
    assert [r["loss"] for r in a if "loss" in r] != [r["loss"] for r in b if "loss" in r]
    wa, wb = lora_state(plain.final_adapter), lora_state(noisy.final_adapter)
    assert wa.keys() == wb.keys() and any(not torch.equal(wa[k], wb[k]) for k in wa)


def _layer_checkpointing(model) -> list[bool]:
    return [layer.gradient_checkpointing for layer in model.base_model.model.model.layers]


@pytest.mark.parametrize("room", ["plenty", "half", "none", "busy", "capped"])
def test_checkpointing_auto_takes_the_fewest_layers_that_fit(
    tiny_mistral, tiny_data, tmp_path, monkeypatch, caplog, room
):
    """auto: off when the run fits without it; layer 0 of 2 when only that fits; every layer otherwise.
    It is decided on the memory available now: busy has plenty in total but only half's room free; and
    capped (told less in total than is free: a patched or misread total) is decided, and said, on the total."""
    import qlora_llm.plan as qplan

    # Loss on every position: the step (activations and the loss's tile), not the loading, sets the peak.
    cfg = tiny_cfg(
        tiny_mistral,
        tiny_data,
        tmp_path / "run",
        "train.max_steps=1",
        "train.save_steps=1",
        "train.train_on_prompt=true",
    )
    model_config, _ = qplan.load_model_config(str(tiny_mistral))
    setup = qplan._setup(cfg, "cpu", lengths=qplan.example_lengths(cfg))  # as train plans: its data's longest

    def whole_run(every: int) -> int:
        """The plan's budget: the stage its verdict is on (training), with this checkpointing."""
        s = setup | {"gradient_checkpointing": every > 0, "every_n_layers": max(every, 1)}
        stages = qplan.estimate_stages(model_config, cfg, s)
        return max(st.peak for st in stages if st.name in qplan.VERDICT_STAGES)

    peak = {every: whole_run(every) for every in (0, 2, 1)}  # off, layer 0 of 2, both layers
    assert peak[0] > max(peak[1], peak[2])  # (checkpointing the last of 2 layers saves nothing: n=2 < n=1)
    half = (peak[0] + peak[2]) // 2
    usable = {"plenty": peak[0] + 1, "half": half, "none": min(peak.values()) - 1, "busy": peak[0] + 1}
    total = int(usable.get(room, half) / qplan.FIT_MARGIN) + 1
    available = {
        "busy": int(half / qplan.FIT_MARGIN) + 1,
        "capped": int(usable["plenty"] / qplan.FIT_MARGIN) + 1,
    }
    available = available.get(room, total)
    monkeypatch.setattr(qplan, "_device_memory", lambda device: total)
    monkeypatch.setattr("qlora_llm.memory.available_bytes", lambda device: available)
    seen = []

    class Observe:
        def training_step(self, model, *a, **k):
            seen.append(_layer_checkpointing(model))
            return super().training_step(model, *a, **k)

    patch_trainer(monkeypatch, Observe)
    with caplog.at_level(logging.INFO, logger="qlora_llm.train"):
        result = train(cfg, force=room == "none")
    expected = {"plenty": [False, False], "none": [True, True]}.get(room, [True, False])
    assert seen == [expected]
    said = {
        "plenty": "auto: off (the run fits without it)",
        "half": "auto: on for 1 of 2 layers (every 2), the fewest that fit",
        "none": "auto: on for all 2 layers",
        "busy": "auto: on for 1 of 2 layers (every 2), the fewest that fit",
        "capped": "auto: on for 1 of 2 layers (every 2), the fewest that fit",
    }[room] + (
        f", decided on {total / 2**30:.2f} GiB in total"
        if room == "capped"
        else f", decided on {available / 2**30:.2f} GiB available now"
    )
    assert result.summary["gradient_checkpointing"] == said
    assert f"gradient checkpointing {said}; planned peak " in caplog.text


@pytest.mark.parametrize("method", ["sft", "dpo", "orpo"])
def test_a_cli_training_log_has_no_third_party_warning(tiny_mistral, tiny_data, tiny_pairs, tmp_path, method):
    """What the terminal shows: our log lines, our progress bar and summary; no library warning or bar."""
    data = tiny_data if method == "sft" else tiny_pairs
    extra = ("train.max_steps=2", "train.eval_steps=1", f"train.method={method}")
    args = train_args(tiny_mistral, data, tmp_path / "run", *extra)
    (tmp_path / "empty.yaml").write_text("{}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_llm.cli", "train", str(tmp_path / "empty.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "QLORA_LLM_ALLOCATOR": "system"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.replace("\r", "\n").splitlines() if x.strip()]
    ours = ("INFO qlora_llm", "WARNING qlora_llm", "training:")
    assert [x for x in lines if not x.startswith(ours)] == []
    assert any(x.startswith("INFO qlora_llm.cpu4bit: 4-bit CPU kernel: ") for x in lines)


@pytest.mark.slow
def test_the_demo_recipe_on_a_reduced_budget_lowers_the_answer_loss_clearly(smollm2_cache, tmp_path):
    """configs/smollm2-cpu.yaml as it is (learning rate, schedule, LoRA, batch), 12 steps instead of its
    full budget, on the bundled data: the eval loss on the answers falls by a clear margin."""
    rows = [json.loads(x) for x in (ROOT / "data" / "aclsum" / "eval.jsonl").read_text().splitlines()]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:12]))
    cfg = load_config(
        ROOT / "configs" / "smollm2-cpu.yaml",
        [
            f"model.cache_dir={smollm2_cache}",
            f"data.eval_file={tmp_path / 'eval.jsonl'}",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=12",
            "train.eval_steps=12",
            "train.save_steps=12",
            # The recipe checkpoints for memory; off trains the same weights (byte-identical), ~30 s sooner.
            "train.gradient_checkpointing=false",
        ],
    )
    result = train(cfg)
    first, last = result.summary["eval_loss_first"], result.summary["eval_loss_best"]
    assert first - last > 0.3, (first, last)
