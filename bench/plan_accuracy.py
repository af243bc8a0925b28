"""Does `qlora-llm plan` tell the truth on CPU? Planned vs measured whole-process peak over a grid.

    python bench/plan_accuracy.py                      # the whole grid (~15 min on 2 cores)
    python bench/plan_accuracy.py --points 0 3 7       # some points (their numbers in the table)
    python bench/plan_accuracy.py --json x.json --whole train configs/smollm2-cpu.yaml train.output_dir=/tmp/x
                                                       # one whole command vs its stages' plan

Each point trains the built-in SmolLM2-135M-Instruct for --steps steps (`qlora-llm train
configs/smollm2-cpu.yaml` with the point's overrides, no evaluation or saving in the steps), in a
process of its own, on examples cut from the ACLSum papers to just under the length (so every batch is
B x T tokens, the plan's worst case). Measured = the process's peak RSS (`ru_maxrss`, what
`/usr/bin/time` reports) under mimalloc as `qlora-llm train` runs, from the run's summary.json; planned = `plan(...).estimate.peak` for the same
config on this machine. Partial checkpointing (`auto` that checkpoints only some layers) happens only
when memory is short, so its points give the planner a smaller RAM size, in the run and in the plan
alike. Numbers are printed, never asserted; tests/test_plan.py holds three points to 15%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
CONFIG = ROOT / "configs" / "smollm2-cpu.yaml"
ACLSUM = ROOT / "data" / "aclsum" / "train.jsonl"
GIB = 2**30

# (batch, length, checkpointing, r, quantization, compute dtype, RAM GiB the planner is told or None)
GRID = [
    (1, 256, "true", 16, "nf4", "auto", None),
    (4, 256, "true", 16, "nf4", "auto", None),
    (4, 512, "false", 16, "nf4", "auto", None),
    (8, 512, "true", 16, "nf4", "auto", None),
    (4, 1024, "true", 16, "nf4", "auto", None),
    (1, 1024, "false", 16, "nf4", "auto", None),
    (4, 512, "auto", 16, "nf4", "auto", 3.5),  # partial: the planner is told 3.5 GiB of RAM
    (4, 512, "true", 8, "nf4", "auto", None),
    (4, 512, "true", 64, "nf4", "auto", None),
    (4, 512, "true", 16, "none", "auto", None),
    (4, 512, "false", 16, "none", "auto", None),
    (4, 512, "true", 16, "nf4", "float32", None),
    (8, 256, "false", 16, "nf4", "float32", None),
]

# The child: train with the point's overrides; a RAM size for the planner replaces the real one.
CHILD = r"""
import sys
memory = float(sys.argv[1])
if memory:
    import qlora_llm.plan as plan
    plan._device_memory = lambda device: int(memory * 2**30)
