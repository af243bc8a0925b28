"""The seed's training entry point, kept: `python scripts/train.py [--config CONFIG] [key=value ...]`.

The same code as `qlora-llm train`. Without --config it trains the seed's setup
(configs/mistral-7b-8gb.yaml: Mistral-7B-Instruct-v0.2 in NF4 on `data/train.jsonl`, into
`models/qlora-model/`), which needs a GPU and the model from the Hugging Face Hub; on a CPU use
`--config configs/smollm2-cpu.yaml`.

    python scripts/train.py --config configs/smollm2-cpu.yaml train.max_steps=10
    python scripts/train.py --resume auto
"""

from __future__ import annotations

import argparse
import sys

from qlora_llm.cli import main as qlora_llm

SEED_CONFIG = "configs/mistral-7b-8gb.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=SEED_CONFIG, help=f"YAML config (default {SEED_CONFIG})")
    parser.add_argument("--resume", metavar="auto|CHECKPOINT", help="continue from a checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    resume = ["--resume", args.resume] if args.resume else []
    return qlora_llm(["train", args.config, *args.overrides, *resume])


if __name__ == "__main__":
    sys.exit(main())
