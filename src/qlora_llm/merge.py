"""Merge a LoRA adapter into its base model, verified, as a standard HF safetensors folder.

The base is loaded in 16-bit on CUDA or fp32 on CPU, never 4-bit: merging LoRA deltas into quantized
weights re-quantizes them and loses the fine-tune (a known trap in other tools). Before the folder is
written, the merged model is checked against the adapter model it replaces: logits on the run's eval
examples agree within a tolerance and greedy answers to benchmark prompts are identical. The check is
saved beside the weights as `merge_verification.json`; the folder also carries the tokenizer and the
run's manifest (template, stop tokens) and config, so chat, serve and evaluate prompt it as trained.

    merge("runs/smollm2-aclsum")            # -> runs/smollm2-aclsum/merged
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_llm.atomic import atomic_dir
from qlora_llm.errors import QloraError
from qlora_llm.fingerprint import sha256_file
from qlora_llm.model import find_target, load_target

log = logging.getLogger(__name__)

VERIFY_EXAMPLES = 4
VERIFY_PROMPTS = 4
VERIFY_NEW_TOKENS = 24


class MergeError(QloraError, RuntimeError):
    """The merge cannot be made or did not verify; the message says why."""


@dataclass
class MergeResult:
    out_dir: Path
    verification: dict[str, Any]


def _verification_inputs(
    target: Any, tokenizer: Any, benchmark_prompts: Path | None
) -> tuple[list, str, list, str]:
    """Token ids of a few eval examples (whole text) and of a few benchmark prompts (generation prompts),
    each with where they came from."""
    from qlora_llm.config import load_config
    from qlora_llm.data import load_examples
    from qlora_llm.evaluate import load_benchmark_prompts, tokenize_for_scoring
    from qlora_llm.templates import render_prompt

    texts: list[list[int]] = []
    texts_from = ""
    config_file = next(
        (p / "config.yaml" for p in (target.path, target.adapter_dir) if (p / "config.yaml").is_file()), None
    )
    if config_file is not None:
        data = load_config(config_file).data
        source = data.eval_file or data.train_file
        if Path(source).is_file():
            rows = tokenize_for_scoring(
                load_examples(Path(source))[:VERIFY_EXAMPLES], tokenizer, target.template
            )
            texts, texts_from = [r["input_ids"] for r in rows], str(source)
    prompts, prompts_from = [], "built-in prompts"
    if benchmark_prompts is not None and Path(benchmark_prompts).is_file():
        prompts = [p["prompt"] for p in load_benchmark_prompts(benchmark_prompts)[:VERIFY_PROMPTS]]
        prompts_from = str(benchmark_prompts)
    prompts = prompts or ["Say hello.", "What is 2 + 2?"]
    ids = [
        tokenizer(
            render_prompt([{"role": "user", "content": p}], target.template, tokenizer),
            add_special_tokens=True,
        )["input_ids"]
        for p in prompts
    ]
    # Without the run's data (moved, or relative to another folder) the prompts are scored instead.
    return (texts, texts_from, ids, prompts_from) if texts else (ids, prompts_from, ids, prompts_from)


def _logits(model: Any, sequences: list[list[int]]) -> list[Any]:
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([s], device=device)).logits[0].float().cpu() for s in sequences]


def merge(
    target: str | Path,
    out_dir: Path | None = None,
    *,
    model_cfg: Any = None,
    device: str = "auto",
    force: bool = False,
    benchmark_prompts: Path | None = Path("configs/benchmark_prompts.json"),
    tolerance: float | None = None,
) -> MergeResult:
    """Merge TARGET's adapter into its full-precision base, verify it, write `out_dir` atomically."""
    import torch

    from qlora_llm.generate import generate_greedy

    found = find_target(target, model_cfg)
    if found.adapter_dir is None:
        raise MergeError(f"{target}: has no LoRA adapter to merge (give a run folder or an adapter folder).")
    if out_dir is None:
        out_dir = (
            found.path / "merged"
            if found.kind == "run"
            else found.path.with_name(found.path.name + "-merged")
        )
    out_dir = Path(out_dir)
    sources = [found.path, found.adapter_dir]
    if any(out_dir.resolve() in (s.resolve(), *s.resolve().parents) for s in sources):
        raise MergeError(f"--out {out_dir} would replace the adapter being merged; choose another folder.")
    if out_dir.exists() and not force:
        raise MergeError(f"{out_dir} already exists; pass --force to replace it, or --out DIR.")

    start = time.perf_counter()
    # quantization="none": the deltas go into 16/32-bit weights, never into re-quantized 4-bit ones.
    loaded = load_target(found, device=device, quantization="none")
    model, tokenizer = loaded.model, loaded.tokenizer
    if getattr(model.config, "quantization_config", None) is not None:
        # Set by a quantized load: ours with nf4/fp4, or a base saved pre-quantized (a *-bnb-4bit repo).
        raise MergeError(
            f"{found.model_cfg.name} was loaded quantized; the adapter is merged only into full-precision "
            "weights (merging into 4-bit weights re-quantizes the fine-tune away). Nothing was written."
        )
    dtype = next(model.parameters()).dtype
    tolerance = tolerance if tolerance is not None else (1e-3 if dtype == torch.float32 else 0.25)
    texts, texts_from, prompts, prompts_from = _verification_inputs(found, tokenizer, benchmark_prompts)
    before_logits = _logits(model, texts)
    before_answers = generate_greedy(loaded, prompts, max_new_tokens=VERIFY_NEW_TOKENS)

    loaded.model = model = model.merge_and_unload()
    after_logits = _logits(model, texts)
    after_answers = generate_greedy(loaded, prompts, max_new_tokens=VERIFY_NEW_TOKENS)
    max_diff = max(float((a - b).abs().max()) for a, b in zip(before_logits, after_logits, strict=True))
    same = [a["text"] == b["text"] for a, b in zip(before_answers, after_answers, strict=True)]
    verification = {
        "passed": max_diff <= tolerance and all(same),
        "dtype": str(dtype).removeprefix("torch."),
        "logits": {
            "sequences": len(texts),
            "from": texts_from,
            "max_abs_diff": max_diff,
            "tolerance": tolerance,
        },
        "greedy_answers": {
            "prompts": len(prompts),
            "from": prompts_from,
            "identical": sum(same),
            "max_new_tokens": VERIFY_NEW_TOKENS,
            "answers": [a["text"] for a in after_answers],
        },
        "adapter": str(found.adapter_dir),
        # What was merged, by content: an export reuses this folder only for the same adapter weights.
        "adapter_sha256": sha256_file(found.adapter_dir / "adapter_model.safetensors"),
        "adapter_scale": found.model_cfg.adapter_scale,  # W0 + scale x delta (model.adapter_scale)
        "base_model": found.model_cfg.name,
    }
    if not verification["passed"]:
        for a, b in zip(before_answers, after_answers, strict=True):
            if a["text"] != b["text"]:
                log.warning("greedy answers differ: adapter %r, merged %r", a["text"], b["text"])
        raise MergeError(
            f"the merged model does not match the adapter model (max logit difference {max_diff:.2e}, "
            f"tolerance {tolerance:.0e}; {sum(same)}/{len(same)} greedy answers identical); nothing was written."
        )
    with atomic_dir(out_dir, replace=force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name in ("manifest.json", "config.yaml"):
            source = next((p / name for p in (found.path, found.adapter_dir) if (p / name).is_file()), None)
            if source is not None:
                shutil.copyfile(source, tmp / name)
        (tmp / "merge_verification.json").write_text(json.dumps(verification, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        for file in tmp.iterdir():
            file.chmod(0o666 & ~umask)  # transformers writes the weights 0600; the folder is for sharing
    log.info(
        "merged %s into %s in %.0f s: max logit difference %.1e, %d/%d greedy answers identical",
        found.adapter_dir,
        out_dir,
        time.perf_counter() - start,
        max_diff,
        sum(same),
        len(same),
    )
    return MergeResult(out_dir, verification)