from qlora_llm.cli import main
sys.exit(main(["train", *sys.argv[2:]]))
"""


def overrides(point: tuple, data: Path, out: Path, steps: int, extra: tuple[str, ...] = ()) -> list[str]:
    batch, length, checkpointing, r, quantization, dtype, _ = point
    return [
        f"data.train_file={data}",
        "data.eval_file=null",
        "data.eval_fraction=0",
        f"data.max_seq_length={length}",
        f"model.quantization={quantization}",
        f"model.compute_dtype={dtype}",
        f"lora.r={r}",
        "lora.dropout=0.05",
        f"train.batch_size={batch}",
        "train.gradient_accumulation_steps=1",
        f"train.gradient_checkpointing={checkpointing}",
        f"train.max_steps={steps}",
        "train.logging_steps=1",
        "train.save_steps=1000000",
        "train.eval_steps=1000000",
        "train.early_stopping_patience=0",
        f"train.output_dir={out}",
        *extra,
    ]


def label(point: tuple) -> str:
    batch, length, checkpointing, r, quantization, dtype, memory = point
    ram = f" ({memory:g} GiB)" if memory else ""
    return f"b{batch} T{length} ckpt={checkpointing}{ram} r{r} {quantization} {dtype}"


def filled_data(folder: Path, lengths: set[int], count: int, extra: tuple[str, ...] = ()) -> dict[int, Path]:
    """JSONL files of examples just under each length, in SmolLM2's own template, cut from ACLSum."""
    from gpu_check import filled_examples

    from qlora_llm.config import load_config
    from qlora_llm.model import load_tokenizer
    from qlora_llm.templates import resolve_template

    cfg = load_config(CONFIG, list(extra))
    tokenizer = load_tokenizer(cfg.model.name, cache_dir=cfg.model.cache_dir)
    template = resolve_template(cfg.model.template, tokenizer)
    text = " ".join(json.loads(line)["input"] for line in ACLSUM.read_text().splitlines()[:40])
    files = {}
    for length in sorted(lengths):
        files[length] = folder / f"filled-{length}.jsonl"
        rows = filled_examples(tokenizer, length, count, text, template)
        files[length].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def planned(point: tuple, data: Path, out: Path, steps: int, extra: tuple[str, ...] = ()) -> tuple[int, str]:
    from qlora_llm.config import load_config
    from qlora_llm.plan import plan

    memory = point[-1]
    report = plan(
        load_config(CONFIG, overrides(point, data, out, steps, extra)),
        device_memory_bytes=int(memory * GIB) if memory else None,
    )
    return report.estimate.peak, report.checkpointing


def measure(point: tuple, data: Path, out: Path, steps: int, extra: tuple[str, ...] = ()) -> dict:
    cmd = [
        sys.executable,
        "-c",
        CHILD,
        str(point[-1] or 0),
        str(CONFIG),
        *overrides(point, data, out, steps, extra),
    ]
    # Under mimalloc, as `qlora-llm train` runs itself (qlora_llm.allocator); glibc's peaks differ by 2x.
    from qlora_llm.allocator import preload_env

    env = preload_env(os.environ) or dict(os.environ)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    summary = json.loads((out / "summary.json").read_text())
    return {
        "peak": summary["peak_memory_bytes"],
        "load_peak": summary.get("load_peak_memory_bytes"),
        "used": f"{summary.get('compute_dtype')}, {summary.get('gradient_checkpointing')}",
    }


def _tree_footprint(pid: int, stop: threading.Event, out: dict) -> None:
    """The largest memory the process tree under `pid` held at once, sampled every 0.1 s: every process's
    own pages (RssAnon) plus the mapped files once (the largest RssFile: the processes map the same
    libraries and model files, whose page-cache pages they share). What the machine must have, where
    max RSS sees one process: `run` waits in RAM beside its training and base-evaluation processes."""
    import psutil

    def status(p: psutil.Process) -> dict[str, int]:
        try:
            lines = Path(f"/proc/{p.pid}/status").read_text().splitlines()
        except OSError:
            return {}
        return {
            x.split(":")[0]: int(x.split()[1]) * 1024 for x in lines if x.startswith(("RssAnon", "RssFile"))
        }

    while not stop.wait(0.1):
        try:
            tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            continue
        rows = [r for r in map(status, tree) if r]
        if rows:
            now = sum(r.get("RssAnon", 0) for r in rows) + max(r.get("RssFile", 0) for r in rows)
            out["footprint"] = max(out.get("footprint", 0), now)


