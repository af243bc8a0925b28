"""The per-seed table the seed benchmarks print: base, each seed, and min / median / max over seeds."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("qlora-llm")


def print_seed_table(title: str, base_label: str, tables: dict[int, dict], metrics: list[tuple]) -> None:
    """`tables`: seed -> {metric: table row with "base" and "tuned"}; `metrics`: (key, label, scale, fmt)."""
    seeds = list(tables)
    first = tables[seeds[0]]
    print(
        f"\n{title:22} {base_label:>7} "
        + " ".join(f"{'seed ' + str(s):>9}" for s in seeds)
        + "   min / median / max"
    )
    for key, label, scale, fmt in metrics:
        tuned = [tables[s][key]["tuned"] * scale for s in seeds]
        cells = " ".join(f"{fmt.format(v):>9}" for v in tuned)
        spread = " / ".join(fmt.format(f(tuned)) for f in (min, statistics.median, max))
        print(f"{label:22} {fmt.format(first[key]['base'] * scale):>7} {cells}   {spread}")
