"""The seed's whole data flow as one call: prepare -> train -> evaluate -> merge -> one answer.

    result = run(load_config("configs/smollm2-cpu.yaml", ["data.train_file=my.csv"]))

`data.train_file` (and `data.eval_file`, if set) are the user's raw files, in any format `prepare`
reads; everything lands in the run folder (`train.output_dir`): `data/` (the prepared JSONL), the
training run, `eval/` (base vs fine-tuned), `merged/` (the verified merged model). Each stage records
the fingerprint of its inputs and settings in `pipeline.json` when it completes; a later call skips a
stage whose fingerprint is unchanged and whose output is there, so running again is quick, and a call
that was interrupted continues (training resumes from its newest checkpoint). A run folder trained
with other data or settings is never overwritten: the error says to pick another folder.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_llm.atomic import atomic_write_text
from qlora_llm.config import Config
from qlora_llm.errors import QloraError
from qlora_llm.fingerprint import digest, file_digest, folder_fingerprint

log = logging.getLogger(__name__)

STAGES = ("prepare", "train", "evaluate", "merge", "answer")


class PipelineError(QloraError, RuntimeError):
    """A stage cannot run as asked; the message says what to change."""


@dataclass
class PipelineResult:
    run_dir: Path
    stages: dict[str, str] = field(default_factory=dict)
    """Per stage: "done in 12s", "skipped (unchanged)" or "resumed ..."."""
    prepared: dict[str, Path] = field(default_factory=dict)
    adapter: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    report: Path | None = None
    merged: Path | None = None
    prompt: str = ""
    answer: str = ""


def _source_fingerprint(source: str | Path) -> str:
    path = Path(source)
    if path.is_file():
        return file_digest(path)
    if path.is_dir():
        return folder_fingerprint(path)
    return f"name:{source}"  # a Hub dataset id: its name is all we know offline


class _Stamps:
    """pipeline.json: stage -> {"fingerprint", "complete"}, rewritten atomically after every change."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "pipeline.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def matches(self, stage: str, fingerprint: str) -> bool:
        entry = self.data.get(stage, {})
        return entry.get("fingerprint") == fingerprint and entry.get("complete", False)

    def mark(self, stage: str, fingerprint: str, complete: bool, **extra: Any) -> None:
        self.data[stage] = {"fingerprint": fingerprint, "complete": complete, **extra}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")


def _prepare_stage(
    cfg: Config, run_dir: Path, stamps: _Stamps, columns: dict[str, str]
) -> tuple[dict[str, Path], str]:
    from qlora_llm.data import PrepareError, prepare

    d, m = cfg.data, cfg.model
    out = run_dir / "data"
    fingerprint = digest(
        {
            "train": _source_fingerprint(d.train_file),
            "eval": _source_fingerprint(d.eval_file) if d.eval_file else None,
            "columns": columns,
            "data": d.model_dump(mode="json", exclude={"train_file", "eval_file"}),
            "tokenizer": [m.name, m.revision, m.template],
        }
    )
    if stamps.matches("prepare", fingerprint):
        # The files that prepare wrote then (an eval split only when one was made), all still there.
        done = {k: Path(v) for k, v in stamps.data["prepare"].get("outputs", {}).items()}
        if done and all(p.is_file() for p in done.values()):
            return done, "skipped (unchanged)"
    try:
        report = prepare(
            cfg,
            [d.train_file],
            out,
            eval_inputs=[d.eval_file] if d.eval_file else None,
            eval_fraction=0.0 if d.eval_file else d.eval_fraction,
            columns=columns,
            force=True,
        )
    except PrepareError as err:
        raise PipelineError(f"prepare: {err}") from None
    prepared = {"train": out / "train.jsonl"} | ({"eval": out / "eval.jsonl"} if report.eval_written else {})
    for p in report.problems[:5]:
        log.warning("%s", p)
    if len(report.problems) > 5:
        log.warning(
            "... and %d more problems (all in %s)", len(report.problems) - 5, out / "prepare_report.json"
        )
    stamps.mark("prepare", fingerprint, True, outputs={k: str(v) for k, v in prepared.items()})
    return prepared, f"done: {report.train_written} train / {report.eval_written} eval examples"


