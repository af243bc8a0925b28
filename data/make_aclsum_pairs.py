"""Build ACLSum preference pairs in data/aclsum-pairs/: the human summary chosen, the base model's rejected.

What it is
----------
Self-play preference data (the recipe of SPIN: Chen et al. 2024, "Self-Play Fine-Tuning Converts Weak
Language Models to Strong Language Models"): for papers no other split uses, the human-written summary
is "chosen" and the built-in base model's own greedy answer to the same prompt is "rejected". DPO on it
teaches the model to prefer the human answer over what it would have said.

How to run (from the repository root, with the project virtualenv)::

    python data/make_aclsum_pairs.py              # reuses base_answers.jsonl when it is there
    python data/make_aclsum_pairs.py --regenerate # generates the base answers again (~5 min, 2 cores)

Papers
------
The ACLSum test papers that data/aclsum/test.jsonl does not use (it takes every second one; these are
the others: 50 papers), every aspect each (challenge, approach, outcome): 150 records, sorted by paper id.
The first 40 papers make train.jsonl (120 pairs), the last 10 eval.jsonl (30 pairs): no paper is in two
splits, and none is in data/aclsum/ (train, eval or test), so the SFT demo never saw them.

The base answers
----------------
Generated once by SmolLM2-135M-Instruct (the built-in model, no adapter) greedily, up to MAX_NEW_TOKENS
tokens, prompted exactly as the SFT demo prompts (its own chat template, the record's instruction and
input as one user turn), and kept in base_answers.jsonl with the settings, so the pairs are data: the
same bytes on every machine, whatever its float rounding. A pair whose answers are the same is skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_aclsum as aclsum  # noqa: E402 - the sibling script: one source of papers and prompts

MODEL = "smollm2-135m-instruct"
MAX_NEW_TOKENS = 96
TRAIN_PAPERS = 40
DEFAULT_OUT = aclsum.REPO_ROOT / "data" / "aclsum-pairs"


def held_out_papers(dataset_dir: Path) -> list[dict]:
    """The test papers data/aclsum/test.jsonl leaves out (it takes papers[::step])."""
    papers = aclsum.load_split(dataset_dir, "test")
    step = max(1, len(papers) // aclsum.N_TEST)
    return [p for j, p in enumerate(papers) if j % step != 0]


def prompt_of(rec: dict) -> str:
    # The SFT records' one user turn (templates.to_messages): instruction, blank line, input.
    return f"{rec['instruction']}\n\n{rec['input']}"


def generate_base_answers(prompts: list[str]) -> list[dict]:
    from qlora_llm.evaluate import generate_greedy
    from qlora_llm.model import load_target
    from qlora_llm.templates import render_prompt

    loaded = load_target(MODEL, device="cpu")
    ids = [
        loaded.tokenizer(
            render_prompt([{"role": "user", "content": p}], loaded.template, loaded.tokenizer),
            add_special_tokens=True,
        )["input_ids"]
        for p in prompts
    ]
    answers = generate_greedy(
        loaded, ids, max_new_tokens=MAX_NEW_TOKENS, batch_size=8, desc="base answers", progress=True
    )
    return [{"text": a["text"].strip(), "finish_reason": a["finish_reason"]} for a in answers]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--aclsum-dir", type=Path, default=None, help="the package's dataset/ folder")
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--regenerate", action="store_true", help="generate the base answers again")
    args = ap.parse_args(argv)

    dataset_dir = args.aclsum_dir or aclsum.find_dataset_dir()
    papers = held_out_papers(dataset_dir)
    rows = []  # (paper index, paper id, aspect, record)
    for k, paper in enumerate(papers):
        for aspect in aclsum.ASPECTS:
            rec = aclsum.record(paper, aspect)
            if rec:
                rows.append((k, paper["id"], aspect, rec))

    answers_file = args.out_dir / "base_answers.jsonl"
    settings = {"model": MODEL, "max_new_tokens": MAX_NEW_TOKENS, "decoding": "greedy"}
    kept = [json.loads(x) for x in answers_file.read_text().splitlines()] if answers_file.is_file() else []
    wanted = [(pid, aspect) for _, pid, aspect, _ in rows]
    if args.regenerate or [(a["id"], a["aspect"]) for a in kept] != wanted:
        generated = generate_base_answers([prompt_of(rec) for *_, rec in rows])
        kept = [
            {"id": pid, "aspect": aspect, **settings, **answer}
            for (_, pid, aspect, _), answer in zip(rows, generated, strict=True)
        ]
        aclsum.write_jsonl(answers_file, kept)

    splits: dict[str, list[dict]] = {"train": [], "eval": []}
    skipped = 0
    for (k, _, _, rec), answer in zip(rows, kept, strict=True):
        if not answer["text"] or answer["text"] == rec["output"]:
            skipped += 1
            continue
        pair = {"prompt": prompt_of(rec), "chosen": rec["output"], "rejected": answer["text"]}
        splits["train" if k < TRAIN_PAPERS else "eval"].append(pair)
    for name, pairs in splits.items():
        aclsum.write_jsonl(args.out_dir / f"{name}.jsonl", pairs)

    print(f"source: {dataset_dir}; {len(papers)} held-out test papers; base answers: {answers_file}")
    cut = sum(a["finish_reason"] == "length" for a in kept)
    print(f"base answers: {len(kept)} ({cut} cut at {MAX_NEW_TOKENS} tokens); pairs skipped: {skipped}")
    for name, pairs in splits.items():
        print(f"{name}: {len(pairs)} pairs -> {args.out_dir / (name + '.jsonl')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
