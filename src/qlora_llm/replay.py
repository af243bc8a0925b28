"""Self-replay: the base model's own answers to general prompts, mixed into training.

Fine-tuning on one task pulls the model's answers toward that task; mixing in a fraction of examples the
base model answered itself keeps some of its general behaviour (rehearsal) without any external data: the
targets are what the model already does. The answers are generated once (greedy, full precision, the
run's template) and cached under `model.cache_dir/replay/`, named by the fingerprint of what made them
(the base model's identity, the prompts file, the template, the answer length), so every run with the
same base and prompts reuses them; the run's manifest records the file and its SHA-256 like any data.

    data.replay_fraction: 0.25     # 1 replay example per 4 task examples
    data.replay_prompts: configs/replay_prompts.jsonl   # {"prompt": ...} per line (the default)
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

from qlora_llm.atomic import atomic_write_text
from qlora_llm.config import Config
from qlora_llm.errors import QloraError

log = logging.getLogger(__name__)

SOURCE = "replay"
# The prompts are short and the answers at most data.replay_max_new_tokens, so 64 rows keep a small KV
# cache; the 48 default prompts answered in 21 s at one batch and 87 s at 4 a batch (the same text, 2 cores).
BATCH_SIZE = 64


class ReplayError(QloraError):
    """The replay prompts cannot be read; the message names the file and line."""


def read_prompts(path: Path) -> list[str]:
    """`{"prompt": "..."}` per line (blank lines skipped); a bad line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise ReplayError(f'data.replay_prompts={path}: file not found (one {{"prompt": ...}} per line).')
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (ValueError, KeyError, TypeError):
            raise ReplayError(f'{path}, line {number}: expected {{"prompt": "..."}}') from None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ReplayError(f"{path}, line {number}: 'prompt' must be a non-empty string")
        prompts.append(prompt)
    if not prompts:
        raise ReplayError(f"{path}: no prompts")
    return prompts


def _cache_file(cfg: Config, base_identity: dict[str, Any], prompts_sha: str) -> Path:
    key = {
        "base": base_identity,
        "prompts_sha256": prompts_sha,
        "template": cfg.model.template,
        "max_new_tokens": cfg.data.replay_max_new_tokens,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.model.cache_dir).expanduser() / "replay" / f"{digest}.jsonl"


def base_answers(cfg: Config, base_identity: dict[str, Any]) -> Path:
    """The cached file of the base model's answers to the replay prompts; generated on first use."""
    from qlora_llm.fingerprint import sha256_file

    prompts_file = Path(cfg.data.replay_prompts)
    prompts = read_prompts(prompts_file)
    cache = _cache_file(cfg, base_identity, sha256_file(prompts_file))
    if cache.is_file():
        log.info("self-replay: the base model's answers from %s", cache)
        return cache
    import gc

    from qlora_llm.allocator import release_free_memory
    from qlora_llm.generate import generate_greedy
    from qlora_llm.model import load_target
    from qlora_llm.templates import render_prompt

    log.info(
        "self-replay: the base model answers %d general prompts once (cached in %s)", len(prompts), cache
    )
    loaded = load_target(cfg.model.name, model_cfg=cfg.model, device=cfg.model.device, adapter=False)
    ids = [
        loaded.tokenizer(
            render_prompt([{"role": "user", "content": p}], cfg.model.template, loaded.tokenizer),
            add_special_tokens=True,
        )["input_ids"]
        for p in prompts
    ]
    answers = generate_greedy(
        loaded, ids, max_new_tokens=cfg.data.replay_max_new_tokens, batch_size=BATCH_SIZE
    )
    rows = [
        {"instruction": p, "input": "", "output": a["text"].strip(), "source": SOURCE}
        for p, a in zip(prompts, answers, strict=True)
        if a["text"].strip()  # an empty answer teaches nothing but to stop
    ]
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    # Training loads its own model next in this process: the plain one and its KV caches go back first
    # (30-step runs of the demo config peaked the same with the answers cached: docs/plan.md).
    del loaded, answers
    gc.collect()
    release_free_memory()
    return cache


def mix(records: list[dict], replay: list[dict], fraction: float, seed: int) -> list[dict]:
    """The task records plus round(fraction x their number) replay records (seeded choice, at most all)."""
    n = min(round(fraction * len(records)), len(replay))
    chosen = random.Random(seed).sample(range(len(replay)), n)
    return records + [replay[i] | {"source": SOURCE} for i in sorted(chosen)]