def _check_evaluation_fits(cfg: Config, force: bool) -> Any:
    """Refuse before training when the plan says evaluation will not fit this device: it comes after the
    whole training run, and a kill for memory there wastes it. Training checks its own fit. The plan's
    report (None where the planner cannot read the architecture)."""
    from qlora_llm.plan import PlanError, plan

    try:
        report = plan(cfg, measure_evaluation=True, under_run=True)
    except PlanError as err:  # an architecture the planner cannot read: train.py warns about it too
        log.debug("evaluation's memory not checked: %s", err)
        return None
    too_large = report.too_large(("evaluate",))
    if not too_large:
        return report
    [stage] = too_large
    need = (
        f"{stage.peak / 2**30:.2f} GiB ({stage.how}), more than the "
        f"{report.usable_memory / 2**30:.2f} GiB usable on {report.device}"
    )
    if force:
        log.warning("evaluation is estimated not to fit, running anyway (--force): it needs %s", need)
        return report
    fix = "lower the batch it names (eval.batch_size, eval.answers_batch_size, eval.general_batch_size)"
    if cfg.eval.quantization == "none":
        four_bit = cfg.model_copy(deep=True)
        four_bit.eval.quantization = "nf4"
        stages = plan(four_bit, measure_evaluation=True).stages
        nf4 = next(st.peak for st in stages if st.name == "evaluate")
        if nf4 <= report.usable_memory:
            fix = (
                f"set eval.quantization=nf4 (base and fine-tuned in 4-bit, as trained: {nf4 / 2**30:.2f} GiB)"
            )
    raise PipelineError(
        f"evaluation is estimated not to fit: it needs {need}. Stopped before training: {fix}, or "
        "pass --force. `qlora-llm plan CONFIG` shows every stage."
    )


def _merge_will_not_fit(report: Any) -> str | None:
    """Why the merge stage will not fit this device, by the plan `report` (None: no plan), or None. A
    merge loads the base in full precision, which the seed's 8 GB GPU cannot hold (Mistral-7B in bf16:
    14.0 GiB planned): `run` then keeps the adapter as its model instead of failing after training and
    evaluation."""
    too_large = report.too_large(("merge",)) if report is not None else []
    if not too_large:
        return None
    [stage] = too_large
    return (
        f"merging needs {stage.peak / 2**30:.2f} GiB ({stage.how}), more than the "
        f"{report.usable_memory / 2**30:.2f} GiB usable on {report.device}"
    )


def _merge_stage(
    cfg: Config, run_dir: Path, stamps: _Stamps, adapter: Path, no_merge: str | None
) -> tuple[Path | None, str]:
    """The merged model (None when `no_merge` says why it will not fit) and what the stage did."""
    from qlora_llm.merge import merge

    if no_merge:
        return None, f"skipped: {no_merge}"
    merged = run_dir / "merged"
    fingerprint = digest(
        {
            "adapter": file_digest(adapter / "adapter_model.safetensors"),
            "model": cfg.model.model_dump(mode="json"),
        }
    )
    if stamps.matches("merge", fingerprint) and (merged / "config.json").is_file():
        return merged, "skipped (unchanged)"
    merge(
        run_dir,
        merged,
        model_cfg=cfg.model,
        device=cfg.model.device,
        force=True,
        benchmark_prompts=cfg.eval.benchmark_prompts,
    )
    stamps.mark("merge", fingerprint, True)
    return merged, "done"


def _train_stage(cfg: Config, run_dir: Path, stamps: _Stamps, force: bool) -> tuple[Path, str]:
    from qlora_llm.checkpoint import complete_checkpoints

    fingerprint = digest(
        {
            "data": {
                k: file_digest(Path(v))
                for k, v in (("train", cfg.data.train_file), ("eval", cfg.data.eval_file))
                if v
            },
            "config": cfg.model_dump(
                mode="json", exclude={"eval": True, "serve": True, "train": {"output_dir"}}
            ),
        }
    )
    final = run_dir / "final_adapter"
    if stamps.matches("train", fingerprint) and (final / "adapter_config.json").is_file():
        return final, "skipped (unchanged)"
    started = stamps.data.get("train", {}).get("fingerprint")
    has_work = bool(complete_checkpoints(run_dir)) or final.exists()
    if has_work and started != fingerprint:
        raise PipelineError(
            f"{run_dir} holds a training run with other data or settings (or not made by `qlora-llm run`). "
            "Set train.output_dir to a new folder, or delete this one to start over."
        )
    stamps.mark("train", fingerprint, False)
    result = _train_apart(cfg, force)
    if result["final_adapter"] is None:
        raise PipelineError(
            f"training stopped by {result['stopped']} at step {result['global_step']}; run the same command "
            "again to continue from the last checkpoint."
        )
    stamps.mark("train", fingerprint, True)
    if result["stopped"] in ("SIGTERM", "SIGINT"):
        # It came after the last step boundary, so training finished; the user still asked `run` to stop.
        raise PipelineError(
            f"stopped by {result['stopped']} after training finished (the final adapter is written: "
            f"{result['final_adapter']}); run the same command again to evaluate, merge and answer "
            "(training is skipped)."
        )
    return Path(result["final_adapter"]), "resumed, done" if has_work else "done"


def _train_apart(cfg: Config, force: bool = False) -> dict[str, Any]:
    """`train(cfg, resume="auto", force=force)` in a process of its own (apart.py: training leaves ~0.35 GiB
    in the process that ran it, and the evaluation would stack on it); final_adapter, global_step, stopped."""
    from qlora_llm.apart import call

    return call(
        "qlora_llm.pipeline:train_in_child",
        {"config": cfg.model_dump(mode="json"), "force": force},
        what="training",
        again="Run the same command again to continue from the last checkpoint.",
    )


