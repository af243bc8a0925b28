"""Watching a run: the progress bar and metrics.jsonl, memory, signals, experiment trackers, the loss plot.

Everything a run reports while it trains lives here; train.py wires it in. SIGTERM/SIGINT ask for a
checkpoint at the next step boundary (a second one kills); trackers get the same rows metrics.jsonl does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qlora_llm.config import Config
from qlora_llm.errors import TrainError
from qlora_llm.memory import peak_bytes

log = logging.getLogger(__name__)


def setup_trackers(report_to: list[str], run_dir: Path) -> list[str]:
    """Check the trackers' packages are there, and keep them offline and in the run folder by default
    (a variable the user set wins). Returns the variables set, to take back after the run."""
    import importlib.util

    missing = [t for t in report_to if importlib.util.find_spec(t) is None]  # each imports as its name
    if missing:
        raise TrainError(
            f"train.report_to={report_to}: {', '.join(missing)} not installed. "
            f"`pip install {' '.join(missing)}`, or leave it out."
        )
    run_dir = Path(run_dir).resolve()
    defaults = {
        "tensorboard": {"TENSORBOARD_LOGGING_DIR": str(run_dir / "tensorboard")},
        "mlflow": {
            "MLFLOW_TRACKING_URI": (run_dir / "mlruns").as_uri(),
            "MLFLOW_EXPERIMENT_NAME": "qlora-llm",
            "MLFLOW_ALLOW_FILE_STORE": "true",  # a local store: no server or database to set up
        },
        "wandb": {"WANDB_MODE": "offline", "WANDB_DIR": str(run_dir)},
        "trackio": {},  # trackio keeps its runs in a local store unless told where else
    }
    added = []
    for tracker in report_to:
        for key, value in defaults[tracker].items():
            if key not in os.environ:
                os.environ[key] = value
                added.append(key)
    return added


def _flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out |= _flatten(value, f"{prefix}{key}.")
        return out
    return {prefix.rstrip("."): str(tree)[:250]}  # MLflow's limit on a parameter value's length


def make_tracker_params(cfg: Config, manifest: dict[str, Any]) -> Any:
    """A callback that gives each tracker the run's resolved config and manifest as parameters."""
    from transformers import TrainerCallback
    from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback

    params = _flatten({"config": cfg.model_dump(mode="json"), "manifest": manifest})

    class TrackerParams(TrainerCallback):
        callbacks: list = []

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            for cb in self.callbacks:  # the integrations set themselves up before us
                if isinstance(cb, TensorBoardCallback) and cb.tb_writer is not None:
                    cb.tb_writer.add_text("qlora_llm/params", json.dumps(params, indent=1))
                elif isinstance(cb, MLflowCallback) and cb._initialized:
                    items = sorted(params.items())
                    for i in range(0, len(items), 100):  # MLflow takes at most 100 per call
                        cb._ml_flow.log_params(dict(items[i : i + 100]))
                elif isinstance(cb, WandbCallback) and cb._wandb is not None:
                    cb._wandb.config.update(params, allow_val_change=True)

    return TrackerParams()


def _count_of(done: int, batches: Any) -> str:
    """`5/13`, or `5` when the batches have no length (an iterable dataset)."""
    try:
        return f"{done}/{len(batches)}"
    except TypeError:
        return str(done)


