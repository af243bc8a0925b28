"""How many questions the generative general task needs: base vs fine-tuned at a given subset size.

    python bench/generative_size.py --questions 256 RUN [RUN ...] [--task basic_skills_common_knowledge]

Answers the task's fixed seeded subset of QUESTIONS (eval.general_seed's subset, as `qlora-llm evaluate
RUN eval.general_generative_limit=QUESTIONS` draws it) greedily through the chat template with the base
model and with each run's fine-tuned model (merged in memory at the run's own model.adapter_scale), exactly
as `evaluate` does, and prints each run's accuracy, its paired difference from the base with the 95%
bootstrap interval, and the seconds each model took. Only the generative task: a size study over several
runs in minutes instead of a whole evaluation each. Numbers, never asserted (docs/demo.md's sizes).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from qlora_llm.benchmarks import compare, generative_items, generative_prompt, score_generative
from qlora_llm.config import load_config
from qlora_llm.generate import generate_greedy
from qlora_llm.model import find_target, load_target


def answer(target: str | Path, cfg, items: list[dict]) -> tuple[dict, float]:
    start = time.perf_counter()
    loaded = load_target(find_target(target, cfg.model), device=cfg.model.device, merge=True)
    prompts = [generative_prompt(it, loaded.template, loaded.tokenizer) for it in items]
    ids = [loaded.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    e = cfg.eval
    answers = generate_greedy(
        loaded, ids, max_new_tokens=e.general_max_new_tokens, batch_size=e.general_answers_batch_size
    )
    return score_generative(items, [a["text"] for a in answers]), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders trained from the same base")
    ap.add_argument("--questions", type=int, required=True)
    ap.add_argument("--task", default="basic_skills_common_knowledge")
    args = ap.parse_args()
    cfg = load_config(args.runs[0] / "config.yaml")
    items = generative_items(args.task, args.questions, cfg.eval.general_seed)
    base, seconds = answer(cfg.model.name, cfg, items)
    print(f"{args.task}, {len(items)} questions; base {100 * base['acc']:.1f}% ({seconds:.0f} s)")
    for run in args.runs:
        tuned, seconds = answer(run, cfg, items)
        ci = compare({args.task: base}, {args.task: tuned}, seed=cfg.eval.general_seed)[0]  # evaluate's own
        print(
            f"{run}: {100 * tuned['acc']:.1f}% ({seconds:.0f} s), {100 * ci['diff']:+.1f} points "
            f"(95% CI {100 * ci['lo']:+.1f} to {100 * ci['hi']:+.1f})"
        )


if __name__ == "__main__":
    main()
