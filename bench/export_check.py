"""The export check's figures for a run, per GGUF format: what `VERIFY_LIMITS` in export.py is set from.

    python bench/export_check.py RUN [--formats f16,q8_0,q4_k_m,lora] [--cache-dir DIR]

Exports RUN (a copy: RUN itself is not touched) to each format into a temporary folder with
`qlora-llm export`'s own code, and prints, per format, the teacher-forced comparison of llama.cpp's
logits with transformers' on the same tokens (the 4 benchmark prompts, each with transformers' greedy
answer; only the answers' positions) next to the free-running greedy agreement. An export whose check
fails is printed with its error: the figures are what the limits must allow on this CPU.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

from qlora_llm.config import load_config
from qlora_llm.export import ExportError, export


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path)
    parser.add_argument("--formats", default="f16,q8_0,q4_k_m,lora")
    parser.add_argument(
        "--cache-dir", type=Path, help="model.cache_dir (where llama.cpp is built); the run's own by default"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides = [f"model.cache_dir={args.cache_dir}"] if args.cache_dir else []
    with tempfile.TemporaryDirectory(prefix="export-check-") as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(args.run, run, ignore=shutil.ignore_patterns("checkpoint-*", "eval", "export-*"))
        cfg = load_config(run / "config.yaml", overrides)
        print(
            "format | s | decisive agreement (positions) | all | near-tie flips | mean KL | max KL | max |dlogp| | greedy agreeing tokens"
        )
        for name in args.formats.split(","):
            lora = name == "lora"
            start = time.perf_counter()
            try:
                result = export(
                    run,
                    "gguf",
                    quant="f16" if lora else name,
                    adapter_only=lora,
                    out_dir=Path(tmp) / name,
                    model_cfg=cfg.model,
                    device="cpu",
                )
            except ExportError as err:
                print(f"{name} | refused: {err}")
                continue
            f, g = result.verification["teacher_forced"], result.verification["greedy"]
            print(
                f"{name} | {time.perf_counter() - start:.0f} | {f['decisive_agreement']:.1%} ({f['decisive']} of "
                f"{f['positions']}) | {f['top1_agreement']:.1%} | {f['near_tie_flips']} | {f['mean_kl']:.2g} | "
                f"{f['max_kl']:.2g} | {f['max_abs_logprob_diff']:.2g} | {g['agree_on_first']} of {g['answer_tokens']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
