"""The seed's inference entry point, kept: `python scripts/inference.py --mode chat|single|api`.

It calls the same code as `qlora-llm chat`, `qlora-llm generate` and `qlora-llm serve`.

    python scripts/inference.py --mode single --prompt "What is QLoRA?"
    python scripts/inference.py --mode chat --model runs/smollm2-aclsum/merged
    python scripts/inference.py --mode api --port 8000
"""

from __future__ import annotations

import argparse
import sys

from qlora_llm.cli import main as qlora_llm

DEFAULT_MODEL = "runs/smollm2-aclsum"  # what `make demo` trains


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["chat", "single", "api"], required=True)
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"run, adapter or merged folder (default {DEFAULT_MODEL})"
    )
    parser.add_argument("--prompt", help="the prompt for --mode single")
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    args = parser.parse_args(argv)

    sampling = [f"--max-new-tokens={args.max_new_tokens}"] if args.max_new_tokens else []
    sampling += [f"--temperature={args.temperature}"] if args.temperature is not None else []
    if args.mode == "single":
        if not args.prompt:
            parser.error("--mode single needs --prompt")
        return qlora_llm(["generate", args.model, args.prompt, *sampling])
    if args.mode == "chat":
        return qlora_llm(["chat", args.model, *sampling])
    network = [f"--host={args.host}"] if args.host else []
    network += [f"--port={args.port}"] if args.port else []
    return qlora_llm(["serve", args.model, *network])


if __name__ == "__main__":
    sys.exit(main())
