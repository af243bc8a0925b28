"""The `qlora-llm` command: parse arguments, dispatch to one library function, print the result.

    qlora-llm run configs/smollm2-cpu.yaml --data my.csv train.output_dir=runs/mine   # all of it
    qlora-llm prepare data/raw.csv --output-dir data/out --model smollm2-135m-instruct
    qlora-llm models
    qlora-llm config configs/smollm2-cpu.yaml train.max_steps=20
    qlora-llm evaluate runs/smollm2-aclsum
    qlora-llm merge runs/smollm2-aclsum
    qlora-llm export runs/smollm2-aclsum --format ollama --quant q4_k_m
    qlora-llm generate runs/smollm2-aclsum "Summarize ..." --temperature 0
    qlora-llm chat runs/smollm2-aclsum
    qlora-llm serve runs/smollm2-aclsum --port 8000

Nothing here does work of its own; every subcommand is one call into the package.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_llm import __version__, quiet
from qlora_llm.allocator import active_allocator, bound_kernel_caches, preload_env
from qlora_llm.config import Config, ConfigError, describe_keys, load_config
from qlora_llm.errors import QloraError

if TYPE_CHECKING:
    from qlora_llm.generate import Generator, SamplingParams

SHOW_PROBLEMS = 20


def _config_from(args: argparse.Namespace) -> object:
    # `qlora-llm config train.max_steps=3`: the optional CONFIG slot caught an override.
    if args.config and "=" in args.config and not Path(args.config).exists():
        return load_config(None, [args.config, *args.overrides])
    return load_config(args.config, args.overrides)


def cmd_prepare(args: argparse.Namespace) -> int:
    from qlora_llm.data import PrepareError, prepare

    overrides = list(args.overrides)
    for flag, key in (
        ("model", "model.name"),
        ("max_seq_length", "data.max_seq_length"),
        ("overlength", "data.overlength"),
        ("min_examples", "data.min_examples"),
        ("template", "model.template"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(args.config, overrides)
    columns = _columns(args.map)
    try:
        report = prepare(
            cfg,
            args.inputs,
            Path(args.output_dir),
            eval_inputs=args.eval_input,
            eval_fraction=args.eval_fraction or 0.0,
            columns=columns,
            split=args.split,
            force=args.force,
            strict=args.strict,
        )
    except PrepareError as err:
        if err.report is not None:
            _print_problems(err.report.problems)
        print(f"error: {err}", file=sys.stderr)
        return 1
    _print_problems(report.problems)
    print(
        f"read {report.records_read} records: wrote {report.train_written} train, {report.eval_written} eval; "
        f"{report.invalid} invalid, {report.duplicates} duplicates, {report.overlength_dropped} too long "
        f"(dropped), {report.truncated} truncated, {report.eval_leaks_removed} eval leaks removed"
    )
    t = report.token_lengths
    print(
        f"tokens per example ({report.model}, template {report.template}): min {t['min']}, "
        f"median {t['p50']}, p95 {t['p95']}, max {t['max']} (limit {report.max_seq_length})"
    )
    for path in report.outputs:
        print(f"  {path}")
    return 0


def _columns(items: list[str]) -> dict[str, str]:
    columns = {}
    for item in items:
        target, sep, column = item.partition("=")
        if not sep or target not in ("instruction", "input", "output", "prompt", "completion"):
            raise ConfigError(
                f"--map {item}: expected FIELD=COLUMN with FIELD one of instruction, input, "
                "output, prompt, completion"
            )
        columns[target] = column
    return columns


def _print_problems(problems: list) -> None:
    for p in problems[:SHOW_PROBLEMS]:
        print(f"{p.severity}: {p}", file=sys.stderr)
    if len(problems) > SHOW_PROBLEMS:
        print(f"... and {len(problems) - SHOW_PROBLEMS} more (all in prepare_report.json)", file=sys.stderr)


def _in_launched_worker() -> bool:
    # torch.distributed.run (torchrun) sets these in every process it starts.
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def cmd_train(args: argparse.Namespace) -> int:
    from qlora_llm.train import train

    cfg = load_config(args.config, args.overrides)  # a config error shows once, before any launch
    if args.nproc < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise ConfigError(
            f"--nproc {args.nproc} --nnodes {args.nnodes} --node-rank {args.node_rank}: need --nproc >= 1, "
            "--nnodes >= 1 and 0 <= --node-rank < --nnodes"
        )
    if (args.nproc > 1 or args.nnodes > 1) and not _in_launched_worker():
        from qlora_llm.distributed import Launch, launch

        worker = ["train", args.config, *args.overrides]
        worker += ["--resume", args.resume] if args.resume else []
        worker += ["--force"] if args.force else []
        worker += ["--verbose"] if args.verbose else []
        return launch(
            Launch(args.nproc, args.nnodes, args.node_rank, args.master_addr, args.master_port), worker
        )
    result = train(cfg, resume=args.resume, force=args.force)
    if not result.main_process:
        return result.exit_code  # rank 0 reports for all
    _print_summary(result.summary, result.run_dir)
    if result.exit_code:
        print(
            f"stopped by {result.stopped}; continue with: qlora-llm train {args.config} --resume auto "
            + (f"--nproc {os.environ['LOCAL_WORLD_SIZE']} " if _in_launched_worker() else "")
            + " ".join(args.overrides),
            file=sys.stderr,
        )
    return result.exit_code


def _print_summary(summary: dict, run_dir: Path) -> None:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    rows = [
        ("steps", summary["steps"]),
        ("stopped", summary["stopped"]),
        ("seconds", summary["seconds"]),
        (
            f"train loss (mean of first -> last {summary['train_loss_logs_averaged']} logs)",
            f"{fmt(summary['train_loss_first'])} -> {fmt(summary['train_loss_last'])}",
        ),
        (
            "eval loss (first -> best)",
            f"{fmt(summary['eval_loss_first'])} -> {fmt(summary['eval_loss_best'])}",
        ),
        ("trained tokens/s", summary["tokens_per_s"]),
        (
            "peak memory (while loading)",
            f"{summary['peak_memory_bytes'] / 2**30:.2f} GiB "
            f"({summary.get('load_peak_memory_bytes', 0) / 2**30:.2f} GiB)",
        ),
        (
            "compute dtype, checkpointing",
            f"{summary.get('compute_dtype')}, {summary.get('gradient_checkpointing')}",
        ),
        ("trainable parameters", f"{summary['trainable_parameters']:,}"),
        ("best checkpoint", summary["best_checkpoint"]),
        ("final adapter", summary["final_adapter"]),
        ("run folder", run_dir),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _target_config(args: argparse.Namespace) -> Config:
    # A run, adapter or merged folder carries its own config (template, data, settings); --config replaces it.
    own = Path(args.target) / "config.yaml"
    overrides = list(args.overrides)
    # Sampling flags are serve.* overrides, so ServeConfig validates them (temperature 0..2, ...) once.
    for flag in ("max_new_tokens", "temperature", "top_p"):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"serve.{flag}={value}")
    return load_config(args.config or (own if own.is_file() else None), overrides)


def _sampling(args: argparse.Namespace, cfg: Config) -> SamplingParams:
    from qlora_llm.generate import SamplingParams

    s = cfg.serve
    return SamplingParams(
        max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, seed=args.seed
    )


def _generator(args: argparse.Namespace, cfg: Config) -> Generator:
    from qlora_llm.generate import Generator

    return Generator.load(
        args.target, model_cfg=cfg.model, device=cfg.model.device, quantization=cfg.serve.quantization
    )


def cmd_generate(args: argparse.Namespace) -> int:
    cfg = _target_config(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        print(
            "error: the prompt is empty; give the user message, or - to read it from stdin", file=sys.stderr
        )
        return 2
    completion = _generator(args, cfg).generate(prompt, _sampling(args, cfg))
    print(completion.text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from qlora_llm.chat import chat_loop

    cfg = _target_config(args)
    generator = _generator(args, cfg)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    chat_loop(generator, _sampling(args, cfg), write=write, system=args.system)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from qlora_llm.merge import merge

    cfg = _target_config(args)
    result = merge(
        args.target,
        Path(args.out) if args.out else None,
        model_cfg=cfg.model,
        device=cfg.model.device,
        force=args.force,
        benchmark_prompts=cfg.eval.benchmark_prompts,
    )
    v = result.verification
    print(
        f"merged into {result.out_dir} ({v['dtype']}): max logit difference {v['logits']['max_abs_diff']:.1e} "
        f"(tolerance {v['logits']['tolerance']:.0e}), {v['greedy_answers']['identical']}/"
        f"{v['greedy_answers']['prompts']} greedy answers identical"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from qlora_llm.export import export

    cfg = _target_config(args)
    result = export(
        args.target,
        args.format,
        quant=args.quant,
        out_dir=Path(args.out) if args.out else None,
        adapter_only=args.adapter_only,
        merged=args.merged,
        verify=args.verify,
        force=args.force,
        model_cfg=cfg.model,
        device=cfg.model.device,
    )
    forced = result.verification.get("teacher_forced")
    if forced:
        print(
            f"llama.cpp vs transformers on the same tokens: top-1 agreement {forced['decisive_agreement']:.1%} "
            f"where decisive, {forced['top1_agreement']:.1%} overall; mean KL {forced['mean_kl']:.2g}"
        )
    print(f"exported to {result.out_dir} (see EXPORT.md there); run it with:")
    for command in result.commands:
        print(f"  {command}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from qlora_llm.server.app import serve

    overrides = list(args.overrides)
    overrides += [f"serve.host={args.host}"] if args.host else []
    overrides += [f"serve.port={args.port}"] if args.port else []
    args.overrides = overrides
    cfg = _target_config(args)
    adapters = {}
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(
                f"--adapter {item!r}: expected NAME=PATH, e.g. --adapter aclsum=runs/smollm2-aclsum"
            )
        adapters[name] = Path(path)
    serve(cfg, args.target, adapters=adapters, api_key=args.api_key or os.environ.get("QLORA_LLM_API_KEY"))
    return 0


def cmd_studio(args: argparse.Namespace) -> int:
    from qlora_llm.studio.app import serve_studio
    from qlora_llm.studio.gpus import detect_gpus, parse_gpus

    if args.insecure_no_auth and not args.api_key:
        print(f"WARNING: the studio on {args.host} has no login (--insecure-no-auth)", file=sys.stderr)
    data = Path(args.data) if args.data else None
    # Learnt once, here, without torch: the studio process loads no model.
    gpus = parse_gpus(args.gpus) if args.gpus is not None else detect_gpus(os.environ)
    serve_studio(Path(args.runs), data, args.host, args.port, args.api_key, args.insecure_no_auth, gpus)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from qlora_llm.evaluate import evaluate

    cfg = _target_config(args)
    if args.adapter_scales:
        return _sweep(cfg, args)
    result = evaluate(
        cfg,
        args.target,
        data=Path(args.data) if args.data else None,
        compare=args.compare,
        output_dir=Path(args.output_dir) if args.output_dir else None,
    )
    _print_table(result.metrics)
    print(f"report: {result.output_dir / 'report.html'}")
    return 0


def _sweep(cfg: Config, args: argparse.Namespace) -> int:
    from qlora_llm.sweep import sweep_adapter_scale

    try:
        scales = [float(x) for x in args.adapter_scales.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"--adapter-scales {args.adapter_scales}: expected numbers, e.g. 0.25,0.5,1"
        ) from None
    result = sweep_adapter_scale(
        cfg, args.target, scales, output_dir=Path(args.output_dir) if args.output_dir else None
    )
    print(f"\n{'scale':>6} {'ROUGE-L':>8} {'general mean acc':>17}  general comparisons")
    for r in result.rows:
        mean = "-" if r["general_mean_tuned"] is None else f"{r['general_mean_tuned']:.0%}"
        verdicts = "; ".join(f"{g['task']}: {g['verdict']}" for g in r["general"]) or "-"
        print(f"{r['scale']:>6g} {r['task_tuned']:>8.4f} {mean:>17}  {verdicts}")
    if result.chosen is None:
        print("\nno scale kept general ability on the eval split (see sweep.json)")
    else:
        print(
            f"\nchosen: model.adapter_scale={result.chosen:g} (merge with it: qlora-llm merge RUN "
            f"model.adapter_scale={result.chosen:g})"
        )
    print(f"trade-off: {result.output_dir / 'sweep.png'}")
    return 0


def _print_table(m: dict) -> None:
    has_base = m["base"] is not None
    print(
        f"\n{'metric':34} {'base':>10} {'tuned':>10} {'change':>16}"
        if has_base
        else f"\n{'metric':34} {'value':>10}"
    )
    for row in m["table"]:
        fmt = row["format"]
        cells = [f"{row['label']:34}"]
        if has_base:
            cells.append(f"{'-' if row['base'] is None else fmt.format(row['base']):>10}")
        cells.append(f"{'-' if row['tuned'] is None else fmt.format(row['tuned']):>10}")
        if has_base and row["change"] is not None:
            sign = "+" if row["change"] >= 0 else "-"
            # A change of a rate is in percentage points, not percent.
            change = (
                f"{abs(row['change']) * 100:.0f} points"
                if fmt == "{:.0%}"
                else fmt.format(abs(row["change"]))
            )
            cells.append(f"{sign + change:>16}")
        print(" ".join(cells))
    print(f"\n{m['headline']}")


def cmd_run(args: argparse.Namespace) -> int:
    from qlora_llm.pipeline import run

    overrides = list(args.overrides)
    if args.data:
        # The user's own data: its held-out share is the evaluation set unless test data is given.
        overrides += [f"data.train_file={args.data}", "data.eval_file=null", "eval.data_file=null"]
    overrides += [f"data.eval_file={args.eval_data}"] if args.eval_data else []
    overrides += [f"eval.data_file={args.test_data}"] if args.test_data else []
    cfg = load_config(args.config, overrides)
    columns = _columns(args.map)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    result = run(cfg, columns=columns, prompt=prompt, force=args.force)
    print()
    for stage, what in result.stages.items():
        print(f"{stage:9} {what}")
    rows = [
        ("prepared data", result.prepared["train"].parent),
        ("LoRA adapter (PEFT)", result.adapter),
        ("evaluation report", result.report),
        ("merged model", result.merged or "not made: it does not fit this device (the warning above)"),
        ("chat with it", f"qlora-llm chat {result.merged or result.run_dir}"),
        ("serve it", f"qlora-llm serve {result.run_dir}"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    _print_table(result.metrics)
    shown = result.prompt if len(result.prompt) <= 300 else result.prompt[:297] + "..."
    print(f"\nThe fine-tuned model, asked:\n{shown}\n\nanswered:\n{result.answer}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from qlora_llm.plan import format_plan, plan

    memory = int(args.memory * 2**30) if args.memory else None
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: need at least 1 process")
    cfg = load_config(args.config, args.overrides)
    # The stages of `qlora-llm run` (what `make demo` runs after it), training beside `run` itself.
    report = plan(
        cfg, device_memory_bytes=memory, processes=args.nproc, measure_evaluation=True, under_run=True
    )
    print(format_plan(report))
    return 0 if report.fits else 1


def cmd_models(args: argparse.Namespace) -> int:
    from qlora_llm.model import list_models

    cfg = load_config(args.config, args.overrides)
    rows = list_models(cfg.model.cache_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['status']}\n{'':<{width}}  {r['about']}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    if args.keys:
        for key, default, about in describe_keys():
            print(f"{key:<34} {default:<40} {about}")
        return 0
    cfg = _config_from(args)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-llm", description="Prepare, fine-tune (QLoRA), evaluate and serve LLMs."
    )
    parser.add_argument("--version", action="version", version=f"qlora-llm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_prepare,
        _add_train,
        _add_run,
        _add_plan,
        _add_evaluate,
        _add_model_commands,
        _add_tools,
    ):
        add(sub)
    return parser


def _add_prepare(sub: Any) -> None:
    """prepare: raw data in, training JSONL and a report out."""
    p = sub.add_parser("prepare", help="validate raw data and write training JSONL")
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="CSV/TSV, JSONL, JSON array, a datasets folder, or a Hub dataset name",
    )
    p.add_argument("--output-dir", required=True, help="where train.jsonl, eval.jsonl and the report go")
    p.add_argument("--model", help="model whose tokenizer counts tokens (default: model.name)")
    p.add_argument("--max-seq-length", type=int, help="longest example in tokens (default 512)")
    p.add_argument("--overlength", choices=["drop", "truncate", "error"], help="policy for too-long examples")
    p.add_argument("--eval-fraction", type=float, help="hold out this share as eval.jsonl (e.g. 0.1)")
    p.add_argument("--eval-input", action="append", metavar="FILE", help="use these records as eval.jsonl")
    p.add_argument("--min-examples", type=int, help="fail below this many valid examples (default 10)")
    p.add_argument(
        "--template", choices=["default", "mistral", "auto"], help="prompt format used to count tokens"
    )
    p.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="FIELD=COLUMN",
        help="CSV column for a field, e.g. --map output=answer",
    )
    p.add_argument("--split", default="train", help="split of a datasets folder or Hub dataset")
    p.add_argument("--config", help="YAML config to take model and data settings from")
    p.add_argument("--force", action="store_true", help="overwrite an existing train.jsonl")
    p.add_argument("--strict", action="store_true", help="fail if any record is invalid")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other config override, e.g. --set data.seed=1",
    )


def _add_train(sub: Any) -> None:
    """train, with the flags of a multi-process launch."""
    p = sub.add_parser("train", help="fine-tune with QLoRA (or LoRA) from a config")
    p.add_argument("config", help="YAML config, e.g. configs/smollm2-cpu.yaml")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="e.g. train.max_steps=20")
    p.add_argument(
        "--resume",
        metavar="auto|CHECKPOINT",
        help="continue from the newest complete checkpoint (auto) or the one given",
    )
    p.add_argument("--force", action="store_true", help="train even if the memory plan says it will not fit")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="data-parallel processes on this node (one per GPU; gloo on CPU), via torch.distributed.run",
    )
    p.add_argument("--nnodes", type=int, default=1, help="machines in a multi-node run (default 1)")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's index, 0 to nnodes-1")
    p.add_argument("--master-addr", default="127.0.0.1", help="address of node 0 (default 127.0.0.1)")
    p.add_argument("--master-port", type=int, default=29500, help="free TCP port on node 0 (default 29500)")


def _add_run(sub: Any) -> None:
    """run: the whole flow on the user's data."""
    p = sub.add_parser(
        "run",
        help="the whole flow on your data: prepare, train, evaluate, merge, answer (skips what is done)",
    )
    p.add_argument("config", help="YAML config, e.g. configs/smollm2-cpu.yaml")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="e.g. train.max_steps=20")
    p.add_argument(
        "--data", metavar="FILE", help="your raw training data (CSV, JSONL, ...); held-out share evaluates"
    )
    p.add_argument("--eval-data", metavar="FILE", help="raw data to evaluate on during training")
    p.add_argument("--test-data", metavar="FILE", help="data for the final base vs fine-tuned evaluation")
    p.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN", help="as in prepare")
    p.add_argument("--prompt", help="what the fine-tuned model answers at the end (- reads stdin)")
    p.add_argument(
        "--force",
        action="store_true",
        help="run even if the memory plan says training or evaluation won't fit",
    )


