"""The two CPU paths of a 4-bit model, side by side: perplexity, evaluation speed, generation speed.

    python bench/cpu_4bit_paths.py [--examples 20] [--new-tokens 64] [--runs 3] [--compute-dtype bfloat16]

Loads the bundled SmolLM2-135M-Instruct four ways: full precision (the reference), NF4 with the
plain kernel (dequantize, then a matmul in the compute dtype, fp32 by default) and, where the CPU has
AVX512-BF16, NF4 with bitsandbytes' fused bf16 kernel for every call (`model.cpu_4bit_kernel=fused`)
and with `auto` (fused for decode-sized calls, larger ones by the probe; src/qlora_llm/cpu4bit.py). For each it
prints the answer and full-text perplexity of the first ACLSum test examples (model's own template),
the scoring speed (tokens/s of the perplexity pass, batch 4), greedy generation speed (one prompt,
batch 1, after a warm-up) and how many of the first 32 greedy tokens match the fp32 model's and the
NF4-plain model's on four prompts. Numbers, never asserted; every variant runs in this one process, one after the other.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from qlora_llm.config import ModelConfig
from qlora_llm.cpu4bit import fused_kernel_available
from qlora_llm.evaluate import score_tokens, speed_benchmark, tokenize_for_scoring
from qlora_llm.generate import generate_greedy
from qlora_llm.model import load_target
from qlora_llm.templates import render

ROOT = Path(__file__).resolve().parents[1]


def agreement(ids: list[list[int]], reference: list[list[int]]) -> list[int]:
    """Per prompt, the length of the common prefix of two greedy answers (in tokens)."""
    return [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        for a, b in zip(ids, reference, strict=True)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    lines = (ROOT / "data" / "aclsum" / "test.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines[: args.examples]]
    variants = [("full precision", "none", "plain"), ("NF4, plain kernel", "nf4", "plain")]
    if fused_kernel_available():
        variants.append(("NF4, fused AVX512-BF16 kernel", "nf4", "fused"))
        variants.append(("NF4, auto (per call)", "nf4", "auto"))
    else:
        print("this CPU has no AVX512-BF16: the fused kernel cannot run here")
    rows: list[dict] = []
    ids_by_variant: dict[str, list[list[int]]] = {}
    for label, quantization, kernel in variants:
        mcfg = ModelConfig(
            name="smollm2-135m-instruct",
            template="auto",
            device="cpu",
            compute_dtype=args.compute_dtype,
            cpu_4bit_kernel=kernel,
        )
        loaded = load_target("smollm2-135m-instruct", model_cfg=mcfg, device="cpu", quantization=quantization)
        scoring = tokenize_for_scoring(records, loaded.tokenizer, "auto")
        start = time.perf_counter()
        ppl = score_tokens(loaded.model, scoring, batch_size=4).perplexity()
        seconds = time.perf_counter() - start
        tok = loaded.tokenizer
        prompts = [tok(render(r, "auto", tok).prompt)["input_ids"] for r in records[:4]]
        answers = [a["text"] for a in generate_greedy(loaded, prompts, max_new_tokens=32, batch_size=1)]
        ids = [loaded.tokenizer(a)["input_ids"][:32] for a in answers]
        speed = speed_benchmark(loaded, prompts[0], max_new_tokens=args.new_tokens, runs=args.runs)
        ids_by_variant[label] = ids
        row = {
            "variant": label,
            "answer_ppl": ppl["perplexity_completion"],
            "full_ppl": ppl["perplexity_full"],
            "scoring_tokens_per_s": ppl["tokens_full"] / seconds,
            "generate_tokens_per_s": speed["tokens_per_s"]["p50"],
            "greedy_tokens_equal_to_fp32": agreement(ids, ids_by_variant[variants[0][0]]),
            "greedy_tokens_equal_to_nf4_plain": agreement(ids, ids_by_variant.get(variants[1][0], ids)),
        }
        rows.append(row)
        del loaded
    print(
        f"SmolLM2-135M-Instruct, {len(records)} ACLSum test examples, {args.new_tokens} new tokens, compute {args.compute_dtype}"
    )
    print(
        "greedy: per prompt, how many of the first 32 answer tokens equal the full-precision | the NF4-plain model's"
    )
    print(f"{'variant':31} {'answer ppl':>10} {'full ppl':>9} {'score tok/s':>11} {'gen tok/s':>9}  greedy")
    for r in rows:
        print(
            f"{r['variant']:31} {r['answer_ppl']:10.3f} {r['full_ppl']:9.3f} {r['scoring_tokens_per_s']:11.0f} "
            f"{r['generate_tokens_per_s']:9.2f}  {r['greedy_tokens_equal_to_fp32']} | "
            f"{r['greedy_tokens_equal_to_nf4_plain']}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
