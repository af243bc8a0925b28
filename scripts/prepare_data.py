"""The seed's data entry point, kept: `python scripts/prepare_data.py INPUT [INPUT ...] [options]`.

The same code as `qlora-llm prepare` (every option of it works here); the output folder defaults to
`data/`, where the seed's layout keeps `data/train.jsonl`.

    python scripts/prepare_data.py raw.csv --map instruction=question --map output=answer
    python scripts/prepare_data.py data/aclsum/train.jsonl --model smollm2-135m-instruct --output-dir data/mine
"""

from __future__ import annotations

import sys

from qlora_llm.cli import main as qlora_llm


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" not in args and "--help" not in args and not any(a.startswith("--output-dir") for a in args):
        args += ["--output-dir", "data"]
    return qlora_llm(["prepare", *args])


if __name__ == "__main__":
    sys.exit(main())