def make_monitor(run_dir: Path, device: str, stop_requests: list[str], world_size: int) -> Any:
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class RunMonitor(TrainerCallback):
        """metrics.jsonl, the progress bar, and stopping cleanly at a step boundary on a signal."""

        trainer: Any = None

        def __init__(self):
            self.bar = None
            # Throughput counts training time only (forward, backward, optimizer), not evaluation or saving.
            self.train_seconds = 0.0
            self.step_start = 0.0
            self.mark = (0.0, 0)
            self.metrics_path = run_dir / "metrics.jsonl"
            self.load_peak = 0
            self.paused = False  # an evaluation or a save ran since the last step
            self.shown: dict[str, str] = {}  # the bar's postfix from the last log
            self.eval_batches = 0
            self.eval_shown_at = 0.0
            self.stopped_by_signal = False  # training ended at a step boundary because of a signal

        def on_train_begin(self, args, state, control, **kwargs):
            self.mark = (self.train_seconds, self.trainer.tokens_seen)
            self.load_peak = peak_bytes(device)  # loading the model and data, before the first step
            if not state.is_world_process_zero:
                return  # one bar, one metrics file: rank 0's
            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc="training",
                unit="step",
                dynamic_ncols=True,
            )

        def on_step_begin(self, args, state, control, **kwargs):
            self.step_start = time.perf_counter()
            if self.paused and self.bar is not None:
                # The bar's rate, ETA and clock are the steps' own: otherwise the evaluation before the
                # first step counts as a slow step (the demo's bar showed 18 minutes left for 5). The
                # stage's wall time, evaluations included, is in the log line that ends it.
                self.bar.unpause()
            self.paused = False

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            # An evaluation holds the bar still for as long as a few steps (the demo's: ~20 s at step 0,
            # before any step moves it): count its batches where the loss is shown, redrawn at most
            # once a second (an eval set of small batches would otherwise write a line per batch).
            if self.bar is None:
                return
            self.eval_batches += 1
            now = time.monotonic()
            if self.eval_batches > 1 and now - self.eval_shown_at < 1.0:
                return
            self.eval_shown_at = now
            self.bar.set_postfix(self.shown | {"evaluating": _count_of(self.eval_batches, eval_dataloader)})

        def on_evaluate(self, args, state, control, **kwargs):
            self.paused = True
            self.eval_batches = 0

        def on_save(self, args, state, control, **kwargs):
            self.paused = True

        def on_step_end(self, args, state, control, **kwargs):
            self.train_seconds += time.perf_counter() - self.step_start
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)
            stop = bool(stop_requests)
            if world_size > 1:
                from qlora_llm.distributed import agree_on_stop

                stop = agree_on_stop(stop_requests, args.device)
            if stop:
                self.stopped_by_signal = True
                control.should_save = True
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" not in logs and "eval_loss" not in logs or not state.is_world_process_zero:
                return  # the end-of-training summary (summary.json has it), or not rank 0
            row: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0, 4)}
            for key, name in (
                ("loss", "loss"),
                ("eval_loss", "eval_loss"),
                ("learning_rate", "lr"),
                ("grad_norm", "grad_norm"),
                # DPO and ORPO: how often, and by how much, the chosen answer out-scores the rejected one.
                ("rewards/accuracies", "reward_accuracy"),
                ("rewards/margins", "reward_margin"),
                ("eval_rewards/accuracies", "eval_reward_accuracy"),
                ("eval_rewards/margins", "eval_reward_margin"),
                ("kl", "kl"),  # train.kl_weight: KL(base || tuned) per answer token
            ):
                if key in logs:
                    row[name] = logs[key]
            if "loss" in logs:  # a training log: throughput since the previous one
                seconds, tokens = self.train_seconds, self.trainer.tokens_seen
                row["tokens_per_s"] = round((tokens - self.mark[1]) / max(seconds - self.mark[0], 1e-9), 2)
                self.mark = (seconds, tokens)
            row["tokens"] = state.num_input_tokens_seen  # all processes' tokens so far, resumes included
            row["memory_bytes"] = peak_bytes(device)
            row["time"] = round(time.time(), 2)  # when it was logged (Unix seconds): a watcher's ETA and lag
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            if self.bar is not None:
                shown = {k: f"{row[k]:.4g}" for k in ("loss", "eval_loss", "tokens_per_s") if k in row}
                shown["mem"] = f"{row['memory_bytes'] / 2**30:.2f}G"
                self.shown = shown
                self.bar.set_postfix(shown, refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                if self.paused:
                    self.bar.unpause()  # the last evaluation and save are no step either
                self.bar.close()

    return RunMonitor()


@contextlib.contextmanager
def stop_on_signals(stop_requests: list[str]) -> Iterator[None]:
    """SIGTERM / SIGINT ask training to save and stop at the next step boundary; a second one kills."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if stop_requests:
            raise KeyboardInterrupt  # asked twice: stop now
        log.warning("%s received: stopping at the end of this step (or of the file being written)", name)
        stop_requests.append(name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def plot_loss(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), color="#4C72B0", label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", color="#DD8452", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"Loss: {metrics_path.parent.name}")
    ax.legend(frameon=False)
    fig.tight_layout()
    from qlora_llm.atomic import atomic_file

    with atomic_file(png, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
