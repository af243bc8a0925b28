"""Watching a run (src/qlora_llm/monitor.py): SIGTERM stops at a step boundary; trackers get the run."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import (
    assert_same_final,
    no_partial_files,
    patch_trainer,
    resume_ends_as_straight,
    run_train_script,
    tiny_cfg,
    tiny_overrides,
    train_args,
)

from qlora_llm.checkpoint import complete_checkpoints
from qlora_llm.config import load_config
from qlora_llm.errors import TrainError
from qlora_llm.train import train


def sigterm_in_the_evaluation_at(monkeypatch, step: int) -> None:
    """SIGTERM to this process inside the in-training evaluation at `step`, as a user's stop arriving then."""

    class TermInEvaluation:
        def evaluate(self, *a, **k):
            if self.state.global_step == step:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().evaluate(*a, **k)

    patch_trainer(monkeypatch, TermInEvaluation)


def test_sigterm_during_an_evaluation_stops_after_it_and_resumes_exactly(
    tiny_mistral, tiny_data, tmp_path, monkeypatch, straight_9
):
    sigterm_in_the_evaluation_at(monkeypatch, 3)
    out = tmp_path / "run"
    first = train(tiny_cfg(tiny_mistral, tiny_data, out, "train.max_steps=9"))
    assert first.stopped == "SIGTERM" and first.exit_code == 143 and first.global_step in (3, 4)
    assert first.final_adapter is None and not (out / "final_adapter").exists()
    no_partial_files(out)
    monkeypatch.undo()
    resume_ends_as_straight(tiny_mistral, tiny_data, out, straight_9)


@pytest.mark.parametrize("when", ["in the last evaluation", "in the final adapter write"])
def test_sigterm_after_the_last_step_boundary_lets_the_final_adapter_be_written(
    when, tiny_mistral, tiny_data, tmp_path, monkeypatch, straight_9
):
    """No step is left to save at: the run's result is written (and the exit code says it was stopped),
    not dropped with a checkpoint up to 2 steps old."""
    if when == "in the last evaluation":
        sigterm_in_the_evaluation_at(monkeypatch, 9)
    else:
        import peft

        real = peft.PeftModel.save_pretrained

        def term_then_save(self, directory, *a, **k):
            if ".final_adapter." in str(directory):
                os.kill(os.getpid(), signal.SIGTERM)
            return real(self, directory, *a, **k)

        monkeypatch.setattr(peft.PeftModel, "save_pretrained", term_then_save)
    out = tmp_path / "run"
    result = train(tiny_cfg(tiny_mistral, tiny_data, out, "train.max_steps=9"))
    assert (result.stopped, result.exit_code, result.global_step) == ("SIGTERM", 143, 9)
    assert result.final_adapter == out / "final_adapter"
    no_partial_files(out)
    assert_same_final(out, straight_9)


@pytest.mark.slow
def test_sigterm_saves_at_step_boundary_and_exits_143(tiny_mistral, tiny_data, tmp_path):
    out = tmp_path / "run"
    proc = run_train_script(
        tmp_path,
        "normal",
        train_args(
            tiny_mistral,
            tiny_data,
            out,
            "train.max_steps=500",
            "train.save_steps=300",
            "train.eval_steps=300",
        ),
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=240)[0]
    assert proc.returncode == 143, log[-3000:]
    saved = complete_checkpoints(out)
    assert len(saved) == 1 and 3 <= int(saved[0].name.split("-")[1]) < 300
    assert not (out / "final_adapter").exists()