def train_in_child(request: dict[str, Any]) -> dict[str, Any]:
    """What `_train_apart`'s process runs (SIGTERM, or the death of `run`, stops it with a checkpoint)."""
    from qlora_llm.train import train

    result = train(Config.model_validate(request["config"]), resume="auto", force=request["force"])
    return {
        "final_adapter": str(result.final_adapter) if result.final_adapter else None,
        "global_step": result.global_step,
        "stopped": result.stopped,
    }


def run(
    cfg: Config,
    *,
    columns: dict[str, str] | None = None,
    prompt: str | None = None,
    max_new_tokens: int | None = None,
    force: bool = False,
) -> PipelineResult:
    """Prepare, train, evaluate (base vs fine-tuned), merge and answer one prompt; skip what is done.

    `columns` maps CSV columns (as `prepare --map`); `prompt` is answered at the end by the merged model
    (default: the first evaluation example's question), greedily, at most `max_new_tokens` (default
    `serve.max_new_tokens`). `force`: train and evaluate even where the memory plan says a stage will
    not fit (as `train --force`).
    """
    from qlora_llm.data import load_examples
    from qlora_llm.evaluate import evaluate
    from qlora_llm.generate import Generator, SamplingParams

    run_dir = Path(cfg.train.output_dir)
    result = PipelineResult(run_dir)
    stamps = _Stamps(run_dir)

    def timed(stage: str, start: float, what: str = "done") -> None:
        result.stages[stage] = (
            what if what.startswith("skipped") else f"{what} in {time.perf_counter() - start:.0f}s"
        )
        log.info("stage %d/%d %s: %s", STAGES.index(stage) + 1, len(STAGES), stage, result.stages[stage])

    # 1. prepare: the user's raw files -> validated JSONL in the run folder.
    start = time.perf_counter()
    result.prepared, what = _prepare_stage(cfg, run_dir, stamps, columns or {})
    timed("prepare", start, what)
    trained_cfg = cfg.model_copy(deep=True)
    trained_cfg.data.train_file = result.prepared["train"]
    trained_cfg.data.eval_file = result.prepared.get("eval")

    # 2. train on them (resuming an interrupted run of the same settings), once evaluation will fit too.
    start = time.perf_counter()
    no_merge = _merge_will_not_fit(_check_evaluation_fits(trained_cfg, force))
    if no_merge:
        log.warning(
            "the merge stage will be skipped: %s. The LoRA adapter will be this run's model (the answer at "
            "the end comes from it, on the base loaded as evaluation loads it); merge it on a machine with "
            "that memory: `qlora-llm merge %s`",
            no_merge,
            run_dir,
        )
    result.adapter, what = _train_stage(trained_cfg, run_dir, stamps, force)
    timed("train", start, what)

    # 3. evaluate base vs fine-tuned on the test data, else the held-out split (never on training data).
    start = time.perf_counter()
    test_file = cfg.eval.data_file or result.prepared.get("eval")
    if test_file is None:
        raise PipelineError(
            "nothing to evaluate on: set eval.data_file (a test file) or data.eval_fraction > 0 "
            "(a held-out share of the data)."
        )
    eval_fp = digest(
        {
            "adapter": file_digest(result.adapter / "adapter_model.safetensors"),
            "test": file_digest(Path(test_file)),
            "settings": [cfg.eval.model_dump(mode="json"), cfg.model.model_dump(mode="json")],
        }
    )
    metrics_file = run_dir / "eval" / "metrics.json"
    if stamps.matches("evaluate", eval_fp) and metrics_file.is_file():
        result.metrics = json.loads(metrics_file.read_text())
        timed("evaluate", start, "skipped (unchanged)")
    else:
        evaluated = evaluate(trained_cfg, run_dir, data=Path(test_file), output_dir=run_dir / "eval")
        result.metrics = evaluated.metrics
        stamps.mark("evaluate", eval_fp, True)
        timed("evaluate", start)
    result.report = run_dir / "eval" / "report.html"

    # 4. merge into a full-precision copy of the base, verified (unless the plan says it will not fit).
    start = time.perf_counter()
    result.merged, what = _merge_stage(cfg, run_dir, stamps, result.adapter, no_merge)
    timed("merge", start, what)

    # 5. one answer from the merged model: the fine-tuned model, usable without this package.
    start = time.perf_counter()
    if prompt is None:
        from qlora_llm.templates import to_messages

        prompt = to_messages(load_examples(Path(test_file))[0])[0]["content"]
    if result.merged is not None:
        generator = Generator.load(result.merged, model_cfg=cfg.model, device=cfg.model.device)
    else:  # the adapter on the base, loaded as evaluation loaded it (the plan said that fits)
        generator = Generator.load(
            run_dir, model_cfg=cfg.model, device=cfg.model.device, quantization=cfg.eval.quantization
        )
    params = SamplingParams(max_new_tokens=max_new_tokens or cfg.serve.max_new_tokens, temperature=0.0)
    result.prompt, result.answer = prompt, generator.generate(prompt, params).text
    timed("answer", start)
    return result
