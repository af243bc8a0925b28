"""The seed's inference entry point, kept: `python scripts/inference.py --mode chat|single|api`.

It calls the same code as `qlora-llm chat`, `qlora-llm generate` and `qlora-llm serve`. Without
--model it uses runs/smollm2-aclsum, the run `make demo` trains, and says so if that is missing.

    python scripts/inference.py --mode single --prompt "What is QLoRA?"
    python scripts/inference.py --mode chat --model runs/smollm2-aclsum/merged
    python scripts/inference.py --mode api --port 8000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qlora_llm.cli import main as qlora_llm

DEFAULT_MODEL = "runs/smollm2-aclsum"  # what `make demo` trains (run folder: adapter applied on the fly)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["chat", "single", "api"], required=True)
    parser.add_argument(
        "--model", help=f"run, adapter or merged folder, or a model name (default {DEFAULT_MODEL})"
    )
    parser.add_argument("--prompt", help="the prompt for --mode single; - reads it from stdin")
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float, help="0 is greedy; default 0.7")
    parser.add_argument("--top_p", "--top-p", type=float, help="default 0.9")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--api_key", "--api-key", help="for --mode api (or set QLORA_LLM_API_KEY)")
    args = parser.parse_args(argv)
    if args.mode == "single" and not args.prompt:
        parser.error("--mode single needs --prompt")
    if args.model is None:
        if not Path(DEFAULT_MODEL).exists():
            parser.error(f"no --model given and {DEFAULT_MODEL} is not here: run `make demo` or pass --model")
        args.model = DEFAULT_MODEL

    sampling = [
        f"--{flag.replace('_', '-')}={value}"
        for flag in ("max_new_tokens", "temperature", "top_p", "seed")
        if (value := getattr(args, flag)) is not None
    ]
    if args.mode == "single":
        # "--": a prompt that starts with a dash is still the prompt, not a flag.
        return qlora_llm(["generate", args.model, *sampling, "--", args.prompt])
    if args.mode == "chat":
        return qlora_llm(["chat", args.model, *sampling])
    network = [f"--host={args.host}"] if args.host else []
    network += [f"--port={args.port}"] if args.port else []
    network += [f"--api-key={args.api_key}"] if args.api_key else []
    return qlora_llm(["serve", args.model, *network])


if __name__ == "__main__":
    sys.exit(main())