def whole_run(command: list[str]) -> dict:
    """Run one whole `qlora-llm COMMAND CONFIG [key=value ...]` under /usr/bin/time -v and compare the
    largest of the plan's stages that COMMAND goes through (every stage's peak is returned) with what the
    run held: the process tree's footprint (`_tree_footprint`), at least the max RSS of its largest process."""
    from qlora_llm.allocator import preload_env
    from qlora_llm.config import load_config
    from qlora_llm.plan import RUN_STAGES, plan

    report = plan(load_config(command[1], command[2:]), measure_evaluation=True)
    # `run` goes through train and evaluate; every other command is its own stage.
    ran = [st for st in report.stages if st.name in (RUN_STAGES if command[0] == "run" else (command[0],))]
    largest = max(ran, key=lambda st: st.peak) if ran else None
    cli = [sys.executable, "-c", "import sys; from qlora_llm.cli import main; sys.exit(main(sys.argv[1:]))"]
    env = preload_env(os.environ) or dict(os.environ)
    child = subprocess.Popen(
        ["/usr/bin/time", "-v", *cli, *command],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    sampled: dict[str, int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=_tree_footprint, args=(child.pid, stop, sampled), daemon=True)
    sampler.start()
    _, stderr = child.communicate()
    stop.set()
    sampler.join()
    rss = [line for line in stderr.splitlines() if "Maximum resident set size" in line]
    max_rss = int(rss[-1].split(":")[1]) * 1024 if rss else 0
    return {
        "command": " ".join(["qlora-llm", *command]),
        "returncode": child.returncode,
        "last_line": next((x for x in reversed(stderr.splitlines()) if x.startswith("error")), ""),
        "stages": {st.name: st.peak for st in report.stages},
        "planned": largest.peak if largest else report.peak,
        "planned_stage": largest.name if largest else report.peak_stage,
        "measured": max(max_rss, sampled.get("footprint", 0)),
        "max_rss": max_rss,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, nargs="*", help="grid indices (default: all)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument(
        "--whole", nargs=argparse.REMAINDER, help="COMMAND CONFIG [key=value ...]: one whole run vs the plan"
    )
    args = parser.parse_args()
    if args.whole:
        row = whole_run(args.whole)
        for name, peak in row["stages"].items():
            print(f"planned {name:<10}{peak / GIB:>7.2f} GiB")
        err = 100 * (row["planned"] - row["measured"]) / max(row["measured"], 1)
        print(
            f"whole run (exit {row['returncode']}): planned {row['planned'] / GIB:.2f} GiB in "
            f"{row['planned_stage']}, measured {row['measured'] / GIB:.2f} GiB (the process tree at once; "
            f"max RSS of one process {row['max_rss'] / GIB:.2f}), error {err:+.1f}%"
        )
        if row["returncode"]:
            print(row["last_line"])
        if args.json:
            args.json.write_text(json.dumps(row, indent=2) + "\n")
        return 1 if row["returncode"] else 0
    points = [(i, GRID[i]) for i in (args.points if args.points else range(len(GRID)))]
    rows = []
    with tempfile.TemporaryDirectory(prefix="plan-accuracy-") as tmp:
        data = filled_data(Path(tmp), {p[1] for _, p in points}, count=16)
        header = f"{'#':>2}  {'point':<42}{'planned GiB':>12}{'measured GiB':>13}{'error %':>9}  used"
        print(header, flush=True)
        for i, point in points:
            out = Path(tmp) / f"run-{i}"
            plan_peak, chose = planned(point, data[point[1]], out, args.steps)
            got = measure(point, data[point[1]], out, args.steps)
            row = {
                "point": i,
                "label": label(point),
                "planned": plan_peak,
                "plan_checkpointing": chose,
                **got,
            }
            rows.append(row)
            if "error" in got:
                print(
                    f"{i:>2}  {label(point):<42}{plan_peak / GIB:>12.2f}  failed: {got['error']}", flush=True
                )
                continue
            err = 100 * (plan_peak - got["peak"]) / got["peak"]
            print(
                f"{i:>2}  {label(point):<42}{plan_peak / GIB:>12.2f}{got['peak'] / GIB:>13.2f}{err:>+9.1f}  "
                f"{got['used']} (load {got['load_peak'] / GIB:.2f})",
                flush=True,
            )
    errors = [abs(100 * (r["planned"] - r["peak"]) / r["peak"]) for r in rows if "peak" in r]
    if errors:
        print(
            f"|error| max {max(errors):.1f}%, mean {sum(errors) / len(errors):.1f}% over {len(errors)} points"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
