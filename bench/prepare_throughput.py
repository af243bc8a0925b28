"""Throughput of the data layer: `qlora_llm.data.prepare` end to end on N synthetic records.

Measures wall-clock seconds, records/s, CPU seconds (user + system, all threads) and peak RSS of one
`prepare(...)` run with eval_fraction=0.1: reading, validating, de-duplicating, loading the tokenizer,
counting tokens with the real Mistral tokenizer on the rendered template, the 90/10 eval split, writing
train.jsonl / eval.jsonl / the report / the length plot. The input is generated
first, from a seeded RNG, into a temporary folder: instruction records of English-like text, ~50-400
tokens each, ~40% with an `input`, and ~1% defects (invalid JSON lines -- or, in CSV, rows with an
extra cell --, empty outputs and exact duplicates). Generation is not timed.

Run (from the repository root, offline; the tokenizer is tests/assets/mistral-tokenizer):

    python bench/prepare_throughput.py [--records 100000] [--format jsonl|csv|both] [--profile FILE]

`--format both` runs each format in its own child process, so each peak RSS is that run's alone.
`--profile FILE` also writes cProfile stats of the `prepare` call (read them with `python -m pstats FILE`)
and prints the top functions; the profiled time is slower than the unprofiled one.
`seconds` is wall clock; on a shared machine compare `cpu_s` too (it moves much less with other load).
Prints numbers only; nothing here asserts on time (the issue's target: 100,000 records in < 60 s).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "assets" / "mistral-tokenizer"

WORDS = (
    "the of and to in is that it for was on are as with his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see him "
    "two has look more day could go come did number sound no most people my over know water than call "
    "first who may down side been now find any new work part take get place made live where after back "
    "little only round man year came show every good me give our under name very through just form "
    "sentence great think say help low line differ turn cause much mean before move right boy old too "
    "same tell does set three want air well also play small end put home read hand port large spell add "
    "even land here must big high such follow act why ask men change went light kind off need house "
    "picture try us again animal point mother world near build self earth father head stand own page "
    "should country found answer school grow study still learn plant cover food sun four between state "
    "keep eye never last let thought city tree cross farm hard start might story saw far sea draw left "
    "late run while press close night real life few north open seem together next white children begin "
    "got walk example ease paper group always music those both mark often letter until mile river car "
    "feet care second book carry took science eat room friend began idea fish mountain stop once base "
    "hear horse cut sure watch color face wood main enough plain girl usual young ready above ever red "
    "list though feel talk bird soon body dog family direct pose leave song measure door product black "
    "short numeral class wind question happen complete ship area half rock order fire south problem "
    "piece told knew pass since top whole king space heard best hour better true during hundred five "
    "remember step early hold west ground interest reach fast verb sing listen six table travel less "
    "morning ten simple several vowel toward war lay against pattern slow center love person money "
    "serve appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall "
    "lead cry dark machine note wait plan figure star box noun field rest correct able pound done beauty "
    "drive stood contain front teach week final gave green oh quick develop ocean warm free minute "
    "strong special mind behind clear tail produce fact street inch multiply nothing course stay wheel "
    "full force blue object decide surface deep moon island foot system busy test record boat common "
    "gold possible plane stead dry wonder laugh thousand ago ran check game shape equate hot miss "
    "brought heat snow tire bring yes distant fill east paint language among model training dataset "
    "function variable network gradient token parameter memory optimizer batch loss accuracy python"
).split()
VERBS = (
    "Explain",
    "Summarize",
    "Describe",
    "List",
    "Write",
    "Translate",
    "Compare",
    "Classify",
    "Rewrite",
    "Give",
    "Suggest",
    "Outline",
    "Define",
    "Analyze",
    "Draft",
)
HEADER = ("instruction", "input", "output")


def _sentence(rng: random.Random, n: int) -> str:
    words = rng.choices(WORDS, k=n)
    if n > 6 and rng.random() < 0.5:  # a comma somewhere in the middle
        words[rng.randrange(2, n - 2)] += ","
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice(".....?!")


def _text(rng: random.Random, words: int) -> str:
    parts, left = [], words
    while left > 0:
        n = min(left, max(3, int(rng.gauss(14, 6))))
        parts.append(_sentence(rng, n))
        left -= n
    sep = "\n\n" if words > 120 and rng.random() < 0.3 else " "
    return sep.join(parts)


def _record(rng: random.Random) -> dict[str, str]:
    # Total ~35-300 words => ~50-400 tokens with the [INST] template (about 1.3 tokens a word).
    total = int(min(300, max(35, rng.lognormvariate(4.7, 0.55))))
    instr = max(5, min(40, int(total * rng.uniform(0.08, 0.2))))
    inp = int(total * rng.uniform(0.15, 0.45)) if rng.random() < 0.4 else 0
    out = max(10, total - instr - inp)
    return {
        "instruction": f"{rng.choice(VERBS)} {_text(rng, instr - 1).lower()}",
        "input": _text(rng, inp) if inp else "",
        "output": _text(rng, out),
    }


def generate(path: Path, n: int, fmt: str, seed: int = 1234) -> dict[str, int]:
    """Write n records (defects included) to `path`, streaming; returns what was planted."""
    rng = random.Random(seed)
    planted = {"malformed": 0, "empty_output": 0, "duplicate": 0}
    recent: list[dict[str, str]] = []
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f) if fmt == "csv" else None
        if writer:
            writer.writerow(HEADER)
        for _ in range(n):
            roll = rng.random()
            if roll < 0.004:
                planted["malformed"] += 1
                rec = _record(rng)
                if writer:  # one cell too many: an unquoted comma gone wrong
                    writer.writerow([rec["instruction"], rec["input"], rec["output"], "stray"])
                else:  # a truncated line: invalid JSON
                    line = json.dumps(rec, ensure_ascii=False)
                    f.write(line[: rng.randrange(10, len(line) - 2)] + "\n")
                continue
            if roll < 0.007:
                planted["empty_output"] += 1
                rec = {**_record(rng), "output": rng.choice(("", "   "))}
            elif roll < 0.010 and recent:
                planted["duplicate"] += 1
                rec = rng.choice(recent)
            else:
                rec = _record(rng)
                if len(recent) < 5000:
                    recent.append(rec)
                else:
                    recent[rng.randrange(5000)] = rec
            if writer:
                writer.writerow([rec[k] for k in HEADER])
            else:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return planted


def _peak_rss_mib() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)


def _cpu_s() -> float:
    """User + system CPU seconds of this process, all threads (the tokenizer encodes batches in parallel)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_one(n: int, fmt: str, profile: str | None) -> dict[str, object]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from qlora_llm.config import load_config
    from qlora_llm.data import prepare

    cfg = load_config(None, [f"model.name={TOKENIZER}"])
    with tempfile.TemporaryDirectory(prefix="prepare-bench-") as tmp:
        src = Path(tmp) / f"raw.{fmt}"
        t0 = time.perf_counter()
        planted = generate(src, n, fmt)
        gen_s = time.perf_counter() - t0
        rss_before = _peak_rss_mib()
        prof = None
        if profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        t0, cpu0 = time.perf_counter(), _cpu_s()
        report = prepare(cfg, [src], Path(tmp) / "out", eval_fraction=0.1)
        secs, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
        if prof is not None:
            prof.disable()
            prof.dump_stats(profile)
        row = {
            "format": fmt,
            "records": n,
            "MB": src.stat().st_size / 1e6,
            "gen_s": gen_s,
            "seconds": secs,
            "rec_per_s": n / secs,
            "cpu_s": cpu,
            "train": report.train_written,
            "eval": report.eval_written,
            "invalid": report.invalid,
            "duplicates": report.duplicates,
            "overlength": report.overlength_dropped,
            "leaks": report.eval_leaks_removed,
            "tok_min": report.token_lengths.get("min", 0),
            "tok_p50": report.token_lengths.get("p50", 0),
            "tok_max": report.token_lengths.get("max", 0),
            "rss_before_MiB": rss_before,
            "peak_rss_MiB": _peak_rss_mib(),
            "planted": planted,
        }
    if profile:
        import pstats

        print(
            f"--- cProfile of prepare ({fmt}), top 25 by cumulative time; stats in {profile}", file=sys.stderr
        )
        pstats.Stats(profile, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
    return row


COLS = (
    ("format", "{:<6}"),
    ("records", "{:>8}"),
    ("MB", "{:>6.1f}"),
    ("seconds", "{:>8.2f}"),
    ("rec_per_s", "{:>9.0f}"),
    ("cpu_s", "{:>6.1f}"),
    ("train", "{:>7}"),
    ("eval", "{:>6}"),
    ("invalid", "{:>7}"),
    ("duplicates", "{:>10}"),
    ("overlength", "{:>10}"),
    ("leaks", "{:>5}"),
    ("tok_min", "{:>7}"),
    ("tok_p50", "{:>7}"),
    ("tok_max", "{:>7}"),
    ("peak_rss_MiB", "{:>12.0f}"),
)


def print_table(rows: list[dict[str, object]]) -> None:
    print("  ".join(f"{name:>{len(fmt.format(rows[0][name]))}}" for name, fmt in COLS))
    for row in rows:
        print("  ".join(fmt.format(row[name]) for name, fmt in COLS))
    for row in rows:
        print(
            f"[{row['format']}] planted {row['planted']}; generation {row['gen_s']:.1f} s (not timed); "
            f"RSS before prepare {row['rss_before_MiB']:.0f} MiB"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--format", choices=("jsonl", "csv", "both"), default="jsonl")
    ap.add_argument("--profile", metavar="FILE", help="write cProfile stats of prepare() to FILE")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # child mode for --format both
    args = ap.parse_args(argv)
    if args.format == "both":
        rows = []
        for fmt in ("jsonl", "csv"):
            cmd = [sys.executable, __file__, "--records", str(args.records), "--format", fmt, "--json"]
            if args.profile:
                cmd += ["--profile", f"{args.profile}.{fmt}"]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
        print_table(rows)
        return
    row = run_one(args.records, args.format, args.profile)
    if args.json:
        print(json.dumps(row))
    else:
        print_table([row])


if __name__ == "__main__":
    main()