def _add_plan(sub: Any) -> None:
    """plan: the memory estimate."""
    p = sub.add_parser("plan", help="estimate peak memory before loading any weight: will it fit?")
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value")
    p.add_argument(
        "--memory",
        type=float,
        metavar="GIB",
        help="plan for a device with this much memory (default: this machine's device)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="memory per GPU of a run on N GPUs (train.distributed)",
    )


def _add_evaluate(sub: Any) -> None:
    """evaluate, and its adapter-scale sweep."""
    p = sub.add_parser("evaluate", help="perplexity, ROUGE, benchmark prompts, speed, memory: base vs tuned")
    p.add_argument("target", help="a run folder, an adapter folder, a merged model folder or a model name")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="e.g. eval.max_examples=20")
    p.add_argument(
        "--data", metavar="FILE", help="eval JSONL (default: eval.data_file, else the run's eval split)"
    )
    p.add_argument(
        "--compare", metavar="BASE", help="auto (the run's base, default), none, or a model/folder"
    )
    p.add_argument("--output-dir", metavar="DIR", help="where the report goes (default: <run>/eval)")
    p.add_argument("--config", help="YAML config (default: the run's own config.yaml)")
    p.add_argument(
        "--adapter-scales",
        metavar="L,L,...",
        help="sweep model.adapter_scale on the run's eval split, e.g. 0.25,0.5,0.75,1: task gain vs general "
        "ability per scale, and the best scale with no measurable general loss (<run>/sweep/)",
    )