def test_tensorboard_gets_readable_events_with_the_runs_config(
    tiny_mistral, tiny_data, tmp_path, monkeypatch
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    out = tmp_path / "run"
    cfg = load_config(
        None,
        tiny_overrides(
            tiny_mistral, tiny_data, out, "train.report_to=[tensorboard]", steps=4, batch=4, every=2
        ),
    )
    train(cfg)
    monkeypatch.undo()
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0}).Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4] and all(e.value > 0 for e in losses)
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 2, 4]
    texts = {t for t in events.Tags()["tensors"]}
    assert "qlora_llm/params/text_summary" in texts
    params = events.Tensors("qlora_llm/params/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"config.train.report_to": "[\'tensorboard\']"' in params and "manifest.identity" in params


def test_mlflow_local_store_gets_params_and_metrics(tiny_mistral, tiny_data, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "run"
    cfg = load_config(
        None,
        tiny_overrides(tiny_mistral, tiny_data, out, "train.report_to=[mlflow]", steps=4, batch=4, every=2),
    )
    train(cfg)
    client = mlflow.tracking.MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "qlora-llm"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["config.lora.r"] == "16" and run.data.params["manifest.method"] == "sft"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert "eval_loss" in run.data.metrics


def test_a_tracker_that_is_not_installed_is_named_before_loading(
    tiny_mistral, tiny_data, tmp_path, monkeypatch
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    cfg = load_config(
        None,
        tiny_overrides(
            tiny_mistral, tiny_data, tmp_path / "r", "train.report_to=[wandb]", steps=2, batch=4, every=2
        ),
    )
    with pytest.raises(TrainError, match=r"wandb not installed. `pip install wandb`"):
        train(cfg)


def test_the_bars_eta_is_the_steps_pace_not_the_evaluations(tmp_path, monkeypatch):
    """An evaluation (the step-0 baseline, every eval_steps) or a save between two steps is no slow step:
    the bar's rate and ETA come from the steps alone. Steps of 6 s after a 20 s evaluation: 39 x 6 s left,
    not 39 x 26 s."""
    from types import SimpleNamespace

    import tqdm.std

    from qlora_llm.monitor import make_monitor

    clock = [1000.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])
    monitor = make_monitor(tmp_path, "cpu", [], 1)
    monitor.trainer = SimpleNamespace(tokens_seen=0)
    state = SimpleNamespace(is_world_process_zero=True, max_steps=40, global_step=0)
    monitor.on_train_begin(None, state, None)
    for step in (1, 2):
        clock[0] += 20.0  # the evaluation at step 0, then a save after step 1
        if step == 1:
            monitor.on_evaluate(None, state, None)
        else:
            monitor.on_save(None, state, None)
        monitor.on_step_begin(None, state, None)
        clock[0] += 6.0
        state.global_step = step
        monitor.on_step_end(None, state, None)
        shown = monitor.bar.format_dict
        left = (shown["total"] - shown["n"]) / shown["rate"]
        assert left == pytest.approx((40 - step) * 6.0), (step, left)
    clock[0] += 20.0  # the last evaluation: the bar that stays on the terminal keeps the steps' time
    monitor.on_evaluate(None, state, None)
    monitor.on_train_end(None, state, None)
    assert monitor.bar.format_dict["elapsed"] == pytest.approx(2 * 6.0)


def test_the_bar_counts_an_evaluations_batches_then_shows_its_loss(tmp_path, monkeypatch):
    """The step-0 evaluation runs before any step moves the bar: its batches are counted on the bar (redrawn
    at most once a second), and the count gives way to the eval loss when the evaluation logs it."""
    from types import SimpleNamespace

    import qlora_llm.monitor
    from qlora_llm.monitor import make_monitor

    clock = [100.0]
    monkeypatch.setattr(qlora_llm.monitor.time, "monotonic", lambda: clock[0])
    monitor = make_monitor(tmp_path, "cpu", [], 1)
    monitor.trainer = SimpleNamespace(tokens_seen=0)
    state = SimpleNamespace(
        is_world_process_zero=True, max_steps=40, global_step=0, epoch=0, num_input_tokens_seen=0
    )
    monitor.on_train_begin(None, state, None)
    batches = [None] * 13
    for _ in range(3):
        clock[0] += 2.0
        monitor.on_prediction_step(None, state, None, eval_dataloader=batches)
    assert "evaluating=3/13" in monitor.bar.postfix
    clock[0] += 0.1  # a fourth batch within the second: counted, not redrawn
    monitor.on_prediction_step(None, state, None, eval_dataloader=batches)
    assert "evaluating=3/13" in monitor.bar.postfix
    clock[0] += 1.0
    monitor.on_prediction_step(None, state, None, eval_dataloader=batches)
    assert "evaluating=5/13" in monitor.bar.postfix
    monitor.on_log(None, state, None, logs={"eval_loss": 3.58})
    monitor.on_evaluate(None, state, None)
    assert "eval_loss=3.58" in monitor.bar.postfix and "evaluating" not in monitor.bar.postfix
    monitor.on_prediction_step(None, state, None, eval_dataloader=batches)  # the next evaluation's first
    assert "evaluating=1/13" in monitor.bar.postfix and "eval_loss=3.58" in monitor.bar.postfix
    monitor.on_train_end(None, state, None)
