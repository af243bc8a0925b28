"""`qlora-llm run`: the whole flow on a user's CSV, and a second run that skips what is done."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import own_tmpdir_env

from qlora_llm.cli import main
from qlora_llm.config import load_config
from qlora_llm.pipeline import PipelineError, run

ROOT = Path(__file__).resolve().parents[1]

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


@pytest.fixture
def user_csv(tmp_path):
    path = tmp_path / "mine.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer"])
        for i, word in enumerate(WORDS * 3):
            w.writerow([f"What comes after {word}, {i}?", f"{WORDS[(WORDS.index(word) + 1) % 8]} {i}"])
    return path


def settings(tiny_mistral, out, *extra):
    return [
        f"model.name={tiny_mistral}",
        "model.device=cpu",
        "data.max_seq_length=64",
        "data.eval_fraction=0.25",
        "data.min_examples=5",
        f"train.output_dir={out}",
        "train.max_steps=4",
        "train.batch_size=4",
        "train.gradient_accumulation_steps=1",
        "train.eval_steps=2",
        "train.save_steps=2",
        "train.learning_rate=1e-2",
        "train.warmup_ratio=0",
        "eval.benchmark_prompts=null",
        "eval.max_new_tokens=4",
        "eval.speed_runs=1",
        # General benchmarks are another test's (test_benchmarks): ~10 s per evaluation here.
        "eval.general_tasks=[]",
        "eval.general_generative=[]",
        "serve.max_new_tokens=4",
        *extra,
    ]


def test_run_on_a_csv_then_again_skips_everything(tiny_mistral, user_csv, tmp_path, capsys):
    out = tmp_path / "run"
    (tmp_path / "empty.yaml").write_text("{}\n")
    args = [
        "run",
        str(tmp_path / "empty.yaml"),
        "--data",
        str(user_csv),
        "--map",
        "instruction=question",
        "--map",
        "output=answer",
    ]
    assert main([*args, *settings(tiny_mistral, out)]) == 0
    printed = capsys.readouterr().out
    assert "prepare   done: 18 train / 6 eval examples" in printed
    for stage in ("train     done in", "evaluate  done in", "merge     done in", "answer    done in"):
        assert stage in printed
    assert "perplexity (answers)" in printed and f"merged model         {out / 'merged'}" in printed
    assert {"data", "final_adapter", "eval", "merged", "pipeline.json"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["data"]["file"] == str(out / "data" / "eval.jsonl")  # the held-out share, never train
    assert metrics["data"]["examples"] == 6
    adapter = (out / "final_adapter" / "adapter_model.safetensors").read_bytes()

    assert main([*args, *settings(tiny_mistral, out)]) == 0
    again = capsys.readouterr().out
    for stage in ("prepare", "train", "evaluate", "merge"):
        assert f"{stage:9} skipped (unchanged)" in again
    assert (out / "final_adapter" / "adapter_model.safetensors").read_bytes() == adapter

    # A changed evaluation setting redoes the evaluation only.
    assert main([*args, *settings(tiny_mistral, out, "eval.max_new_tokens=3")]) == 0
    third = capsys.readouterr().out
    assert "train     skipped (unchanged)" in third and "evaluate  done in" in third
    assert "merge     skipped (unchanged)" in third


def _is_training_process(process) -> bool:
    import psutil

    try:
        return "qlora_llm.pipeline:train_in_child" in process.cmdline()
    except psutil.Error:  # gone, or a zombie
        return False


def test_an_interrupted_run_continues_and_other_settings_are_refused(tiny_mistral, user_csv, tmp_path):
    """Training runs in a process of its own; SIGTERM to `run` reaches it once: it checkpoints, stops, and
    the same command continues from there."""
    import psutil

    out = tmp_path / "run"
    cfg = load_config(
        None,
        settings(
            tiny_mistral,
            out,
            f"data.train_file={user_csv}",
            "eval.max_new_tokens=2",
            "train.max_steps=12",  # the signal lands after step 1: 11 steps to spare
            "train.eval_steps=6",
            "train.save_steps=6",
            "train.logging_steps=1",
        ),
    )
    columns = {"instruction": "question", "output": "answer"}
    trainers: list[psutil.Process] = []

    def terminate_after_the_first_step() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            logged = (out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").is_file() else ""
            if '"loss"' in logged and signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
                # Ours: the suite's session may have other children (conftest's background build).
                trainers.extend(c for c in psutil.Process().children() if _is_training_process(c))
                os.kill(os.getpid(), signal.SIGTERM)  # to `run` itself, as `kill PID` or the studio's stop
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=terminate_after_the_first_step)
    watcher.start()
    with pytest.raises(
        PipelineError, match=r"training stopped by SIGTERM at step \d+; run the same command again"
    ):
        run(cfg, columns=columns)
    watcher.join()
    assert len(trainers) == 1 and not trainers[0].is_running()  # the training process, and it is gone
    stopped_at = json.loads((out / "summary.json").read_text())["steps"]
    assert 0 < stopped_at < 12 and (out / f"checkpoint-{stopped_at}").is_dir()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the forwarding ended with the child
    result = run(cfg, columns=columns)
    assert result.stages["prepare"] == "skipped (unchanged)"
    assert result.stages["train"].startswith("resumed, done in")
    assert (result.adapter / "adapter_model.safetensors").is_file() and (out / "checkpoint-12").is_dir()
    other = load_config(None, settings(tiny_mistral, out, f"data.train_file={user_csv}", "lora.r=4"))
    with pytest.raises(PipelineError, match="holds a training run with other data or settings"):
        run(other, columns=columns)


def test_a_sigterm_after_the_last_step_stops_run_with_training_kept(
    tiny_mistral, user_csv, tmp_path, monkeypatch
):
    """A SIGTERM in the final evaluation lets training write its final adapter (test_monitor); `run`
    then stops before evaluating, as asked, and the same command goes on without training again."""
    from qlora_llm import pipeline

    out = tmp_path / "run"
    cfg = load_config(None, settings(tiny_mistral, out, f"data.train_file={user_csv}"))
    columns = {"instruction": "question", "output": "answer"}
    real = pipeline._train_apart
    monkeypatch.setattr(
        pipeline, "_train_apart", lambda cfg, force: real(cfg, force) | {"stopped": "SIGTERM"}
    )
    with pytest.raises(PipelineError) as err:
        run(cfg, columns=columns)
    assert str(err.value) == (
        f"stopped by SIGTERM after training finished (the final adapter is written: {out / 'final_adapter'}); "
        "run the same command again to evaluate, merge and answer (training is skipped)."
    )
    assert not (out / "eval").exists()
    monkeypatch.setattr(pipeline, "_train_apart", real)
    result = run(cfg, columns=columns)
    assert result.stages["train"] == "skipped (unchanged)"
    assert result.stages["evaluate"].startswith("done in") and (out / "eval" / "metrics.json").is_file()


@pytest.mark.slow
def test_a_run_killed_with_sigkill_leaves_no_orphan_training(tiny_mistral, user_csv, tmp_path):
    """`kill -9` of `qlora-llm run` cannot be forwarded: the training process is told by the kernel
    (PR_SET_PDEATHSIG) and stops as on one SIGTERM, at a step boundary with a checkpoint, instead of training
    on with nobody to evaluate or merge. (The kernel repeats the notice for each of the parent's threads; as
    SIGTERMs, the second meant "stop now" and no checkpoint was written, in 1 run of 3.)"""
    import subprocess
    import sys

    import psutil

    out = tmp_path / "run"
    args = settings(
        tiny_mistral,
        out,
        f"data.train_file={user_csv}",
        "train.max_steps=400",  # minutes of training: only the parent's death can end it in time
        "train.eval_steps=200",
        "train.save_steps=200",
        "train.logging_steps=1",
    )
    (tmp_path / "config.yaml").write_text("{}\n")  # the defaults, then the settings above
    command = [sys.executable, "-m", "qlora_llm.cli", "run", str(tmp_path / "config.yaml")]
    command += ["--map", "instruction=question"]
    command += ["--map", "output=answer", *args]
    tmp = tmp_path / "tmp"  # run's temporary folder for the training process's answer goes here
    env = own_tmpdir_env(tmp)
    with open(tmp_path / "log.txt", "w") as log:
        parent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env)
    deadline = time.monotonic() + 300
    while '"loss"' not in ((out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").is_file() else ""):
        assert parent.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()[
            -3000:
        ]
        time.sleep(0.1)
    [trainer] = psutil.Process(parent.pid).children()
    parent.kill()
    parent.wait()
    trainer.wait(timeout=120)
    said = (tmp_path / "log.txt").read_text()
    assert "the process that started this one died: stopping" in said, said[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "SIGTERM", said[-3000:]
    stopped_at = summary["steps"]
    assert 0 < stopped_at < 400 and (out / f"checkpoint-{stopped_at}").is_dir()
    assert not (out / "final_adapter").exists()
    # The folder `run` would have read the answer from and removed: the orphan removes it itself.
    assert not list(tmp.iterdir()), sorted(p.name for p in tmp.iterdir())


def test_run_stops_before_training_when_evaluation_will_not_fit(
    tiny_mistral, user_csv, tmp_path, monkeypatch
):
    """Evaluation comes after the whole training run: `run` checks its planned peak first and trains
    nothing when it will not fit; --force goes on to train."""
    import qlora_llm.plan as planning
    from qlora_llm import pipeline

    out = tmp_path / "run"
    cfg = load_config(None, settings(tiny_mistral, out, f"data.train_file={user_csv}"))
    columns = {"instruction": "question", "output": "answer"}
    monkeypatch.setattr(planning, "_device_memory", lambda device: 2**20)  # 1 MiB: nothing fits
    with pytest.raises(
        PipelineError, match=r"evaluation is estimated not to fit: it needs \d+\.\d\d GiB"
    ) as refused:
        run(cfg, columns=columns)
    # A tiny model's 4-bit evaluation is no smaller (bitsandbytes' own runtime): the batches are the fix.
    assert "Stopped before training: lower the batch it names (eval.batch_size" in str(refused.value)
    assert {p.name for p in out.iterdir()} == {"data", "pipeline.json"}  # prepared, nothing trained

    trained = []

    def train_apart(cfg, force):
        trained.append(force)
        raise KeyboardInterrupt  # training itself is the other tests'

    monkeypatch.setattr(pipeline, "_train_apart", train_apart)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, columns=columns, force=True)
    assert trained == [True]


def test_the_seeds_8gb_config_evaluates_in_4bit_where_plain_weights_would_not_fit(monkeypatch):
    """configs/mistral-7b-8gb.yaml on 8 GiB: plain bf16 evaluation (15 GiB planned) is refused before
    training with the 4-bit fix and its planned peak; the shipped config, 4-bit, passes the check."""
    import qlora_llm.plan as planning
    from qlora_llm.pipeline import _check_evaluation_fits

    monkeypatch.setattr(planning, "_device_memory", lambda device: 8 * 2**30)
    shipped = load_config(str(ROOT / "configs" / "mistral-7b-8gb.yaml"), [])
    assert shipped.eval.quantization == "nf4"
    _check_evaluation_fits(shipped, force=False)
    four_bit = planning.plan(shipped, measure_evaluation=True).stages[1]
    assert four_bit.name == "evaluate" and four_bit.peak <= planning.FIT_MARGIN * 8 * 2**30
    plain = load_config(str(ROOT / "configs" / "mistral-7b-8gb.yaml"), ["eval.quantization=none"])
    with pytest.raises(PipelineError) as refused:
        _check_evaluation_fits(plain, force=False)
    need = re.search(
        r"it needs (\d+\.\d\d) GiB \(plain weights in bfloat16, the base \(in a process of its own",
        str(refused.value),
    )
    assert need and float(need[1]) > planning.FIT_MARGIN * 8  # ~15 GiB
    # `qlora-llm plan` (its verdict is on training) says the same of the run.
    [note] = [
        n for n in planning.plan(plain, measure_evaluation=True).notes if n.startswith("evaluate needs")
    ]
    assert note.endswith("`qlora-llm run` stops before training for it unless given --force"), note
    assert (
        f"set eval.quantization=nf4 (base and fine-tuned in 4-bit, as trained: {four_bit.peak / 2**30:.2f} GiB)"
        in str(refused.value)
    )


def test_the_seeds_8gb_config_would_not_merge_on_its_gpu_and_run_says_so_before_training(monkeypatch):
    """A merge loads the base in 16-bit on CUDA (Mistral-7B: ~14 GiB), in place; on the seed's 8 GiB it
    cannot, and `run` knows it before training; on 24 GiB it can."""
    import qlora_llm.plan as planning
    from qlora_llm.pipeline import _check_evaluation_fits, _merge_will_not_fit

    shipped = load_config(str(ROOT / "configs" / "mistral-7b-8gb.yaml"), [])
    monkeypatch.setattr(planning, "_device_memory", lambda device: 8 * 2**30)
    why = _merge_will_not_fit(_check_evaluation_fits(shipped, force=False))
    need = re.fullmatch(
        r"merging needs (\d+\.\d\d) GiB \(the base loaded in bfloat16 and merged in place; the copy that is "
        r"written goes through host memory\), more than the 7\.36 GiB usable on cuda",
        why or "",
    )
    assert need and 13.5 < float(need[1]) < 16, why  # 7.24B x 2 bytes + CUDA's own, not 4 bytes twice
    [note] = [n for n in planning.plan(shipped).notes if n.startswith("merge needs")]
    assert note.endswith("`qlora-llm run` skips it and keeps the adapter as the run's model"), note
    monkeypatch.setattr(planning, "_device_memory", lambda device: 24 * 2**30)
    assert _merge_will_not_fit(_check_evaluation_fits(shipped, force=False)) is None


def test_a_run_whose_merge_will_not_fit_keeps_the_adapter_and_answers_with_it(
    tiny_mistral, user_csv, tmp_path, monkeypatch, capsys
):
    import qlora_llm.plan as planning

    estimate = planning.estimate_stages

    def merge_too_large(*a, **kw):  # as on an 8 GB GPU: everything fits but the full-precision merge
        stages = estimate(*a, **kw)
        for st in stages:
            if st.name == "merge":
                st.components["base, full precision"] = 10**15
        return stages

    monkeypatch.setattr(planning, "estimate_stages", merge_too_large)
    out = tmp_path / "run"
    (tmp_path / "empty.yaml").write_text("{}\n")
    args = ["run", str(tmp_path / "empty.yaml"), "--data", str(user_csv)]
    args += ["--map", "instruction=question", "--map", "output=answer"]
    assert main([*args, *settings(tiny_mistral, out)]) == 0
    printed, logged = capsys.readouterr()
    assert re.search(r"merge     skipped: merging needs \d+\.\d\d GiB \(the base loaded in float32", printed)
    assert "merged model         not made: it does not fit this device" in printed
    assert f"qlora-llm chat {out}" in printed and "answer    done in" in printed
    assert "merged" not in {p.name for p in out.iterdir()}
    # Said before training, not found out after it.
    warned = logged.index("WARNING qlora_llm.pipeline: the merge stage will be skipped: merging needs")
    assert logged.index("stage 1/5 prepare") < warned < logged.index("stage 2/5 train")
    assert f"merge it on a machine with that memory: `qlora-llm merge {out}`" in logged[warned:]