def _add_model_commands(sub: Any) -> None:
    """The commands that take a trained target: generate, chat, merge, export, serve."""

    def target_command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument(
            "target", help="a run folder, an adapter folder, a merged model folder or a model name"
        )
        p.add_argument("--config", help="YAML config (default: the target's own config.yaml)")
        return p

    def sampling_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--max-new-tokens", type=int, help="answer length limit (default serve.max_new_tokens)"
        )
        p.add_argument(
            "--temperature", type=float, help="0 = greedy, 0.1 near-deterministic, 0.9 creative (0.7)"
        )
        p.add_argument("--top-p", type=float, help="nucleus sampling mass (default 0.9)")
        p.add_argument("--seed", type=int, help="sampling seed, for repeatable answers")

    p = target_command("generate", "answer one prompt and print it")
    p.add_argument("prompt", help="the user message; - reads it from standard input")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value")
    sampling_flags(p)

    p = target_command("chat", "interactive chat in the terminal, answers streamed")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value")
    p.add_argument("--system", help="a system message to start the conversation with")
    sampling_flags(p)

    p = target_command("merge", "merge the adapter into a full-precision copy of the base, verified")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value")
    p.add_argument("--out", metavar="DIR", help="where the merged model goes (default <run>/merged)")
    p.add_argument("--force", action="store_true", help="replace an existing merged folder")

    p = target_command("export", "export to llama.cpp (GGUF), Ollama or vLLM, verified")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value")
    p.add_argument("--format", choices=("gguf", "ollama", "vllm"), default="gguf", help="(default gguf)")
    p.add_argument("--quant", choices=("f16", "q8_0", "q4_k_m"), help="GGUF weights (default f16)")
    p.add_argument("--out", metavar="DIR", help="where the export goes (default <run>/export-FORMAT[-QUANT])")
    p.add_argument("--adapter-only", action="store_true", help="gguf: the LoRA as a GGUF adapter (--lora)")
    p.add_argument(
        "--merged", action="store_true", help="vllm: serve the merged model instead of the adapter"
    )
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip running the GGUF in llama.cpp (the first run builds llama.cpp's tools, once)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing export folder")

    p = target_command("serve", "REST server: /generate, /health, OpenAI /v1/*, /metrics")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="serve more adapters")
    p.add_argument("--api-key", help="require this key (or set QLORA_LLM_API_KEY)")
    p.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 8000)")


