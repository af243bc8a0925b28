"""One-shot GPU check: the seed's 7B QLoRA recipe and everything after it, on one GPU, with no downloads.

    PYTHONPATH=src python bench/gpu_check.py                       # every stage, budgeted to 8 min
    PYTHONPATH=src python bench/gpu_check.py --layers 4 --stages qlora,merge,serving   # a quick try
    PYTHONPATH=src python bench/gpu_check.py --budget-s 300 --out /tmp/gpu_check.json

The model is Mistral-7B-Instruct-v0.2's architecture (the config.json shipped in the package) with
RANDOM weights, seeded, built on the GPU and written once as a bf16 safetensors folder with the real
Mistral tokenizer that the package ships; nothing is downloaded. Random weights make the memory and
speed numbers those of the real model; losses, answers and merge checks mean nothing. Stages:

  qlora      `qlora-llm train configs/mistral-7b-8gb.yaml` (NF4 + double quant, r=16 on 7 projections,
             batch 2 x 512, gradient checkpointing, paged AdamW) for --steps steps on the ACLSum
             papers (data/aclsum/train.jsonl, real text), no evaluation; the run's summary.json gives
             tokens/s and the peak (torch.cuda.max_memory_allocated), compared with `qlora-llm plan`'s
             peak for the same config.
  packing    the same with train.packing=true.
  ckpt-auto  the same with train.gradient_checkpointing=auto; the note says what the run used (the
             summary's gradient_checkpointing and compute_dtype, when it has them).
  merge      `qlora-llm merge` of qlora's adapter into a 16-bit copy of the base: time and output
             size. The merge verifies itself (logits and greedy answers, adapter vs merged); on random
             weights the logits are nearly tied, so bf16 rounding can flip a greedy token and fail the
             check without anything being wrong. When it fails that way, the merge is timed once more
             on a copy of the adapter with lora_B zeroed (an exact no-op delta, so the check is exact),
             and the note says so. The table's seconds are the merge that wrote the folder.
  serving    the merged model (the random base when there is none) loaded 4-bit (nf4) and 16-bit, each
             in a process of its own, and --serve-batch ACLSum prompts decoded together by the server's
             batching engine (qlora_llm.server.engine, no HTTP server): one short warm-up, then
             --serve-tokens new tokens each, greedy, stop tokens ignored so every row decodes all of
             them. Generated tokens/s and the peak memory of the load and decode.
  plan-grid  plan vs measured peak on a small grid (batch 1/4/8, length 256/1024, checkpointing
             on/off, r 8/64, nf4/none), --grid-steps steps each, on SmolLM2-135M's architecture (the
             shipped config.json) with random weights. Its tokenizer is not shipped, so the grid uses
             the Mistral tokenizer with vocab_size set to its 32000 entries (SmolLM2 has 49152: the
             planner reads the folder's config.json, so plan and run agree). Every example is filled
             to just under the length (ACLSum text), so each batch is B x T tokens as the plan assumes.

Every stage is timed and isolated: a failing subprocess or exception is recorded with its error and
the next stage runs. No stage (nor grid point) starts after --budget-s (default 480) seconds, the
random weights' writing included: those left are recorded as "skipped: time budget"; a running
subprocess is stopped 60 s past the budget. The JSON (--out;
default $OUT/gpu_check.json when OUT is set, else runs/gpu-check/gpu_check.json) is rewritten after
every stage, so a run killed midway leaves what it measured; each subprocess's output goes to
<out stem>-logs/ beside it. At the end ONE table is printed. error % = 100 x (planned - measured) /
measured: positive means the plan is above the measured peak (the safe side). max_memory_allocated
never sees the CUDA context and cuBLAS workspace that the plan's 0.5 GiB "runtime overhead" line
counts, so the note also gives the error against the plan without that line. Numbers are printed,
never asserted; without a GPU it says so and exits 0.

Weights, runs and merged folders go to --work-dir (default: a fresh temporary folder, removed at the
end; ~30 GB at full depth). A --work-dir you name is kept, and its random weights are reused.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SEED_CONFIG = ROOT / "configs" / "mistral-7b-8gb.yaml"
ACLSUM = ROOT / "data" / "aclsum" / "train.jsonl"
TOKENIZER = ROOT / "src" / "qlora_llm" / "assets" / "tokenizers" / "mistralai--Mistral-7B-Instruct-v0.2"
GIB = 2**30
STAGES = ["qlora", "packing", "ckpt-auto", "merge", "serving", "plan-grid"]
NEEDS_7B = {"qlora", "packing", "ckpt-auto", "merge", "serving"}
GRACE_S = 60  # a subprocess running when the budget ends may go on this long
RESULT = "RESULT "  # the serving worker's last line: RESULT {json}
# (batch, length, gradient checkpointing, LoRA r, quantization): every value of each appears.
GRID = [
    (1, 256, True, 8, "nf4"),
    (4, 256, False, 8, "nf4"),
    (8, 256, True, 64, "none"),
    (1, 1024, False, 64, "nf4"),
    (4, 1024, True, 8, "none"),
    (8, 1024, False, 8, "nf4"),
    (8, 1024, True, 64, "nf4"),
    (4, 1024, False, 64, "none"),
]
# --cpu (for the tests of this script): tiny widths, so every stage runs in seconds on a CPU.
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_hidden_layers": 2,
}
T0 = time.monotonic()


def say(message: str) -> None:
    """A progress line: wall clock and seconds since start, flushed (readable through a pipe)."""
    print(f"[gpu_check {datetime.now():%H:%M:%S} +{time.monotonic() - T0:4.0f}s] {message}", flush=True)


def default_out(env: Mapping[str, str] = os.environ) -> Path:
    return (
        Path(env["OUT"]) / "gpu_check.json"
        if env.get("OUT")
        else ROOT / "runs" / "gpu-check" / "gpu_check.json"
    )


# --------------------------------------------------------------------------------------------------
# Stages: run in order under a time budget, each isolated, the JSON rewritten after each.


class Budget:
    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.clock, self.end = clock, clock() + seconds

    def left(self) -> float:
        return self.end - self.clock()


Stage = Callable[[Budget], "dict[str, Any] | list[dict[str, Any]]"]


def run_stages(
    stages: list[tuple[str, Stage]], budget: Budget, save: Callable[[list[dict[str, Any]]], None]
) -> list[dict[str, Any]]:
    """Each stage's rows (a stage may give several), in order; an exception is an error row, not an end."""
    rows: list[dict[str, Any]] = []
    for name, stage in stages:
        if budget.left() <= 0:
            rows.append({"stage": name, "status": "skipped", "note": "skipped: time budget"})
            save(rows)
            continue
        say(f"stage {name}: start ({budget.left():.0f} s of the budget left)")
        start = budget.clock()
        try:
            got = stage(budget)
            got = [got] if isinstance(got, dict) else got
        except Exception as err:
            got = [
                {
                    "stage": name,
                    "status": "error",
                    "note": f"error: {type(err).__name__}: {err}",
                    "traceback": traceback.format_exc(),
                }
            ]
        seconds = round(budget.clock() - start, 1)
        for row in got:
            row.setdefault("stage", name)
            row.setdefault("status", "ok")
            row.setdefault("seconds", seconds)
        rows += got
        say(f"stage {name}: {', '.join(r['status'] for r in got)} in {seconds:.0f} s")
        save(rows)
    return rows


