"""The seed's evaluation entry point, kept: `python scripts/evaluate.py [--model TARGET] [options]`.

The same code as `qlora-llm evaluate`: perplexity, ROUGE, stop rate, benchmark prompts, speed and
memory of TARGET and of the base it was trained from. Without --model it evaluates
runs/smollm2-aclsum, the run `make demo` trains.

    python scripts/evaluate.py
    python scripts/evaluate.py --model models/qlora-model --data data/test.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qlora_llm.cli import main as qlora_llm

DEFAULT_MODEL = "runs/smollm2-aclsum"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help=f"run, adapter or merged folder (default {DEFAULT_MODEL})")
    parser.add_argument("--data", help="JSONL to evaluate on (default: the run's test or held-out data)")
    parser.add_argument("--compare", help="base to compare with: auto (default), none, or a model")
    parser.add_argument("--output-dir", help="where the report goes (default <run>/eval)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.model is None:
        if not Path(DEFAULT_MODEL).exists():
            parser.error(f"no --model given and {DEFAULT_MODEL} is not here: run `make demo` or pass --model")
        args.model = DEFAULT_MODEL
    extra = [
        f"--{k.replace('_', '-')}={v}" for k in ("data", "compare", "output_dir") if (v := getattr(args, k))
    ]
    return qlora_llm(["evaluate", args.model, *extra, *args.overrides])


if __name__ == "__main__":
    sys.exit(main())