def _add_tools(sub: Any) -> None:
    """studio, models, config."""
    p = sub.add_parser("studio", help="the web studio: launch, watch, stop and resume runs in a browser")
    p.add_argument("--runs", default="runs", help="folder of run folders (default runs)")
    p.add_argument("--data", help="folder the form's data files may come from (default: the runs folder)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="TCP port (default 7860)")
    p.add_argument("--api-key", help="require this key to sign in (needed to bind beyond loopback)")
    p.add_argument("--insecure-no-auth", action="store_true", help="bind beyond loopback with no login")
    p.add_argument(
        "--gpus",
        metavar="IDS|none",
        help="GPUs the jobs may use, e.g. 0,1 (one job per GPU, or --nproc K over K), or none: one job at "
        "a time (default: CUDA_VISIBLE_DEVICES if set, else nvidia-smi's GPUs)",
    )

    p = sub.add_parser("models", help="list known models and whether each is available here")
    p.add_argument("--config", help="YAML config (for model.cache_dir)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value")

    p = sub.add_parser("config", help="show the resolved config, or every key with its default")
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value")
    p.add_argument("--keys", action="store_true", help="list every key, its default and meaning")


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "prepare": cmd_prepare,
    "train": cmd_train,
    "run": cmd_run,
    "evaluate": cmd_evaluate,
    "merge": cmd_merge,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "serve": cmd_serve,
    "export": cmd_export,
    "plan": cmd_plan,
    "models": cmd_models,
    "config": cmd_config,
    "studio": cmd_studio,
}

