"""bench/gpu_check.py's CPU side: what a one-shot GPU run depends on, checked where there is no GPU.

The stage runner (errors recorded, the budget honoured, the JSON rewritten after every stage), the
random-weight folders, the overrides (real config keys, the seed's plan), the filled grid data, the
plan-vs-measured arithmetic and the table; and, marked slow, every stage end to end on the CPU with
tiny widths (the script's hidden --cpu flag).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
GIB = 2**30


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------------------------------
# Without a GPU, and the command line


def test_without_a_gpu_it_says_so_exits_0_and_writes_nothing(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("no GPU here: ")
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_stage_is_refused_by_name(capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--stages", "qlora,mergee"])
    assert exc.value.code == 2
    assert "--stages: unknown mergee; choose from qlora, packing, ckpt-auto" in capsys.readouterr().err


def test_a_zero_budget_skips_every_stage_and_still_writes_the_json_and_the_table(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--cpu", "--budget-s", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["finished"] is True
    assert [r["stage"] for r in result["rows"]] == ["weights", *gpu_check.STAGES]
    assert {(r["status"], r["note"]) for r in result["rows"]} == {("skipped", "skipped: time budget")}
    assert not Path(result["meta"]["work_dir"]).exists()  # a temporary work folder is removed
    printed = capsys.readouterr().out
    assert "stage" in printed and "planned GiB" in printed and "error %" in printed
    assert printed.count("skipped: time budget") == 7


def test_default_out_is_under_OUT_when_set_else_in_the_ignored_runs_folder(tmp_path):
    assert gpu_check.default_out({"OUT": str(tmp_path)}) == tmp_path / "gpu_check.json"
    assert gpu_check.default_out({}) == ROOT / "runs" / "gpu-check" / "gpu_check.json"


def test_subprocesses_run_offline_with_this_checkouts_src_first():
    env = gpu_check.child_env({"PYTHONPATH": f"/carried{os.pathsep}{ROOT / 'src'}", "KEEP": "1"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT / "src"), "/carried"]
    assert env["HF_HUB_OFFLINE"] == "1" and env["PYTHONUNBUFFERED"] == "1" and env["KEEP"] == "1"
    assert gpu_check.child_env({})["PYTHONPATH"] == str(ROOT / "src")


# --------------------------------------------------------------------------------------------------
# The stage runner


def test_a_failing_stage_is_recorded_and_the_next_runs_with_the_json_written_after_each(tmp_path):
    out = tmp_path / "r.json"
    on_disk_during_third = []

    def fails(budget):
        raise ValueError("boom")

    def third(budget):
        on_disk_during_third.append(json.loads(out.read_text()))
        return [
            {"stage": "third a", "tokens_per_s": 5.0},
            {"stage": "third b", "status": "error", "note": "x"},
        ]

    rows = gpu_check.run_stages(
        [("first", lambda budget: {"tokens_per_s": 1.0}), ("second", fails), ("third", third)],
        gpu_check.Budget(100),
        lambda rows: gpu_check.write_json(out, {}, rows, finished=False),
    )
    assert [(r["stage"], r["status"]) for r in rows] == [
        ("first", "ok"),
        ("second", "error"),
        ("third a", "ok"),
        ("third b", "error"),
    ]
    assert rows[1]["note"] == "error: ValueError: boom"
    assert 'raise ValueError("boom")' in rows[1]["traceback"]
    assert all(isinstance(r["seconds"], float) for r in rows)
    # The first two stages were on disk before the third ran: a kill there keeps them.
    assert [r["stage"] for r in on_disk_during_third[0]["rows"]] == ["first", "second"]
    assert [r["stage"] for r in json.loads(out.read_text())["rows"]] == [
        "first",
        "second",
        "third a",
        "third b",
    ]


def test_no_stage_starts_after_the_budget_and_a_stage_sees_what_is_left():
    clock, ran, seen_left = FakeClock(), [], []

    def slow(budget):
        seen_left.append(budget.left())
        ran.append("slow")
        clock.now += 100  # this stage takes 100 s of a 150 s budget
        return {}

    def quick(name):
        def stage(budget):
            seen_left.append(budget.left())
            ran.append(name)
            clock.now += 60
            return {}

        return stage

    rows = gpu_check.run_stages(
        [("slow", slow), ("quick", quick("quick")), ("late", quick("late")), ("later", quick("later"))],
        gpu_check.Budget(150, clock=clock),
        lambda rows: None,
    )
    assert ran == ["slow", "quick"]  # quick started with 50 s left and ran over; then nothing starts
    assert seen_left == [150, 50]
    assert [(r["stage"], r["status"], r.get("note")) for r in rows][2:] == [
        ("late", "skipped", "skipped: time budget"),
        ("later", "skipped", "skipped: time budget"),
    ]
    assert [r["seconds"] for r in rows[:2]] == [100, 60]
    assert gpu_check.subprocess_timeout(gpu_check.Budget(150, clock=clock)) == 150 + gpu_check.GRACE_S


# --------------------------------------------------------------------------------------------------
# Planned vs measured, and the table


def test_error_pct_is_the_plans_distance_from_the_measurement():
    assert gpu_check.error_pct(10 * GIB, 12 * GIB) == pytest.approx(20.0)
    assert gpu_check.error_pct(10 * GIB, 8 * GIB) == pytest.approx(-20.0)
    assert gpu_check.error_pct(None, 8) is None and gpu_check.error_pct(8, None) is None
    assert gpu_check.error_pct(0, 8) is None


def test_a_runs_row_against_its_plan_and_in_the_table():
    summary = {
        "steps": 12,
        "tokens_trained": 12 * 1000,
        "tokens_per_s": 1234.4,
        "peak_memory_bytes": 10 * GIB,
        "gradient_checkpointing": "partial (20 of 32 layers)",
        "compute_dtype": "bfloat16",
        "load_peak_memory_bytes": 4.5 * GIB,
    }
    row = gpu_check.train_row(summary, 12 * GIB, GIB // 2)
    assert row["peak_gib"] == 10.0 and row["planned_gib"] == 12.0
    assert row["error_pct"] == pytest.approx(20.0)
    assert row["error_pct_without_overhead"] == pytest.approx(15.0)
    assert row["note"] == (
        "12 steps, 1000 tokens/step, gradient checkpointing partial (20 of 32 layers), compute dtype "
        "bfloat16, peak while loading 4.50 GiB, plan without its 0.5 GiB overhead: +15.0%"
    )
    old = gpu_check.train_row({"steps": 3, "peak_memory_bytes": GIB, "tokens_per_s": 9.0}, None, None)
    assert old["error_pct"] is None and "checkpointing" not in old["note"]

    rows = [
        {"stage": "qlora", "seconds": 61.4, **row},
        {"stage": "ckpt-auto", "status": "error", "planned_gib": 7.25, "seconds": 3.0, "note": "exit 2: bad"},
        {"stage": "grid b8 T1024 ckpt r64 nf4", "status": "skipped", "note": "skipped: time budget"},
    ]
    header, qlora, auto, grid = gpu_check.format_table(rows).splitlines()
    assert header.split()[:3] == ["stage", "tokens/s", "peak"]
    assert qlora.split()[:6] == ["qlora", "1234", "10.00", "12.00", "+20.0", "61"]
    assert auto.split()[:6] == ["ckpt-auto", "-", "-", "7.25", "-", "3"]
    assert grid.split()[:6] == ["grid", "b8", "T1024", "ckpt", "r64", "nf4"]
    assert grid.split()[6:11] == ["-", "-", "-", "-", "-"]
    # The columns line up: every row's note starts where the header's does.
    start = header.index("note")
    assert qlora[start:].startswith("12 steps") and auto[start:].startswith("exit 2")


def test_steady_tokens_per_s_skips_the_first_two_logged_steps(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": i, "tokens_per_s": v} for i, v in enumerate([10, 20, 300, 500, 400], 1)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in [*rows, {"step": 5, "eval_loss": 1.0}]))
    assert gpu_check.steady_tokens_per_s(metrics) == 400
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    assert gpu_check.steady_tokens_per_s(metrics) is None
    assert gpu_check.steady_tokens_per_s(tmp_path / "missing.jsonl") is None


def test_last_line_finds_what_went_wrong_under_progress_bars_and_tracebacks():
    tail = "training:  50%|#####     | 6/12 [00:03<00:03]\rtraining:  58%\nerror: out of memory on cuda at step 7\n"
    assert gpu_check.last_line(tail) == "error: out of memory on cuda at step 7"
    tail = 'Traceback (most recent call last):\n  File "x.py", line 1\nRuntimeError: CUDA error: boom\n'
    assert gpu_check.last_line(tail) == "RuntimeError: CUDA error: boom"
    assert gpu_check.last_line("") == ""


# --------------------------------------------------------------------------------------------------
# The overrides name real config keys and give the seed's plan


def test_the_seed_overrides_plan_exactly_as_the_seed_config(tmp_path):
    from qlora_llm.config import load_config
    from qlora_llm.plan import SEED_MODEL, load_model_config, plan

    folder = tmp_path / "random-7b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(load_model_config(SEED_MODEL)[0]))
    overrides = [*gpu_check.seed_overrides(folder, "cuda", 12), f"train.output_dir={tmp_path / 'run'}"]
    cfg = load_config(gpu_check.SEED_CONFIG, overrides)
    assert (cfg.train.batch_size, cfg.data.max_seq_length, cfg.train.max_steps) == (2, 512, 12)
    assert (cfg.data.eval_file, cfg.data.eval_fraction, cfg.train.early_stopping_patience) == (None, 0, 0)
    assert cfg.data.train_file == gpu_check.ACLSUM and cfg.data.train_file.is_file()

    memory = 141 * GIB
    peak, overhead, note = gpu_check.planned(gpu_check.SEED_CONFIG, overrides, memory)
    seed = plan(load_config(gpu_check.SEED_CONFIG), device_memory_bytes=memory).estimate
    assert (peak, overhead, note) == (seed.peak, seed.overhead, "")

    # With auto the plan decides, and the note says what: a 141 GiB GPU needs no checkpointing.
    peak, _, note = gpu_check.planned(
        gpu_check.SEED_CONFIG, [*overrides, "train.gradient_checkpointing=auto"], memory
    )
    assert note == "plan: checkpointing auto: off (the run fits without it), decided on 141.00 GiB given"
    assert peak > seed.peak
    peak, overhead, note = gpu_check.planned(
        gpu_check.SEED_CONFIG, [*overrides, "train.gradient_checkpointing=sometimes"], memory
    )
    assert peak is None and overhead is None and note.startswith("no plan (ConfigError: ")


def test_the_grid_varies_every_setting_and_its_overrides_are_real_keys(tmp_path):
    from qlora_llm.config import load_config

    assert len(gpu_check.GRID) == 8
    for i, values in enumerate([{1, 4, 8}, {256, 1024}, {True, False}, {8, 64}, {"nf4", "none"}]):
        assert {p[i] for p in gpu_check.GRID} == values
    assert len({gpu_check.grid_label(p) for p in gpu_check.GRID}) == 8
    for point in gpu_check.GRID:
        batch, seq_len, checkpointing, r, quantization = point
        overrides = gpu_check.grid_overrides(tmp_path / "m", "cuda", tmp_path / "d.jsonl", point, 3)
        cfg = load_config(gpu_check.SEED_CONFIG, overrides)
        assert (cfg.train.batch_size, cfg.data.max_seq_length, cfg.train.gradient_checkpointing) == (
            batch,
            seq_len,
            checkpointing,
        )
        assert (cfg.lora.r, cfg.model.quantization, cfg.train.max_steps) == (r, quantization, 3)


def test_grid_examples_are_filled_to_just_under_the_length(mistral_tokenizer):
    from qlora_llm.data import tokenize_examples

    text = " ".join(json.loads(line)["input"] for line in gpu_check.ACLSUM.read_text().splitlines()[:60])
    for seq_len in (256, 1024):
        records = gpu_check.filled_examples(mistral_tokenizer, seq_len, 6, text)
        rows, dropped = tokenize_examples(records, mistral_tokenizer, "mistral", seq_len)
        assert len(records) == 6 and dropped == 0
        assert all(seq_len - 16 <= len(r["input_ids"]) <= seq_len for r in rows)
        assert len({r["input"] for r in records}) == 6  # cut from different places


# --------------------------------------------------------------------------------------------------
# Random-weight folders and the zeroed adapter


@pytest.mark.parametrize("name", ["mistral", "smollm2"])
def test_a_random_weight_folder_loads_with_transformers_and_is_reused(tmp_path, name, mistral_tokenizer):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_llm.plan import SEED_MODEL, load_model_config

    config, _ = load_model_config(SEED_MODEL if name == "mistral" else "smollm2-135m-instruct")
    changes = {**gpu_check.TINY, "num_hidden_layers": 3, "vocab_size": len(mistral_tokenizer)}
    folder = tmp_path / name
    info = gpu_check.write_random_model(folder, config, device="cpu", seed=1, changes=changes)
    assert info["reused"] is False and info["config"]["num_hidden_layers"] == 3

    model, loading = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    assert model.config.model_type == config["model_type"] and model.config.num_hidden_layers == 3
    assert model.config.tie_word_embeddings is config["tie_word_embeddings"]
    assert model.config.vocab_size == len(mistral_tokenizer) == 32000
    files = sorted(folder.glob("*.safetensors"))
    with safe_open(str(files[0]), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "[INST] Summarize this. [/INST]"
    assert tokenizer(text)["input_ids"] == mistral_tokenizer(text)["input_ids"]
    with torch.no_grad():
        logits = model(**tokenizer(text, return_tensors="pt")).logits
    assert torch.isfinite(logits).all() and logits.std() > 0
    assert load_model_config(str(folder))[0]["num_hidden_layers"] == 3  # the planner reads the same shape

    stamp = files[0].stat().st_mtime_ns
    again = gpu_check.write_random_model(folder, config, device="cpu", seed=1, changes=changes)
    assert again["reused"] is True and files[0].stat().st_mtime_ns == stamp
    gpu_check.write_random_model(folder, config, device="cpu", seed=2, changes=changes)
    other = AutoModelForCausalLM.from_pretrained(folder)
    assert not torch.equal(other.lm_head.weight, model.lm_head.weight)


def test_the_zeroed_adapter_copy_keeps_lora_A_and_zeroes_lora_B(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "final_adapter"
    adapter.mkdir()
    weights = {
        "base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(4, 8),
        "base_model.model.layers.0.q_proj.lora_B.weight": torch.randn(8, 4),
    }
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    (adapter / "config.yaml").write_text("model: {}\n")

    copy = gpu_check.zero_adapter_copy(adapter, tmp_path / "zero")
    got = load_file(str(copy / "adapter_model.safetensors"))
    assert torch.equal(got["base_model.model.layers.0.q_proj.lora_A.weight"], weights[next(iter(weights))])
    assert not got["base_model.model.layers.0.q_proj.lora_B.weight"].any()
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in adapter.iterdir())
    original = load_file(str(adapter / "adapter_model.safetensors"))
    assert original["base_model.model.layers.0.q_proj.lora_B.weight"].any()  # the run's own is untouched


@pytest.mark.slow
def test_the_merge_stages_fallback_a_zeroed_copy_of_a_real_adapter_merges_exactly(tiny_run, tmp_path):
    from qlora_llm.cli import main

    zero = gpu_check.zero_adapter_copy(tiny_run / "final_adapter", tmp_path / "zero")
    assert main(["merge", str(zero), "--out", str(tmp_path / "merged")]) == 0
    v = json.loads((tmp_path / "merged" / "merge_verification.json").read_text())
    assert v["passed"] is True and v["logits"]["max_abs_diff"] == 0.0
    assert (
        v["base_model"]
        == json.loads((tiny_run / "final_adapter" / "adapter_config.json").read_text())[
            "base_model_name_or_path"
        ]
    )


# --------------------------------------------------------------------------------------------------
# Every stage, end to end, on the CPU with tiny widths


@pytest.mark.slow
def test_every_stage_runs_end_to_end_on_the_cpu_with_tiny_widths(tmp_path):
    out = tmp_path / "out" / "gpu_check.json"
    env = {**os.environ, "QLORA_LLM_CPU_AUTO_DTYPE": "float32", "HOME": str(tmp_path)}
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--cpu",
            "--stages",
            "qlora,ckpt-auto,merge,serving,plan-grid",
            "--steps",
            "2",
            "--grid-steps",
            "1",
            "--grid-points",
            "2",
            "--serve-batch",
            "2",
            "--serve-tokens",
            "3",
            "--out",
            str(out),
            "--work-dir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["stage"]: r for r in result["rows"]}
    assert result["finished"] is True
    assert rows["weights"]["status"] == "ok" and "2 layers, hidden 64" in rows["weights"]["note"]

    qlora = rows["qlora"]
    assert qlora["status"] == "ok", qlora
    assert qlora["summary"]["steps"] == 2 and qlora["tokens_per_s"] > 0 and qlora["planned_gib"] > 0
    assert qlora["error_pct"] == pytest.approx(
        gpu_check.error_pct(qlora["summary"]["peak_memory_bytes"], qlora["planned_gib"] * GIB)
    )
    # The run says what auto chose; a run that failed says why, and the check went on either way.
    auto = rows["ckpt-auto"]
    if auto["status"] == "ok":
        assert auto["note"].count("gradient checkpointing auto: ") == 1  # the run's own choice, once
    else:
        assert auto["status"] == "error" and auto["note"].startswith("exit ")

    merge = rows["merge"]
    assert merge["status"] == "ok", merge
    assert merge["output_bytes"] > 0 and merge["verification"]["passed"] is True
    for label in ("serving nf4", "serving 16-bit"):
        assert rows[label]["status"] == "ok", rows[label]
        assert rows[label]["generated_tokens"] == 2 * 3 and rows[label]["tokens_per_s"] > 0
        assert rows[label]["prefills"] == 1  # the two prompts were decoded as one batch
        assert "merged" in rows[label]["note"]  # it served the merged model

    grid = [r for r in result["rows"] if r["stage"].startswith("grid b")]
    assert [r["stage"] for r in grid] == [gpu_check.grid_label(p) for p in gpu_check.GRID[:2]]
    assert all(r["status"] == "ok" and r["error_pct"] is not None for r in grid), grid
    assert (out.parent / "gpu_check-logs" / "qlora.log").is_file()
    table = done.stdout[done.stdout.index("error % = 100") :]
    for stage in rows:
        assert stage in table
