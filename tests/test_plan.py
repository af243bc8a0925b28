"""The "Will it fit?" planner: the seed's Mistral-7B numbers, exact LoRA counts, and suggestions that really fit.

Nothing here loads weights or builds a model: the planner reads config.json only. Sizes are checked in
decimal GB (10**9 bytes) where they are compared with the seed design's table, which is in GB, and in
GiB (2**30 bytes) where they are compared with a device's memory, as `torch.cuda` reports it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from qlora_llm.config import SEED_TARGET_MODULES, load_config
from qlora_llm.plan import (
    FIT_MARGIN,
    GB,
    GIB,
    PlanError,
    estimate_memory,
    format_plan,
    load_model_config,
    plan,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
MISTRAL = "mistralai/Mistral-7B-Instruct-v0.2"

# The seed's setup; model.device=cuda so it is planned for a GPU even on this CPU-only machine.
SEED = [f"model.name={MISTRAL}", "model.device=cuda"]


def mistral_estimate(**changes):
    setup = dict(
        quantization="nf4",
        double_quant=True,
        compute_dtype="bfloat16",
        lora_r=16,
        target_modules=list(SEED_TARGET_MODULES),
        batch_size=2,
        seq_len=512,
        gradient_checkpointing=True,
        optim="paged_adamw_32bit",
        device="cuda",
    )
    setup.update(changes)
    config, _ = load_model_config(MISTRAL)
    return estimate_memory(config, **setup)


def test_seed_setup_lands_in_the_seeds_range():
    report = plan(load_config(None, SEED), device_memory_bytes=8 * GIB)
    est = report.estimate
    # The seed: TOTAL ~6.2 GB, peak <= 7.5 GB with batch 2 (decimal GB).
    assert 5.5 * GB <= est.total <= 7.5 * GB
    assert 5.5 * GB <= est.peak <= 7.5 * GB
    assert est.total < est.peak
    assert report.fits and report.seed_setup and report.suggestions == []
    text = format_plan(report)
    assert "seed GB" in text and "FITS" in text and report.verdict in text
    # One line per component, each with its explanation.
    for label in ("base weights", "LoRA weights", "optimizer states", "activations", "runtime overhead"):
        (line,) = [row for row in text.splitlines() if row.startswith(label)]
        assert len(line.split()) > 5


def test_shipped_mistral_config_has_the_real_values():
    config, source = load_model_config(MISTRAL)
    assert "shipped" in source
    assert config["architectures"] == ["MistralForCausalLM"]
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (
        4096,
        14336,
        32,
    )
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (32, 8, 128)
    assert (config["vocab_size"], config["tie_word_embeddings"], config["sliding_window"]) == (
        32000,
        False,
        None,
    )


def test_lora_param_count_for_mistral_r16_on_all_7_projections():
    # Per layer r * (in + out): q 4096+4096, k 4096+1024, v 4096+1024, o 4096+4096,
    # gate 4096+14336, up 4096+14336, down 14336+4096 = 81920; times r=16 and 32 layers.
    by_hand = 32 * 16 * (8192 + 5120 + 5120 + 8192 + 18432 + 18432 + 18432)
    assert by_hand == 41_943_040  # not the seed's "~6M"
    est = mistral_estimate()
    assert est.lora_params == by_hand
    # On a 4-bit base on CUDA, TRL casts the adapters (and so their gradients) to bf16 ...
    assert est.lora_weights == est.lora_gradients == 2 * by_hand
    # ... while bitsandbytes' 32-bit AdamW keeps two fp32 moments whatever the param dtype.
    assert est.optimizer_states == 8 * by_hand
    # A plain peft loop keeps them in fp32 (0.17 GB, not the seed's "~6M params").
    assert mistral_estimate(lora_dtype="float32").lora_weights == 4 * by_hand
    assert mistral_estimate(optim="paged_adamw_8bit").optimizer_states == 2 * by_hand


def test_nf4_base_is_under_a_third_of_bf16():
    nf4 = mistral_estimate().base_weights
    bf16 = mistral_estimate(quantization="none").base_weights
    assert bf16 == pytest.approx(7_241_732_096 * 2)  # Mistral-7B's 7.24B params in bf16
    assert nf4 < bf16 / 3


def test_kbit_preparation_upcasts_embeddings_and_lm_head_to_fp32():
    prepared, plain = mistral_estimate(), mistral_estimate(kbit_prepared=False)
    embeddings_and_head = 2 * 32000 * 4096
    assert prepared.base_weights - plain.base_weights == pytest.approx(embeddings_and_head * 2, rel=0.01)
    # The residual stream takes the embeddings' fp32: the checkpointed layer inputs double too.
    assert prepared.activations > plain.activations


def test_full_loss_logits_are_counted_twice_in_fp32():
    est = mistral_estimate(compute_dtype="float32", device="cpu", lm_head_loss="full", batch_size=1)
    assert est.logits == 512 * 32000 * 4 * 2  # the logits and the log-softmax cross-entropy keeps
    # TRL's fused head works on tiles of at most 4096 tokens instead of the full (B, T, V) logits.
    assert mistral_estimate(compute_dtype="float32", device="cpu", batch_size=1).logits < est.logits
    long = dict(compute_dtype="float32", device="cpu", batch_size=4, seq_len=2048)
    assert mistral_estimate(**long).logits < mistral_estimate(**long, lm_head_loss="full").logits / 3


def test_double_quant_saves_about_0_37_bits_per_quantized_param():
    linear_params = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    saved = mistral_estimate(double_quant=False).base_weights - mistral_estimate().base_weights
    assert saved * 8 / linear_params == pytest.approx(0.373, abs=0.01)


def test_gradient_checkpointing_lowers_activations():
    with_gc = mistral_estimate(gradient_checkpointing=True)
    without = mistral_estimate(gradient_checkpointing=False)
    assert with_gc.activations * 5 < without.activations
    assert with_gc.peak < without.peak


def test_on_cpu_a_dropout_mask_takes_2_bytes_and_nn_dropouts_noise_the_inputs_dtype():
    """dropout.py's masks are 0/1 in bf16. nn.Dropout's noise has its input's dtype: the residual stream's
    (train.py stops peft's cast to fp32), fp32 on an upcast 4-bit base, bf16 with model.upcast_layers=false;
    o_proj's input is the attention's output, in the compute dtype, either way."""
    inputs = 6 * 4096 + 14336  # the in-features of q, k, v, o, gate, up (4096) and down (14336)
    per_layer_token = 2 * 512 * 32  # tokens x layers
    setup = dict(device="cpu", compute_dtype="bfloat16", gradient_checkpointing=False, lora_dropout=0.05)
    # Without dropout each module keeps autocast's bf16 copy of its input; with it, the mask too.
    hash_masks = mistral_estimate(**setup).activations
    assert hash_masks - mistral_estimate(**setup | {"lora_dropout": 0.0}).activations == per_layer_token * (
        2 * inputs
    )
    torch_masks = mistral_estimate(**setup, dropout_masks="torch").activations
    assert torch_masks - hash_masks == per_layer_token * (4 - 2) * (inputs - 4096)  # fp32 noise but o_proj's
    bf16 = dict(setup, kbit_prepared=False)
    assert mistral_estimate(**bf16, dropout_masks="torch") == mistral_estimate(**bf16)  # bf16 noise: 2 bytes
    no_dropout = dict(setup, lora_dropout=0.0)
    assert mistral_estimate(**no_dropout, dropout_masks="torch") == mistral_estimate(**no_dropout)


def test_on_cpu_auto_masks_are_planned_as_the_run_will_draw_them(monkeypatch):
    """`lora.dropout_masks: auto` compiles the masks on a run long enough to pay for it, and compiled masks
    keep nothing for the backward: the plan asks the run's own rule (dropout.compiles), so a long run is
    planned without the 2-byte masks and a short one with them."""
    import torch

    import qlora_llm.dropout as dropout

    monkeypatch.setattr(dropout, "_compiler_found", lambda: True)
    monkeypatch.setattr(dropout, "eager_mask_seconds", lambda p, shape, dtypes: 0.01)  # 10 ms a mask
    demo = ROOT / "configs" / "smollm2-cpu.yaml"
    fixed = ["model.compute_dtype=float32", "train.gradient_checkpointing=false", "train.batch_size=2"]
    fixed.append("lora.dropout=0.05")  # the demo trains without dropout
    # 210 LoRA dropouts a step (7 projections x 30 layers): 4 steps draw 8.4 s of eager masks, 5 steps 10.5 s.
    short, long = (plan(load_config(demo, [*fixed, f"train.max_steps={n}"])) for n in (4, 5))
    tokens = 2 * short.setup["seq_len"]
    inputs = 6 * 576 + 1536  # SmolLM2's in-features of q, k, v, o, gate, up and down
    assert short.estimate.activations - long.estimate.activations == tokens * 30 * 2 * inputs
    assert "LoRA dropout masks kept" in short.estimate.how["activations"]
    assert "LoRA dropout masks not kept (compiled" in long.estimate.how["activations"]
    # The run's own rule agrees: the short run stays eager there too (compiling the long one's is slow to test).
    assert dropout.fuse_hash_dropout(0.05, (2, 8, 576), (torch.float32,), 4 * 210).startswith("eager (8 s")


def test_on_cpu_the_allocators_slack_is_a_fifth_of_the_activations_and_on_cuda_nothing():
    """RSS holds ~12-28% over the kept tensors on CPU (docs/plan.md); CUDA's counted bytes are allocated ones."""
    for checkpointing in (True, False):
        cpu = mistral_estimate(device="cpu", gradient_checkpointing=checkpointing)
        assert cpu.allocator == int(0.2 * cpu.activations)
        assert cpu.total == cpu.activations + cpu.allocator + sum(
            getattr(cpu, key) for key, _ in cpu.COMPONENTS if key not in ("activations", "allocator")
        )
    cuda = mistral_estimate()
    assert cuda.allocator == 0
    assert "allocator slack" not in format_plan(plan(load_config(None, SEED), device_memory_bytes=24 * GIB))


def test_on_cuda_the_plan_meets_the_measured_7b_peaks_within_10_percent():
    # Measured on an H200 (bench/results/gpu_check-h200-2026-12-04-plan.json, torch.cuda.max_memory_allocated):
    # the 7B check on ACLSum, batch 2, longest example 356 Mistral tokens, at most 47 answer tokens each.
    # Allocated bytes never see the CUDA context, so the plan is compared without its overhead line.
    measured = {True: 5.329476356506348 * GIB, False: 12.319570541381836 * GIB}
    for checkpointing, peak in measured.items():
        est = mistral_estimate(seq_len=356, scored_tokens=2 * 47, gradient_checkpointing=checkpointing)
        assert abs(est.peak - est.overhead - peak) / peak < 0.10, (checkpointing, est.peak / GIB)


def test_on_cuda_the_fused_head_tiles_only_the_labelled_tokens_and_on_cpu_every_token():
    answers_only = mistral_estimate(seq_len=356, scored_tokens=94, gradient_checkpointing=False)
    every_token = mistral_estimate(seq_len=356, gradient_checkpointing=False)
    # The loss's backward tile: 94 x 32000 bf16 logits instead of 712 x 32000...
    assert every_token.transient - answers_only.transient == (712 - 94) * 32000 * 2
    # ...for a copy of the 94 labelled positions' hidden states (fp32: the upcast lm_head's dtype).
    assert answers_only.logits - every_token.logits == 94 * 4096 * 4
    cpu = {"device": "cpu", "compute_dtype": "float32"}
    assert mistral_estimate(seq_len=356, scored_tokens=94, **cpu) == mistral_estimate(seq_len=356, **cpu)


def test_on_cuda_a_checkpointed_step_peaks_at_the_loss_or_at_a_recomputed_layer_never_both():
    # The loss's buffers are freed before the backward recomputes a layer (an allocation trace on an
    # H200 put every checkpointed peak there): the peak is the larger phase, not their sum.
    est = mistral_estimate(seq_len=356, scored_tokens=94)
    assert "a recomputed layer's set" in est.how["transient"]
    shape = 356 * 2 * 4096  # tokens x hidden
    loss_phase = est.total + shape * 4 + 94 * 32000 * 2 + 32000 * 4096 * 2  # fp32 grad, tile, head copy
    assert est.peak > loss_phase  # the recompute phase is the larger here
    no_ckpt = mistral_estimate(seq_len=356, scored_tokens=94, gradient_checkpointing=False)
    assert "recomputed" not in no_ckpt.how["transient"]


def test_batch_2_needs_more_than_batch_1():
    one, two = mistral_estimate(batch_size=1), mistral_estimate(batch_size=2)
    assert two.activations > one.activations and two.logits > one.logits and two.peak > one.peak
    assert two.base_weights == one.base_weights


def test_seven_b_does_not_fit_in_4_gib_and_says_why():
    report = plan(load_config(None, SEED), device_memory_bytes=4 * GIB)
    assert not report.fits
    # The 4-bit weights plus the CUDA context are already over 92% of 4 GiB: no setting can fix that.
    assert report.estimate.base_weights + report.estimate.overhead > 0.92 * 4 * GIB
    assert report.suggestions == []
    assert any("smaller model" in note for note in report.notes)
    assert "DOES NOT FIT" in format_plan(report)


@pytest.mark.parametrize(
    "overrides, memory_gib",
    [
        # Checkpointing off, batch 4, 1024 tokens: needs several changes stacked.
        (["train.gradient_checkpointing=false", "train.batch_size=4", "data.max_seq_length=1024"], 8),
        # No quantization: 14.5 GB of bf16 weights; nf4 alone fixes it.
        (["model.quantization=none"], 16),
        # Checkpointing off at the seed's batch: turning it back on is enough.
        (["train.gradient_checkpointing=false"], 8),
    ],
    ids=["stacked", "quantize", "checkpointing"],
)
def test_suggestions_really_fit_when_replanned(overrides, memory_gib):
    report = plan(load_config(None, SEED + overrides), device_memory_bytes=memory_gib * GIB)
    assert not report.fits
    assert report.suggestions
    text = format_plan(report)
    before = load_config(None, SEED + overrides)
    for suggestion in report.suggestions:
        assert " ".join(suggestion.overrides) in text
        after = load_config(None, SEED + overrides + suggestion.overrides)
        replanned = plan(after, device_memory_bytes=memory_gib * GIB)
        assert replanned.fits
        assert replanned.peak == suggestion.peak
        # A smaller batch comes with more accumulation: the examples per optimizer step stay.
        effective = after.train.batch_size * after.train.gradient_accumulation_steps
        assert effective >= before.train.batch_size * before.train.gradient_accumulation_steps


def test_smollm2_on_cpu_fits_in_24_gib():
    demo = ROOT / "configs" / "smollm2-cpu.yaml"
    assert plan(load_config(demo), device_memory_bytes=24 * GIB).checkpointing == "on"  # the recipe's choice
    report = plan(load_config(demo, ["train.gradient_checkpointing=auto"]), device_memory_bytes=24 * GIB)
    assert report.device == "cpu" and report.setup["compute_dtype"] == "float32"
    assert (
        report.fits
        and report.checkpointing == "auto: off (the run fits without it), decided on 24.00 GiB given"
    )
    # A step is the whole run's peak: the in-training evaluations reuse its memory (docs/plan.md).
    train = next(st for st in report.stages if st.name == "train")
    assert report.peak_stage == "train" and report.peak == train.peak == report.estimate.peak
    assert report.estimate.peak < 4 * GIB
    assert not report.seed_setup and "seed GB" not in format_plan(report)
    assert "allocator slack" in format_plan(report)


def test_4bit_evaluation_and_serving_on_cpu_count_the_fused_kernels_second_copy():
    """A 4-bit layer that alternates between the fused kernel (decode) and the plain one (scoring) keeps
    both layouts (cpu4bit.py): the 4-bit data and its bf16 block constants once more, on CPU only."""
    demo = ROOT / "configs" / "smollm2-cpu.yaml"
    nf4 = plan(
        load_config(demo, ["eval.quantization=nf4", "serve.quantization=nf4"]), device_memory_bytes=24 * GIB
    )
    plain = plan(load_config(demo), device_memory_bytes=24 * GIB)
    # SmolLM2-135M: 30 layers of q, k, v, o (576 x 576, 576 x 192 twice, 576 x 576) and 3 x 576 x 1536.
    numel = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    for name in ("evaluate", "serve"):
        stage = next(st for st in nf4.stages if st.name == name)
        assert stage.components["fused kernel's copy"] == 30 * (numel // 2 + 2 * numel // 64)
        assert "fused kernel's copy" not in next(st for st in plain.stages if st.name == name).components
    on_gpu = plan(
        load_config(demo, ["model.device=cuda", "eval.quantization=nf4"]), device_memory_bytes=24 * GIB
    )
    assert "fused kernel's copy" not in next(st for st in on_gpu.stages if st.name == "evaluate").components


def test_the_plan_of_a_run_counts_run_itself_beside_training_on_cpu_only():
    """`qlora-llm run` waits in RAM while its training process trains: the plan `qlora-llm plan` prints
    (the stages of `run`) counts it on training's stage and decides checkpointing without its share; the
    plan `train` makes for itself does not (its available memory already excludes the parent's)."""
    from qlora_llm.plan import RUN_PARENT

    demo = load_config(ROOT / "configs" / "smollm2-cpu.yaml")
    alone = plan(demo, device_memory_bytes=24 * GIB)
    beside = plan(demo, device_memory_bytes=24 * GIB, under_run=True)
    train = {
        r: next(st for st in p.stages if st.name == "train") for r, p in (("alone", alone), ("run", beside))
    }
    assert train["run"].components["the waiting `run` process"] == RUN_PARENT
    assert train["run"].peak == train["alone"].peak + RUN_PARENT and beside.peak == alone.peak + RUN_PARENT
    assert "the waiting `run` process" not in train["alone"].components
    on_gpu = plan(load_config(None, ["model.device=cuda"]), device_memory_bytes=24 * GIB, under_run=True)
    assert (
        "the waiting `run` process" not in next(st for st in on_gpu.stages if st.name == "train").components
    )
    # Checkpointing auto: a budget that fits the step alone but not beside `run` checkpoints.
    auto = load_config(ROOT / "configs" / "smollm2-cpu.yaml", ["train.gradient_checkpointing=auto"])
    step = plan(auto, device_memory_bytes=24 * GIB).estimate.peak
    room = int((step + RUN_PARENT // 2) / FIT_MARGIN)
    assert plan(auto, device_memory_bytes=room).checkpointing.startswith("auto: off")
    assert plan(auto, device_memory_bytes=room, under_run=True).checkpointing.startswith("auto: on")


def test_an_in_training_evaluation_lands_on_the_loading_peak_without_full_logits():
    """TRL evaluates through the same fused LM head as training: one layer's intermediates and the loss
    tiles, never the (B, T, V) logits. On CPU the step-0 evaluation comes right after loading, so where a
    step is smaller than loading (short sequences, checkpointing), that forward sits on the loading peak."""
    short = ["model.compute_dtype=float32", "data.max_seq_length=16", "train.batch_size=1"]
    cfg = load_config(ROOT / "configs" / "smollm2-cpu.yaml", [*short, "train.gradient_checkpointing=true"])
    report = plan(cfg, device_memory_bytes=24 * GIB)
    est, train = report.estimate, next(st for st in report.stages if st.name == "train")
    assert est.peak == est.loading  # the step is smaller than loading
    forward = 1 * 16 * (3 * 1536 + 4 * 576) * 4 + est.logits  # B*T*(3I + 4H)*a + the fused head's tiles
    assert train.components == {"training step": est.loading, "eval forward above it": forward}
    assert forward < 1 * 16 * 49152 * 4 + est.logits  # less than the full fp32 logits would add
    assert train.peak == est.loading + forward


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_can_be_planned_offline(path):
    report = plan(load_config(path), device_memory_bytes=8 * GIB)
    assert report.estimate.peak > 0 and format_plan(report)


def test_reads_config_json_from_a_local_folder(tmp_path):
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "tie_word_embeddings": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    report = plan(
        load_config(None, [f"model.name={tmp_path}", "model.device=cpu", "lora.r=4"]), device_memory_bytes=GIB
    )
    assert report.config_source == str(tmp_path / "config.json")
    # head_dim defaults to 64 / 4 = 16, so k and v project 64 -> 32; r * (in + out) per module, 2 layers.
    per_layer = 4 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + (64 + 128) * 2 + (128 + 64))
    assert report.estimate.lora_params == 2 * per_layer
    assert report.fits


def test_folder_without_config_json_is_a_clear_error(tmp_path):
    with pytest.raises(PlanError, match="no config.json"):
        plan(load_config(None, [f"model.name={tmp_path}", "model.device=cpu"]), device_memory_bytes=GIB)


def test_unknown_hub_id_offline_is_a_clear_error():
    with pytest.raises(PlanError, match="could not be found offline") as err:
        plan(
            load_config(None, ["model.name=nobody-here/no-such-model-7b", "model.device=cpu"]),
            device_memory_bytes=GIB,
        )
    assert "config.json" in str(err.value) and "folder" in str(err.value)


def _plan_accuracy():
    sys.path.insert(0, str(ROOT / "bench"))
    import plan_accuracy

    return plan_accuracy


@pytest.mark.slow
@pytest.mark.parametrize(
    "point",
    [
        (1, 256, "true", 16, "nf4", "float32", None),  # the weights' loading sets the peak
        (4, 256, "false", 16, "nf4", "float32", None),  # the activations of every layer do
        (2, 256, "true", 16, "none", "float32", None),  # plain LoRA on fp32 weights
    ],
    ids=["nf4-checkpointed-b1", "nf4-b4-no-checkpointing", "lora-checkpointed-b2"],
)
def test_plan_is_within_15_percent_of_the_measured_peak_on_cpu(point, smollm2_cache, tmp_path):
    """`plan` vs the whole-process peak RSS of a real 2-step run of SmolLM2 (bench/plan_accuracy.py)."""
    accuracy = _plan_accuracy()
    extra = (f"model.cache_dir={smollm2_cache}",)
    data = accuracy.filled_data(tmp_path, {point[1]}, count=8, extra=extra)[point[1]]
    out = tmp_path / "run"
    planned, _ = accuracy.planned(point, data, out, 2, extra)
    measured = accuracy.measure(point, data, out, 2, extra)
    assert "error" not in measured, measured
    error = (planned - measured["peak"]) / measured["peak"]
    assert abs(error) <= 0.15, f"planned {planned / GIB:.2f} GiB, measured {measured['peak'] / GIB:.2f} GiB"


@pytest.mark.slow
def test_plan_is_within_15_percent_of_a_whole_runs_peak_on_cpu(smollm2_cache, tmp_path):
    """`qlora-llm run` of the demo config, shortened (2 steps with evaluations at 0, 1 and 2, a checkpoint
    and the final save, in a process of its own; then `evaluate` of base and tuned on 8 test papers, 32
    new tokens, fewer general items): what the command's process tree held at once (`run` waits beside its
    training and base-evaluation processes), at least its largest process's max RSS, vs the largest planned
    stage it goes through (bench/plan_accuracy.py --whole; the full demo's figures are in docs/plan.md)."""
    accuracy = _plan_accuracy()
    row = accuracy.whole_run(
        [
            "run",
            str(ROOT / "configs" / "smollm2-cpu.yaml"),
            f"model.cache_dir={smollm2_cache}",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=2",
            "train.eval_steps=1",
            "train.save_steps=1",
            "eval.max_examples=8",
            "eval.max_new_tokens=32",
            "eval.speed_runs=1",
            "eval.benchmark_prompts=null",
            "eval.general_limit=32",
            "eval.general_generative_limit=16",
        ]
    )
    assert row["returncode"] == 0, row["last_line"]
    error = (row["planned"] - row["measured"]) / row["measured"]
    assert row["measured"] >= row["max_rss"] > 0
    assert abs(error) <= 0.15, (
        f"planned {row['planned'] / GIB:.2f} GiB ({row['planned_stage']}), measured {row['measured'] / GIB:.2f} GiB "
        f"(max RSS {row['max_rss'] / GIB:.2f})"
    )


def test_the_evaluate_stage_is_sized_by_the_evaluation_data_and_the_general_benchmarks():
    """The demo evaluates test papers longer than its training cut and lm-eval batches of 16 requests:
    the evaluate stage takes the largest of the perplexity batch, the KV cache and lm-eval's batch."""
    from qlora_llm.data import load_examples, tokenize_examples
    from qlora_llm.model import load_tokenizer
    from qlora_llm.plan import (
        EVAL_LOGITS_TILE_BYTES,
        LM_EVAL_LOGITS_COPIES,
        EvaluationShape,
        ModelShape,
        _kv_cache_bytes,
        _setup,
        estimate_stages,
        evaluation_shape,
    )
    from qlora_llm.templates import resolve_template

    cfg = load_config(ROOT / "configs" / "smollm2-cpu.yaml", ["model.compute_dtype=float32"])
    shape = evaluation_shape(cfg)
    tokenizer = load_tokenizer(cfg.model.name)
    template = resolve_template(cfg.model.template, tokenizer)
    rows, _ = tokenize_examples(load_examples(ROOT / cfg.eval.data_file), tokenizer, template, 10**9)
    assert shape.example_tokens == max(len(r["input_ids"]) for r in rows)
    assert 20 < shape.general_tokens < 1000  # an ARC-Easy / PIQA question and its longest choice

    model_config, _ = load_model_config(cfg.model.name)
    setup = _setup(cfg, "cpu")
    vocab, batch = model_config["vocab_size"], cfg.eval.general_batch_size

    def evaluate(evaluation):
        return next(
            st for st in estimate_stages(model_config, cfg, setup, evaluation) if st.name == "evaluate"
        )

    long_requests = evaluate(EvaluationShape(100, 4000))
    assert long_requests.components["logits or KV cache"] == batch * 4000 * vocab * LM_EVAL_LOGITS_COPIES * 4
    assert "lm-eval's logits, log-softmax and a temporary at batch 16 x 4000 tokens" in long_requests.how
    # Long papers: the perplexity pass holds its last hidden states and one tile of LM-head logits (+ their
    # log-softmax), never the whole (B, T, V): here less than a tenth of those logits.
    shape_ = ModelShape.from_config(model_config)
    tile = EVAL_LOGITS_TILE_BYTES // (8 * vocab)
    perplexity = cfg.eval.batch_size * 4000 * shape_.hidden * 4 + tile * vocab * 8
    # ROUGE's greedy answers at eval.answers_batch_size rows: their KV cache, the last position's logits
    # and the prefill's activations (one layer's at a time), over the longest paper.
    r = cfg.eval.answers_batch_size
    kv = (
        _kv_cache_bytes(shape_, r, 4000 + cfg.eval.max_new_tokens, 4)
        + r * vocab * 4
        + r * 4000 * (3 * shape_.intermediate + 4 * shape_.hidden) * 4
    )
    long_papers = evaluate(EvaluationShape(4000, 10))
    assert perplexity < cfg.eval.batch_size * 4000 * vocab * 8 / 10
    assert long_papers.components["logits or KV cache"] == max(perplexity, kv, batch * 10 * vocab * 3 * 4)
    assert f"greedy answers at batch {r} with a KV cache of 4000 + 64 tokens" in long_papers.how
    # The base's fp16 log-probs on the KL prompts are held while the fine-tuned model is evaluated.
    assert 20 < shape.kl_tokens < 400  # a rendered question + eval.general_max_new_tokens
    kl = evaluate(EvaluationShape(100, 10, 80)).components["base's KL log-probs"]
    assert kl == cfg.eval.kl_prompts * 80 * vocab * 2
    # The generative tasks' greedy answers, eval.general_answers_batch_size rows over the longest question:
    # their KV cache and prefill grow with the rows (twice the rows, twice the bytes).
    assert shape.kl_tokens <= shape.answer_tokens < 400
    long_questions = evaluate(EvaluationShape(100, 10, 80, 4000))
    n = cfg.eval.general_answers_batch_size
    assert f"generative answers at batch {n} with a KV cache of 4000 tokens" in long_questions.how
    doubled = load_config(
        ROOT / "configs" / "smollm2-cpu.yaml",
        ["model.compute_dtype=float32", f"eval.general_answers_batch_size={2 * n}"],
    )
    twice = next(
        st
        for st in estimate_stages(
            model_config, doubled, _setup(doubled, "cpu"), EvaluationShape(100, 10, 80, 4000)
        )
        if st.name == "evaluate"
    )
    assert twice.components["logits or KV cache"] == 2 * long_questions.components["logits or KV cache"]
    # Without measurements, the training length stands in and no lm-eval batch or KL log-probs are counted.
    unmeasured = evaluate(None)
    T = setup["seq_len"]
    assert unmeasured.components["logits or KV cache"] == max(
        cfg.eval.batch_size * T * shape_.hidden * 4 + tile * vocab * 8,
        _kv_cache_bytes(shape_, r, T + cfg.eval.max_new_tokens, 4)
        + r * vocab * 4
        + r * T * (3 * shape_.intermediate + 4 * shape_.hidden) * 4,
    )
    assert unmeasured.components["base's KL log-probs"] == 0


def test_the_plan_command_sizes_the_evaluate_stage_from_its_data(capsys):
    from qlora_llm.cli import main

    assert main(["plan", str(ROOT / "configs" / "smollm2-cpu.yaml"), "--memory", "24"]) == 0
    said = capsys.readouterr()
    evaluate = next(line for line in said.out.splitlines() if line.startswith("evaluate "))
    assert "WARNING" not in said.err, said.err  # lm-eval's notice about its own command line, per task: held
    assert "the largest batch: lm-eval's logits, log-softmax and a temporary at batch 16 x " in evaluate