# The commands that load a model: they run under mimalloc where it is installed, with oneDNN's kernel
# caches bounded (see allocator.py).
MODEL_COMMANDS = {"train", "run", "evaluate", "merge", "export", "generate", "chat", "serve"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # argparse fills a trailing `key=value ...` positional at its first chance, so overrides written after
    # an option (`serve RUN --port 9000 serve.max_queue=4`) arrive here as extras: they are still overrides.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.command in MODEL_COMMANDS:
        bound_kernel_caches()  # before any matmul; the re-executed process and torchrun's inherit it
    if argv is None and args.command in MODEL_COMMANDS:
        env = preload_env(os.environ)
        if env is not None:
            # Same pid, same stdin/stdout: signals and pipes reach the re-executed process unchanged.
            os.execve(sys.executable, [sys.executable, "-m", "qlora_llm.cli", *sys.argv[1:]], env)
    # In a multi-process run only rank 0 talks; the others log errors only.
    replica = os.environ.get("RANK", "0") != "0"
    if replica:
        warnings.simplefilter("ignore")
    quiet.setup_logging(logging.ERROR if replica else logging.DEBUG if args.verbose else logging.INFO)
    if args.command in MODEL_COMMANDS | {"prepare", "models", "plan"}:
        quiet.install()
    if args.command in MODEL_COMMANDS:
        logging.getLogger("qlora_llm").info("memory allocator: %s", active_allocator())
    try:
        return COMMANDS[args.command](args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C/SIGTERM during training, or Ctrl-C elsewhere
        print("interrupted", file=sys.stderr)
        return 130
    except QloraError as err:  # every refusal of the library, its message written for the user
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