def write_json(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]], finished: bool) -> None:
    """Atomically: a kill mid-write leaves the previous version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(
        json.dumps({"meta": meta, "finished": finished, "rows": rows}, indent=2, default=str) + "\n"
    )
    os.replace(tmp, path)


def error_pct(measured: float | None, planned: float | None) -> float | None:
    """How far the plan is from the measurement, in % of the measurement (+ = plan above it)."""
    if measured is None or planned is None or measured <= 0:
        return None
    return 100.0 * (planned - measured) / measured


def gib(n: float | None) -> float | None:
    return None if n is None else n / GIB


def format_table(rows: list[dict[str, Any]]) -> str:
    def num(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    width = max([len("stage")] + [len(r["stage"]) for r in rows])
    lines = [
        f"{'stage':<{width}} {'tokens/s':>9} {'peak GiB':>9} {'planned GiB':>11} {'error %':>8} "
        f"{'seconds':>8}  note"
    ]
    for r in rows:
        lines.append(
            f"{r['stage']:<{width}} {num(r.get('tokens_per_s'), '.0f'):>9} {num(r.get('peak_gib'), '.2f'):>9} "
            f"{num(r.get('planned_gib'), '.2f'):>11} {num(r.get('error_pct'), '+.1f'):>8} "
            f"{num(r.get('seconds'), '.0f'):>8}  {r.get('note', '')}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Subprocesses: `python -m qlora_llm.cli ...`, offline, output to a log file.


def child_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """This environment, offline, unbuffered, with this checkout's src/ first on PYTHONPATH."""
    out = dict(env)
    paths = [str(ROOT / "src")] + [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p]
    out["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    out.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return out


def last_line(text: str) -> str:
    """The line that says what went wrong: the last one that is not a progress bar or blank."""
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith(("error:", "config error:")) or "Error" in line.split(":")[0]:
            return line[:400]
    return lines[-1][:400] if lines else ""


def run_logged(command: list[str], log_file: Path, timeout: float) -> tuple[int, str]:
    """Run `command` in the repository root, its output to `log_file`; (return code, whole output)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_file, "w", encoding="utf-8") as f:
        f.write(f"$ {shlex.join(command)}\n")
        f.flush()
        try:
            rc = subprocess.run(
                command,
                stdout=f,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=child_env(),
                timeout=timeout,
                check=False,
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
            f.write(f"\nerror: stopped after {timeout:.0f} s (the time budget)\n")
    text = log_file.read_text(encoding="utf-8", errors="replace")
    say(f"  exit {rc} after {time.monotonic() - start:.0f} s" + (f": {last_line(text)}" if rc else ""))
    return rc, text


def qlora(args: list[str], log_file: Path, timeout: float) -> tuple[int, str]:
    """`python -m qlora_llm.cli ARGS`; (return code, last 3000 characters of its output)."""
    say(f"  $ qlora-llm {shlex.join(args)}  (log: {log_file})")
    rc, text = run_logged([sys.executable, "-m", "qlora_llm.cli", *args], log_file, timeout)
    return rc, text[-3000:]


def subprocess_timeout(budget: Budget) -> float:
    return max(budget.left(), 0) + GRACE_S


# --------------------------------------------------------------------------------------------------
# Random-weight models, written once as HF folders with the shipped Mistral tokenizer.


def write_random_model(
    folder: Path,
    config: dict[str, Any],
    *,
    device: str,
    seed: int = 0,
    changes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`config` (a config.json as a dict) with `changes`, random weights seeded, built on `device` in bf16
    and saved as safetensors beside the Mistral tokenizer; `random_weights.json`, written last, marks the
    folder complete and says what it holds. An existing complete folder of the same spec is reused."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = {k: v for k, v in config.items() if k not in ("torch_dtype", "dtype", "transformers_version")}
    config.update(changes or {})
    spec = {"config": config, "seed": seed, "dtype": "bfloat16"}
    marker = folder / "random_weights.json"
    if marker.is_file():
        old = json.loads(marker.read_text())
        if {k: old.get(k) for k in spec} == spec:
            return old | {"reused": True}
    if folder.exists():
        shutil.rmtree(folder)
    torch.manual_seed(seed)
    hf_config = AutoConfig.for_model(
        config["model_type"], **{k: v for k, v in config.items() if k != "model_type"}
    )
    with torch.device(device):  # initialised where it runs: seconds on a GPU, minutes for 7B on a CPU
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    # Several shards: train.py hashes a single-file base into every run's manifest (minutes for 14 GB).
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="2GB")
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()  # the stages' subprocesses get the memory back
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER / name, folder / name)
    info = spec | {
        "model_type": hf_config.model_type,
        "parameters": params,
        "bytes": folder_bytes(folder),
        "device": device,
    }
    marker.write_text(json.dumps(info, indent=2) + "\n")
    return info | {"reused": False}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def is_complete(folder: Path) -> bool:
    return (folder / "random_weights.json").is_file()


def weights_note(info: dict[str, Any], label: str) -> str:
    c = info["config"]
    return (
        f"{label}: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, vocab {c['vocab_size']}, "
        f"{info['parameters'] / 1e9:.2f}B params, {info['bytes'] / GIB:.1f} GiB bf16 safetensors"
        + (" (reused)" if info.get("reused") else "")
    )


def zero_adapter_copy(adapter: Path, dest: Path) -> Path:
    """A copy of a PEFT adapter folder with every lora_B weight zeroed: merging it changes nothing, exactly."""
    from safetensors.torch import load_file, save_file

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(adapter, dest)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    zeroed = {k: v.zero_() if "lora_B" in k else v for k, v in weights.items()}
    save_file(zeroed, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dest


def filled_examples(
    tokenizer: Any, seq_len: int, count: int, text: str, template: str = "mistral"
) -> list[dict]:
    """`count` records whose rendered examples are just under `seq_len` tokens (within 16), cut from `text`."""
    from qlora_llm.data import tokenize_examples

    def length(record: dict) -> int:
        rows, _ = tokenize_examples([record], tokenizer, template, 10**9)
        return len(rows[0]["input_ids"])

    ids = tokenizer(text, add_special_tokens=False, verbose=False)[
        "input_ids"
    ]  # longer than any model: cut below
    base = {"instruction": "Summarize the text.", "output": "A summary."}
    frame = length(base | {"input": "x"})
    records = []
    for k in range(count):
        start = (k * 97) % max(1, len(ids) - seq_len)
        n = seq_len - frame
        for _ in range(8):
            record = base | {"input": tokenizer.decode(ids[start : start + n]).strip()}
            over = length(record) - seq_len
            if -16 <= over <= 0:
                records.append(record)
                break
            n -= over + (1 if over > 0 else 4)  # too long: cut; too short: add
    return records


# --------------------------------------------------------------------------------------------------
# Training runs and their plans


def planned(config: Path, overrides: list[str], memory_bytes: int) -> tuple[int | None, int | None, str]:
    """`qlora-llm plan`'s peak and its runtime-overhead line, in bytes, and a note: what the plan chose
    for `train.gradient_checkpointing=auto`, or why there is no plan."""
    try:
        from qlora_llm.config import load_config
        from qlora_llm.plan import plan

        report = plan(load_config(config, overrides), device_memory_bytes=memory_bytes)
        # PlanReport.checkpointing is new (train.gradient_checkpointing=auto); older reports lack it.
        chosen = getattr(report, "checkpointing", "")
        note = f"plan: checkpointing {chosen}" if chosen.startswith("auto") else ""
        return report.estimate.peak, report.estimate.overhead, note
    except Exception as err:
        return None, None, f"no plan ({type(err).__name__}: {str(err).splitlines()[0][:200]})"


def steady_tokens_per_s(metrics_file: Path) -> float | None:
    """Median tokens/s of the logged steps after the first two (CUDA and bitsandbytes warm up there)."""
    if not metrics_file.is_file():
        return None
    rates = [
        r["tokens_per_s"]
        for r in map(json.loads, metrics_file.read_text().splitlines())
        if "tokens_per_s" in r
    ]
    return statistics.median(rates[2:]) if len(rates) > 2 else None


def train_row(summary: dict[str, Any], plan_peak: int | None, plan_overhead: int | None) -> dict[str, Any]:
    """Table and JSON fields of a finished run: its summary against the plan."""
    peak = summary.get("peak_memory_bytes")
    row: dict[str, Any] = {
        "tokens_per_s": summary.get("tokens_per_s"),
        "peak_gib": gib(peak),
        "planned_gib": gib(plan_peak),
        "error_pct": error_pct(peak, plan_peak),
        "summary": summary,
    }
    notes = [f"{summary.get('steps')} steps"]
    if summary.get("steps") and summary.get("tokens_trained"):
        notes.append(f"{summary['tokens_trained'] / summary['steps']:.0f} tokens/step")
    for key in ("gradient_checkpointing", "compute_dtype"):
        if key in summary:
            notes.append(f"{key.replace('_', ' ')} {summary[key]}")
    if summary.get("load_peak_memory_bytes"):
        notes.append(f"peak while loading {summary['load_peak_memory_bytes'] / GIB:.2f} GiB")
    if plan_peak is not None and plan_overhead:
        row["error_pct_without_overhead"] = error_pct(peak, plan_peak - plan_overhead)
        if row["error_pct_without_overhead"] is not None:
            notes.append(
                f"plan without its {plan_overhead / GIB:.1f} GiB overhead: {row['error_pct_without_overhead']:+.1f}%"
            )
    row["note"] = ", ".join(notes)
    return row


def train_and_compare(
    label: str,
    overrides: list[str],
    run_dir: Path,
    log_file: Path,
    memory_bytes: int,
    budget: Budget,
) -> dict[str, Any]:
    """`qlora-llm train` the seed config with `overrides` into `run_dir`; its row against the plan."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    overrides = [*overrides, f"train.output_dir={run_dir}"]
    plan_peak, plan_overhead, plan_note = planned(SEED_CONFIG, overrides, memory_bytes)
    start = time.monotonic()
    rc, tail = qlora(["train", str(SEED_CONFIG), *overrides], log_file, subprocess_timeout(budget))
    seconds = round(time.monotonic() - start, 1)
    summary_file = run_dir / "summary.json"
    if rc != 0 or not summary_file.is_file():
        return {
            "stage": label,
            "status": "error",
            "planned_gib": gib(plan_peak),
            "seconds": seconds,
            "note": f"exit {rc}: {last_line(tail)}" + (f"; {plan_note}" if plan_note else ""),
            "error": tail,
            "overrides": overrides,
        }
    row = {"stage": label, **train_row(json.loads(summary_file.read_text()), plan_peak, plan_overhead)}
    row["tokens_per_s_steady"] = steady_tokens_per_s(run_dir / "metrics.jsonl")
    row["seconds"], row["overrides"] = seconds, overrides
    if plan_note and str(row["summary"].get("gradient_checkpointing")) not in plan_note:  # not said twice
        row["note"] += f"; {plan_note}"
    return row


def seed_overrides(model_dir: Path, device: str, steps: int) -> list[str]:
    """The seed's config on the random folder, --steps steps on ACLSum, no evaluation or early stopping."""
    return [
        f"model.name={model_dir}",
        f"model.device={device}",
        f"data.train_file={ACLSUM}",
        "data.eval_file=null",
        "data.eval_fraction=0",
        "data.max_seq_length=512",
        f"train.max_steps={steps}",
        "train.batch_size=2",
        "train.gradient_accumulation_steps=1",
        "train.logging_steps=1",
        f"train.save_steps={steps}",
        f"train.eval_steps={steps}",
        "train.early_stopping_patience=0",
    ]


def grid_overrides(model_dir: Path, device: str, data: Path, point: tuple, steps: int) -> list[str]:
    batch, seq_len, checkpointing, r, quantization = point
    return [
        f"model.name={model_dir}",
        f"model.device={device}",
        f"model.quantization={quantization}",
        f"data.train_file={data}",
        "data.eval_file=null",
        "data.eval_fraction=0",
        f"data.max_seq_length={seq_len}",
        f"lora.r={r}",
        f"train.max_steps={steps}",
        f"train.batch_size={batch}",
        "train.gradient_accumulation_steps=1",
        f"train.gradient_checkpointing={str(checkpointing).lower()}",
        "train.logging_steps=1",
        "train.save_steps=1000000",
        "train.eval_steps=1000000",
        "train.early_stopping_patience=0",
    ]


def grid_label(point: tuple) -> str:
    batch, seq_len, checkpointing, r, quantization = point
    return f"grid b{batch} T{seq_len} {'ckpt' if checkpointing else 'no-ckpt'} r{r} {quantization}"


# --------------------------------------------------------------------------------------------------
# Serving: the server's batching engine, in this process.


def decode_batch(
    loaded: Any, prompts: list[list[int]], new_tokens: int, timeout: float
) -> tuple[float, list[dict], int]:
    """All prompts submitted at once to one Engine: seconds until the last is done, the results, and the
    prefill passes (1 = they were decoded as one batch)."""
    from qlora_llm.generate import SamplingParams
    from qlora_llm.server.engine import Engine, Job

    engine = Engine(loaded, max_batch_size=len(prompts), batch_wait_s=5.0, max_queue=len(prompts))
    engine.start()

    async def run() -> tuple[float, list[dict]]:
        loop = asyncio.get_running_loop()
        greedy = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
        jobs = [Job(ids, greedy, None, loop, asyncio.Queue()) for ids in prompts]
        start = time.perf_counter()
        for job in jobs:
            engine.submit(job)
        results = []
        for job in jobs:
            while True:
                kind, value = await job.events.get()
                if kind == "error":
                    raise RuntimeError(f"engine: {value}")
                if kind == "done":
                    results.append(value)
                    break
        return time.perf_counter() - start, results

    try:
        seconds, results = asyncio.run(asyncio.wait_for(run(), timeout))
    finally:
        engine.stop()
    return seconds, results, engine.prefills


def serving_prompts(count: int) -> list[str]:
    records = [json.loads(line) for line in ACLSUM.read_text().splitlines()[:count]]
    return [f"{r['instruction']}\n\n{r['input']}"[:1500] for r in records]


def measure_serving(
    model_dir: Path, quantization: str, device: str, batch: int, new_tokens: int, budget: Budget
) -> dict:
    import torch

    from qlora_llm.config import ModelConfig
    from qlora_llm.generate import Generator
    from qlora_llm.model import load_target

    cuda = device == "cuda"
    start = time.perf_counter()
    loaded = load_target(
        model_dir, model_cfg=ModelConfig(device=device), device=device, quantization=quantization
    )
    load_s = time.perf_counter() - start
    # Random weights may pick an EOS any time; without stop tokens every row decodes all its tokens, so
    # the two quantizations generate the same amount.
    loaded.stop_ids = []
    prompts = [Generator(loaded).encode(p) for p in serving_prompts(batch)]
    decode_batch(loaded, prompts, 4, subprocess_timeout(budget))  # warm-up
    seconds, results, prefills = decode_batch(loaded, prompts, new_tokens, subprocess_timeout(budget))
    tokens = sum(r["completion_tokens"] for r in results)
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    peak = torch.cuda.max_memory_allocated() if cuda else None  # this process's: the load and the decode
    return {
        "tokens_per_s": tokens / seconds,
        "peak_gib": gib(peak),
        "generated_tokens": tokens,
        "decode_seconds": seconds,
        "load_seconds": load_s,
        "prefills": prefills,
        "prompt_tokens": [len(p) for p in prompts],
        "note": (
            f"{len(prompts)} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens) x {new_tokens} "
            f"new, greedy, {prefills} prefill(s); {tokens} tokens in {seconds:.1f} s; load {load_s:.0f} s; "
            f"quantization {quantization}, dtype {dtype}; {model_dir.name}"
        ),
    }


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of: {','.join(STAGES)}")
    parser.add_argument(
        "--budget-s", type=float, default=480, help="no stage starts after this (default 480)"
    )
    parser.add_argument(
        "--out", type=Path, help="the JSON (default $OUT/gpu_check.json, else runs/gpu-check/)"
    )
    parser.add_argument("--layers", type=int, help="decoder layers of both models (default: their own)")
    parser.add_argument("--work-dir", type=Path, help="weights and runs; kept (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=12, help="steps of the 7B training stages (default 12)")
    parser.add_argument("--grid-steps", type=int, default=3, help="steps per plan-grid point (default 3)")
    parser.add_argument("--grid-points", type=int, default=len(GRID), help="the first N grid points")
    parser.add_argument("--serve-batch", type=int, default=8, help="prompts decoded together (default 8)")
    parser.add_argument("--serve-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    # For the tests of this script: every stage on the CPU, with tiny widths (TINY).
    parser.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)
    # The serving stage's worker: measure one folder in one quantization, print RESULT {json}.
    parser.add_argument("--serve-one", nargs=2, metavar=("FOLDER", "QUANTIZATION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown {', '.join(unknown)}; choose from {', '.join(STAGES)}")

    import torch

    if not torch.cuda.is_available() and not args.cpu:
        print("no GPU here: this check is for a machine with a CUDA GPU (the CPU tests cover the rest)")
        return 0
    if importlib.util.find_spec("qlora_llm") is None:
        sys.path.insert(0, str(ROOT / "src"))
    for key, value in child_env().items():
        if key.endswith("OFFLINE"):
            os.environ[key] = value

    device = "cpu" if args.cpu else "cuda"
    if args.serve_one:
        folder, quantization = args.serve_one
        row = measure_serving(
            Path(folder), quantization, device, args.serve_batch, args.serve_tokens, Budget(args.budget_s)
        )
        print(RESULT + json.dumps(row), flush=True)
        return 0
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        memory, device_name = int(props.total_memory), props.name
    else:
        import psutil

        memory, device_name = int(psutil.virtual_memory().total), "cpu"
    out = args.out or default_out()
    logs = out.with_name(out.stem + "-logs")
    keep = args.work_dir is not None
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    changes = dict(TINY) if args.cpu else {}
    if args.layers:
        changes["num_hidden_layers"] = args.layers
    meta = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv if argv is None else argv,
        "device": device_name,
        "device_memory_bytes": memory,
        "versions": _versions(),
        "budget_s": args.budget_s,
        "stages": stages,
        "work_dir": str(work),
        "logs": str(logs),
        "error_pct": "100 * (planned - measured) / measured; + = plan above the measured peak",
    }
    say(
        f"{device_name}, {memory / GIB:.0f} GiB; stages {', '.join(stages)}; budget {args.budget_s:.0f} s; work {work}"
    )
    say(f"results: {out}")

    from qlora_llm.plan import SEED_MODEL, load_model_config

    mistral_dir = work / "random-mistral-7b"
    smol_dir = work / "random-smollm2-135m"
    qlora_run = work / "runs" / "qlora"
    merged_dir = work / "merged"

    def weights(budget: Budget) -> dict:
        config, _ = load_model_config(SEED_MODEL)
        info = write_random_model(mistral_dir, config, device=device, seed=args.seed, changes=changes)
        return {"note": weights_note(info, "Mistral-7B-Instruct-v0.2 shape"), "weights": info}

    def need(folder: Path) -> None:
        if not is_complete(folder):
            raise RuntimeError(f"no random-weight model in {folder} (its stage failed or did not run)")

    def train_stage(label: str, extra: list[str]) -> Stage:
        def stage(budget: Budget) -> dict:
            need(mistral_dir)
            run_dir = qlora_run if label == "qlora" else work / "runs" / label
            overrides = seed_overrides(mistral_dir, device, args.steps) + extra
            return train_and_compare(label, overrides, run_dir, logs / f"{label}.log", memory, budget)

        return stage

    def merge(budget: Budget) -> dict:
        adapter = qlora_run / "final_adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise RuntimeError(f"no adapter in {adapter}: the qlora stage failed or did not run")
        shutil.rmtree(merged_dir, ignore_errors=True)  # serving must not find an older run's merge
        start = time.monotonic()
        rc, tail = qlora(
            ["merge", str(qlora_run), "--out", str(merged_dir), "--force"],
            logs / "merge.log",
            subprocess_timeout(budget),
        )
        row: dict[str, Any] = {"seconds_trained_adapter": round(time.monotonic() - start, 1)}
        notes = []
        if rc != 0 and "does not match" in tail and budget.left() > 0:
            row["trained_adapter_error"] = last_line(tail)
            notes.append(
                f"trained adapter: {last_line(tail)} (random weights); timed again with lora_B zeroed"
            )
            zero = zero_adapter_copy(adapter, work / "zero-adapter")
            start = time.monotonic()
            rc, tail = qlora(
                ["merge", str(zero), "--out", str(merged_dir), "--force"],
                logs / "merge-zero.log",
                subprocess_timeout(budget),
            )
        row["seconds"] = round(time.monotonic() - start, 1)
        if rc != 0:
            return row | {
                "status": "error",
                "note": "; ".join([*notes, f"exit {rc}: {last_line(tail)}"]),
                "error": tail,
            }
        v = json.loads((merged_dir / "merge_verification.json").read_text())
        size = folder_bytes(merged_dir)
        notes.insert(
            0,
            f"{size / GIB:.1f} GiB {v['dtype']} in {row['seconds']:.0f} s; max logit diff {v['logits']['max_abs_diff']:.1e}, "
            f"{v['greedy_answers']['identical']}/{v['greedy_answers']['prompts']} greedy answers identical",
        )
        return row | {"output_bytes": size, "verification": v, "note": "; ".join(notes)}

    def serving(budget: Budget) -> list[dict]:
        target = merged_dir if (merged_dir / "config.json").is_file() else mistral_dir
        if target == mistral_dir:
            need(mistral_dir)
        rows = []
        for quantization in ("nf4", "none"):
            label = f"serving {'nf4' if quantization == 'nf4' else '16-bit'}"
            if budget.left() <= 0:
                rows.append({"stage": label, "status": "skipped", "note": "skipped: time budget"})
                continue
            # A process of its own: a crash cannot take the check down, and the peak is serving's alone.
            command = [
                sys.executable, str(Path(__file__).resolve()), "--serve-one", str(target), quantization,
                "--serve-batch", str(args.serve_batch), "--serve-tokens", str(args.serve_tokens),
                "--budget-s", str(round(subprocess_timeout(budget))), *(["--cpu"] if args.cpu else []),
            ]  # fmt: skip
            say(f"  {label}: {target} (log: {logs / f'serving-{quantization}.log'})")
            start = time.monotonic()
            rc, text = run_logged(command, logs / f"serving-{quantization}.log", subprocess_timeout(budget))
            result = next(
                (
                    json.loads(line[len(RESULT) :])
                    for line in reversed(text.splitlines())
                    if line.startswith(RESULT)
                ),
                None,
            )
            if rc != 0 or result is None:
                result = {"status": "error", "note": f"exit {rc}: {last_line(text)}", "error": text[-3000:]}
            rows.append({"stage": label, **result, "seconds": round(time.monotonic() - start, 1)})
        return rows

    def plan_grid(budget: Budget) -> list[dict]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
        config, _ = load_model_config("smollm2-135m-instruct")
        start = time.monotonic()
        info = write_random_model(
            smol_dir, config, device=device, seed=args.seed, changes={"vocab_size": len(tokenizer), **changes}
        )
        rows = [
            {
                "stage": "grid weights",
                "seconds": round(time.monotonic() - start, 1),
                "note": weights_note(info, "SmolLM2-135M shape, Mistral tokenizer"),
                "weights": info,
            }
        ]
        text = " ".join(json.loads(line)["input"] for line in ACLSUM.read_text().splitlines())
        points = GRID[: args.grid_points]
        data = {}
        for seq_len in sorted({p[1] for p in points}):
            records = filled_examples(tokenizer, seq_len, 32, text)
            data[seq_len] = work / "grid-data" / f"filled-{seq_len}.jsonl"
            data[seq_len].parent.mkdir(parents=True, exist_ok=True)
            data[seq_len].write_text("".join(json.dumps(r) + "\n" for r in records))
        for point in points:
            label = grid_label(point)
            if budget.left() <= 0:
                rows.append({"stage": label, "status": "skipped", "note": "skipped: time budget"})
                continue
            overrides = grid_overrides(smol_dir, device, data[point[1]], point, args.grid_steps)
            slug = label.replace(" ", "-")
            rows.append(
                train_and_compare(
                    label, overrides, work / "runs" / slug, logs / f"{slug}.log", memory, budget
                )
            )
        return rows

    known: dict[str, Stage] = {
        "qlora": train_stage("qlora", []),
        "packing": train_stage("packing", ["train.packing=true"]),
        "ckpt-auto": train_stage("ckpt-auto", ["train.gradient_checkpointing=auto"]),
        "merge": merge,
        "serving": serving,
        "plan-grid": plan_grid,
    }
    plan_stages: list[tuple[str, Stage]] = [(s, known[s]) for s in stages]
    if NEEDS_7B & set(stages):
        plan_stages.insert(0, ("weights", weights))  # reused when --work-dir already holds them

    def save(rows: list[dict[str, Any]], finished: bool = False) -> None:
        write_json(out, meta, rows, finished)

    try:
        rows = run_stages(plan_stages, Budget(args.budget_s), save)
        meta["seconds"] = round(time.monotonic() - T0, 1)
        save(rows, finished=True)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        f"{device_name}: error % = 100 x (planned - measured) / measured (+ = plan above the measured peak)"
    )
    print(format_table(rows))
    print(f"\n{out} (subprocess logs in {logs})")
    return 0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    import torch

    found["cuda"] = str(torch.version.cuda)
    return found


if __name__ == "__main__":
    sys.exit(main())
