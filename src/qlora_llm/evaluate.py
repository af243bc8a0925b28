"""Evaluation: did fine-tuning help, and what did it cost? Base and fine-tuned, measured the same way.

`evaluate(cfg, target)` loads TARGET (a run folder, an adapter folder, a merged model or a model name)
and, unless told otherwise, the base model it was trained from, and measures both on the same data:

- perplexity, token-weighted over the whole set, on the answer tokens and on the full text
  (texts longer than the window are scored with a strided sliding window, every token once);
- ROUGE-1/2/L/Lsum F1, precision and recall (Google's `rouge-score`, stemming on) of greedy answers
  against the references, and answer vs reference length in words (so a gain from brevity shows);
- general ability (src/qlora_llm/benchmarks.py): lm-eval likelihood benchmarks and a generative task,
  offline, on the same seeded items for both models, with paired 95% intervals, and KL(base || tuned);
- the stop rate: the share of answers that ended with EOS before `max_new_tokens`;
- the benchmark prompts of `configs/benchmark_prompts.json` (expected keywords), pass/fail each;
- speed: timed runs of a fixed length: tokens/s, time to first token, time per output token, p50/p90;
- memory: peak RSS against RAM on CPU, allocated / peak allocated against total on CUDA.

Everything lands in `<run>/eval/`: metrics.json (every number, library versions, data fingerprint),
examples.jsonl (per-example answers and scores), report.md, report.html and metrics.png.

    result = evaluate(load_config("runs/smollm2-aclsum/config.yaml"), "runs/smollm2-aclsum")
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_llm.atomic import atomic_file, atomic_write_text
from qlora_llm.benchmarks import stock_name
from qlora_llm.config import Config
from qlora_llm.errors import QloraError
from qlora_llm.fingerprint import sha256_file
from qlora_llm.generate import generate_greedy
from qlora_llm.memory import PeakMemory
from qlora_llm.model import LoadedModel, Target, find_target, load_target
from qlora_llm.plan import EVAL_LOGITS_TILE_BYTES
from qlora_llm.report import headline, write_report
from qlora_llm.templates import render, to_messages

log = logging.getLogger(__name__)

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


class EvalError(QloraError, RuntimeError):
    """Evaluation cannot run as asked; the message says what to change."""


@dataclass
class EvalResult:
    output_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Perplexity


@dataclass
class TokenScores:
    """Summed negative log-likelihood and scored-token counts per example (full text and answer only)."""

    nll_full: list[float]
    tokens_full: list[int]
    nll_completion: list[float]
    tokens_completion: list[int]

    def perplexity(self) -> dict[str, Any]:
        """exp(mean NLL) over every scored token of the set (token-weighted, not a mean per example)."""

        def ppl(nll: list[float], count: list[int]) -> float | None:
            return math.exp(sum(nll) / sum(count)) if sum(count) else None

        return {
            "perplexity_completion": ppl(self.nll_completion, self.tokens_completion),
            "perplexity_full": ppl(self.nll_full, self.tokens_full),
            "tokens_completion": sum(self.tokens_completion),
            "tokens_full": sum(self.tokens_full),
            "per_example_nll_completion": [
                nll / count if count else None
                for nll, count in zip(self.nll_completion, self.tokens_completion, strict=True)
            ],
        }


def _windows(length: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window, so that positions 1..length-1 are each scored exactly once.

    Position t is scored as the prediction of token t from tokens before it; position 0 has no context.
    Each window after the first re-reads `max_length - stride` tokens of context it does not score.
    """
    out, scored_to, begin = [], 1, 0
    while scored_to < length:
        end = min(begin + max_length, length)
        out.append((begin, end, max(scored_to, begin + 1)))
        scored_to = end
        begin += stride
    return out


def score_tokens(
    model: Any,
    rows: list[dict[str, list[int]]],
    *,
    batch_size: int = 4,
    max_length: int | None = None,
    stride: int | None = None,
    progress: bool = False,
) -> TokenScores:
    """Per-example NLL sums of `rows` ({"input_ids", "completion_mask"}), batched, padding never scored.

    One batch at a time, its LM head a tile of positions at a time (`next_token_nll`), so the set and its
    texts can be any size.
    """
    import torch
    from tqdm.auto import tqdm

    max_length = max_length or int(model.config.max_position_embeddings)
    stride = stride or max(1, max_length // 2)
    if not 0 < stride < max_length:
        raise EvalError(f"perplexity stride {stride} must be between 1 and the window {max_length} - 1")
    # One segment per window: (example index, ids, first scored position within the window, mask).
    segments = []
    for i, row in enumerate(rows):
        ids, cmask = row["input_ids"], row["completion_mask"]
        for begin, end, first in _windows(len(ids), max_length, stride):
            segments.append((i, ids[begin:end], first - begin, cmask[begin:end]))
    # Similar lengths together: less padding, same numbers.
    order = sorted(range(len(segments)), key=lambda k: len(segments[k][1]))
    n = len(rows)
    scores = TokenScores([0.0] * n, [0] * n, [0.0] * n, [0] * n)
    device = next(model.parameters()).device
    bar = tqdm(total=len(order), desc="perplexity", unit="seq", disable=not progress, leave=False)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = [segments[k] for k in order[start : start + batch_size]]
            width = max(len(s[1]) for s in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            attention = torch.zeros(len(batch), width, dtype=torch.long)
            full = torch.zeros(len(batch), width, dtype=torch.bool)
            comp = torch.zeros(len(batch), width, dtype=torch.bool)
            for b, (_, seg, first, cmask) in enumerate(batch):
                ids[b, : len(seg)] = torch.tensor(seg)
                attention[b, : len(seg)] = 1
                full[b, first : len(seg)] = True
                comp[b, first : len(seg)] = torch.tensor(cmask[first:], dtype=torch.bool)
            nll = next_token_nll(model, ids.to(device), attention.to(device)).cpu()
            full_t, comp_t = full[:, 1:], comp[:, 1:]
            for b, (i, _, _, _) in enumerate(batch):
                scores.nll_full[i] += float(nll[b][full_t[b]].double().sum())
                scores.tokens_full[i] += int(full_t[b].sum())
                scores.nll_completion[i] += float(nll[b][comp_t[b]].double().sum())
                scores.tokens_completion[i] += int(comp_t[b].sum())
            bar.update(len(batch))
    bar.close()
    return scores


def next_token_nll(model: Any, ids: Any, attention: Any) -> Any:
    """(B, T-1) fp32 NLL of each next token (position t predicts t + 1), never all (B, T, vocab) logits.

    The decoder's hidden states go through the LM head a tile of positions at a time (what TRL's fused
    loss does in training). A model whose head is more than a linear layer (logit soft-capping or
    scaling) is scored from its full logits.
    """
    import torch
    import torch.nn.functional as F

    config = model.config
    head = model.get_output_embeddings()
    plain = not getattr(config, "final_logit_softcapping", None) and getattr(config, "logit_scale", None) in (
        None,
        1.0,
    )
    targets = ids[:, 1:]
    if not plain or head is None:
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
    hidden = model.get_decoder()(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state[
        :, :-1
    ]
    tile = max(1, EVAL_LOGITS_TILE_BYTES // (8 * head.weight.shape[0]))
    nll = torch.empty(targets.shape, dtype=torch.float32, device=ids.device)
    for b in range(ids.shape[0]):
        for s in range(0, targets.shape[1], tile):
            logits = head(hidden[b, s : s + tile]).float()
            nll[b, s : s + tile] = F.cross_entropy(logits, targets[b, s : s + tile], reduction="none")
    return nll


def tokenize_for_scoring(records: list[dict], tokenizer: Any, template: str) -> list[dict[str, list[int]]]:
    """Ids and answer mask per record, exactly as training tokenized them, but nothing is dropped."""
    from qlora_llm.data import tokenize_examples

    rows, dropped = tokenize_examples(records, tokenizer, template, max_length=10**9)
    assert dropped == 0
    return rows


# --------------------------------------------------------------------------------------------------
# ROUGE


def _sentences(text: str) -> str:
    # ROUGE-Lsum reads sentences from newlines; nltk's punkt would need a download, a regex does not.
    return "\n".join(s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s)


def _mostly_non_ascii(text: str) -> bool:
    letters = [c for c in text if c.isalnum()]
    return sum(ord(c) > 127 for c in letters) > len(letters) / 2


def _words(text: str) -> int:
    return len(text.split())


def compute_rouge(predictions: list[str], references: list[str]) -> dict[str, Any]:
    """Mean ROUGE-1/2/L/Lsum F1, precision and recall over the pairs, plus every pair's scores, and the
    mean answer and reference lengths in words (F1 rewards matching the reference's length: precision,
    recall and the lengths show a gain from brevity as such). Deterministic: no bootstrap."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise EvalError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    per_example = []
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(_sentences(ref), _sentences(pred))
        per_example.append(
            {k: scores[k].fmeasure for k in ROUGE_KEYS}
            | {f"{k}_precision": scores[k].precision for k in ROUGE_KEYS}
            | {f"{k}_recall": scores[k].recall for k in ROUGE_KEYS}
            | {"answer_words": _words(pred), "reference_words": _words(ref)}
        )
    # rouge-score keeps only [a-z0-9] tokens: text in other scripts scores as empty.
    non_ascii = sum(1 for text in [*predictions, *references] if _mostly_non_ascii(text))
    means = {
        k: (sum(e[k] for e in per_example) / len(per_example) if per_example else None)
        for k in (per_example[0] if per_example else ROUGE_KEYS)
    }
    return {**means, "per_example": per_example, "texts_mostly_non_ascii": non_ascii}


# --------------------------------------------------------------------------------------------------
# Generation, speed, benchmark prompts, memory


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def speed_benchmark(
    loaded: LoadedModel, prompt_ids: list[int], *, max_new_tokens: int, runs: int = 3, warmup: int = 1
) -> dict[str, Any]:
    """Greedy generation of one prompt: `warmup` untimed runs, then `runs` timed ones.

    Every run generates exactly `max_new_tokens` (stop tokens suppressed): the same work for every model,
    so a fine-tune that answers shorter is not timed as slower (its prefill weighed on fewer tokens: the
    demo's merged model, the base's exact shapes, read 23.1 -> 20.0 tokens/s with EOS honoured). Tokens
    are the generated ids; on CUDA every timestamp follows a synchronize.
    """
    from qlora_llm.generate import Generator, SamplingParams

    gen = Generator(loaded)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    for _ in range(warmup):
        gen.generate(list(prompt_ids), params)
    timed = [gen.generate(list(prompt_ids), params) for _ in range(runs)]
    tps = [c.completion_tokens / c.total_s for c in timed]
    ttft = [c.time_to_first_token_s for c in timed if c.time_to_first_token_s is not None]
    tpot = [
        (c.total_s - c.time_to_first_token_s) / (c.completion_tokens - 1)
        for c in timed
        if c.time_to_first_token_s is not None and c.completion_tokens > 1
    ]

    def summary(values: list[float]) -> dict[str, float | None]:
        if not values:
            return {"mean": None, "p50": None, "p90": None}
        return {
            "mean": statistics.fmean(values),
            "p50": _percentile(values, 0.5),
            "p90": _percentile(values, 0.9),
        }

    return {
        "runs": runs,
        "warmup": warmup,
        "prompt_tokens": len(prompt_ids),
        "generated_tokens": [c.completion_tokens for c in timed],
        "tokens_per_s": summary(tps),
        "time_to_first_token_s": summary(ttft),
        "time_per_output_token_s": summary(tpot),
    }


def load_benchmark_prompts(path: Path) -> list[dict[str, Any]]:
    """The prompts of a benchmark file, checked: each needs `prompt` and a non-empty `keywords` list."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: benchmark prompts not found. Set eval.benchmark_prompts=FILE.")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EvalError(f"{path}:{err.lineno}: invalid JSON: {err.msg}.") from None
    prompts = doc.get("prompts") if isinstance(doc, dict) else None
    if not isinstance(prompts, list):
        raise EvalError(f'{path}: expected {{"prompts": [{{"id", "prompt", "keywords"}}, ...]}}.')
    for i, p in enumerate(prompts):
        where = f"{path}: prompts[{i}]"
        if not isinstance(p, dict) or not isinstance(p.get("prompt"), str) or not p["prompt"].strip():
            raise EvalError(f'{where}: "prompt" must be a non-empty string.')
        kws = p.get("keywords")
        if not isinstance(kws, list) or not kws or not all(isinstance(k, str) and k for k in kws):
            raise EvalError(f'{where}: "keywords" must be a non-empty list of strings.')
        m = p.get("min_matches", 1)
        if not isinstance(m, int) or not 1 <= m <= len(kws):
            raise EvalError(f'{where}: "min_matches" must be an integer from 1 to {len(kws)}.')
    return [
        {"id": p.get("id", str(i)), "set": p.get("set", ""), "min_matches": 1, **p}
        for i, p in enumerate(prompts)
    ]


def score_keywords(answer: str, keywords: list[str], min_matches: int = 1) -> dict[str, Any]:
    """Case-insensitive substring match: passes with at least `min_matches` of the keywords."""
    low = answer.lower()
    matched = [k for k in keywords if k.lower() in low]
    return {"passed": len(matched) >= min_matches, "matched": matched}


def run_benchmark_prompts(
    loaded: LoadedModel,
    prompts: list[dict[str, Any]],
    *,
    max_new_tokens: int,
    batch_size: int = 4,
    progress: bool = False,
) -> dict[str, Any]:
    """Greedy answers to each benchmark prompt, scored by keywords; the total is the share that pass."""
    from qlora_llm.templates import render_prompt

    ids = [
        loaded.tokenizer(
            render_prompt([{"role": "user", "content": p["prompt"]}], loaded.template, loaded.tokenizer),
            add_special_tokens=True,
        )["input_ids"]
        for p in prompts
    ]
    answers = generate_greedy(
        loaded, ids, max_new_tokens=max_new_tokens, batch_size=batch_size, desc="benchmark", progress=progress
    )
    results = []
    for p, a in zip(prompts, answers, strict=True):
        results.append(
            {"id": p["id"], "set": p["set"], "answer": a["text"], "finish_reason": a["finish_reason"]}
            | score_keywords(a["text"], p["keywords"], p["min_matches"])
        )
    passed = sum(r["passed"] for r in results)
    return {"score": passed / len(results) if results else None, "passed": passed, "results": results}


# --------------------------------------------------------------------------------------------------
# The stage


def _eval_records(cfg: Config, target: Target, data: Path | None) -> tuple[Path, list[dict]]:
    """Explicit data, else eval.data_file, else the run's own held-out split."""
    from qlora_llm.config import load_config
    from qlora_llm.data import load_examples, split_examples
    from qlora_llm.errors import TrainError

    path = data or cfg.eval.data_file
    try:
        if path is not None:
            if not Path(path).is_file():
                raise EvalError(
                    f"{path}: evaluation data not found. Pass --data FILE (JSONL from `qlora-llm prepare`)."
                )
            return Path(path), load_examples(Path(path))
        run_cfg_file = target.path / "config.yaml" if target.path is not None else None
        if run_cfg_file is not None and run_cfg_file.is_file():
            run_cfg = load_config(run_cfg_file)
            if run_cfg.data.eval_file is not None:
                return run_cfg.data.eval_file, load_examples(run_cfg.data.eval_file)
            records = load_examples(run_cfg.data.train_file)
            held = split_examples(records, run_cfg.data.eval_fraction, run_cfg.data.seed)[1]
            if held:
                return run_cfg.data.train_file, held
    except TrainError as err:
        raise EvalError(str(err)) from None
    raise EvalError(
        f"no evaluation data for {target.name}: pass --data FILE (JSONL from `qlora-llm prepare`)."
    )


def _compare_target(target: Target, compare: str | None) -> Target | None:
    """`auto`: the base TARGET was trained from (none for a bare model); `none`: no comparison."""
    if compare == "none" or compare is None:
        return None
    if compare != "auto":
        return find_target(compare, target.model_cfg)
    if target.adapter_dir is not None:
        base = target.model_cfg
    elif target.kind == "merged" and target.manifest.get("identity", {}).get("base_model"):
        base = target.model_cfg.model_copy(update={"name": target.manifest["identity"]["base_model"]})
    else:
        return None
    # The base is prompted with the fine-tune's template, so both answer the same prompt.
    manifest = {"template": {"name": target.template}, "tokens": target.manifest.get("tokens", {})}
    return Target("model", None, base, None, manifest)


def _greedy_answers(
    loaded: LoadedModel, prompts: list[str], max_new_tokens: int, batch_size: int, desc: str
) -> tuple[list[list[int]], list[dict[str, Any]]]:
    """The prompts' token ids and their greedy answers (the prompts are rendered: the template's special
    tokens are in the text), with progress."""
    ids = [loaded.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    answers = generate_greedy(
        loaded, ids, max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc, progress=True
    )
    return ids, answers


def _evaluate_model(
    loaded: LoadedModel, records: list[dict], cfg: Config, prompts: list[dict[str, Any]], label: str
) -> dict[str, Any]:
    e = cfg.eval
    t0 = time.perf_counter()
    rows = tokenize_for_scoring(records, loaded.tokenizer, loaded.template)
    ppl = score_tokens(
        loaded.model, rows, batch_size=e.batch_size, max_length=e.max_length, stride=e.stride, progress=True
    ).perplexity()
    rendered = [render(r, loaded.template, loaded.tokenizer).prompt for r in records]
    prompt_ids, answers = _greedy_answers(
        loaded, rendered, e.max_new_tokens, e.answers_batch_size, f"{label}: answers"
    )
    references = [to_messages(r)[-1]["content"] for r in records]
    rouge = compute_rouge([a["text"] for a in answers], references)
    bench = (
        run_benchmark_prompts(
            loaded, prompts, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, progress=True
        )
        if prompts
        else None
    )
    # No warm-up run: the answers above warmed the model (the first timed run measured as fast as the
    # later ones, 2.27 vs 2.21-2.44 s on the demo's merged model); one run less, ~2-4 s a model.
    speed = speed_benchmark(
        loaded, prompt_ids[0], max_new_tokens=e.max_new_tokens, runs=e.speed_runs, warmup=0
    )
    finished = [a["finish_reason"] == "stop" for a in answers]
    if bench:
        finished += [r["finish_reason"] == "stop" for r in bench["results"]]
    return {
        "name": loaded.target.name,
        "perplexity_completion": ppl["perplexity_completion"],
        "perplexity_full": ppl["perplexity_full"],
        "tokens_scored_completion": ppl["tokens_completion"],
        "tokens_scored_full": ppl["tokens_full"],
        **{k: v for k, v in rouge.items() if k not in ("per_example", "texts_mostly_non_ascii")},
        "rouge_texts_mostly_non_ascii": rouge["texts_mostly_non_ascii"],
        "stop_rate": sum(finished) / len(finished) if finished else None,
        "benchmark_score": bench["score"] if bench else None,
        "benchmark": bench,
        "speed": speed,
        "seconds": time.perf_counter() - t0,
        "examples": [
            {"answer": a["text"], "finish_reason": a["finish_reason"], "nll_completion": nll} | scores
            for a, nll, scores in zip(
                answers, ppl["per_example_nll_completion"], rouge["per_example"], strict=True
            )
        ],
    }


# --------------------------------------------------------------------------------------------------
# General ability (src/qlora_llm/benchmarks.py): lm-eval likelihood tasks, a generative task, KL


def _general_plan(cfg: Config) -> dict[str, Any] | None:
    """The general tasks, checked, and the items each scores: fixed before either model loads."""
    from qlora_llm.benchmarks import BenchmarkError, check_general, generative_items, likelihood_samples

    e = cfg.eval
    if not e.general_tasks and not e.general_generative:
        return None
    try:
        tasks = check_general(
            e.general_tasks, e.general_generative, Path(cfg.model.cache_dir).expanduser() / "lm_eval_tasks"
        )
        samples = likelihood_samples(tasks, e.general_limit, e.general_seed) if tasks.likelihood else {}
        items = {n: generative_items(n, e.general_generative_limit, e.general_seed) for n in tasks.generative}
    except BenchmarkError as err:
        raise EvalError(str(err)) from None
    return {"tasks": tasks, "samples": samples, "items": items}


def _evaluate_general(
    loaded: LoadedModel,
    general: dict[str, Any],
    cfg: Config,
    label: str,
    base: dict[str, Any] | None,
    base_logps: list[Any] | None,
) -> tuple[dict[str, Any], list[Any] | None]:
    """Likelihood tasks through lm-eval, generative tasks on greedy answers, and the KL prompts' log-probs.

    The base (or a target alone) fixes the KL prompts: the first generative questions with its own answers;
    the fine-tuned model is scored on the same tokens. Returns the results and the base's log-probs.
    """
    from qlora_llm.benchmarks import (
        generative_prompt,
        mean_kl,
        run_likelihood_tasks,
        score_generative,
        token_log_probs,
    )

    e, t0 = cfg.eval, time.perf_counter()
    tasks: dict[str, Any] = {}
    if general["samples"]:
        tasks |= run_likelihood_tasks(
            loaded.model,
            loaded.tokenizer,
            general["tasks"],
            general["samples"],
            batch_size=e.general_batch_size,
            desc=f"{label}: lm-eval",
            progress=True,
        )
    own_sequences = []
    for name, items in general["items"].items():
        prompts = [generative_prompt(it, loaded.template, loaded.tokenizer) for it in items]
        ids, answers = _greedy_answers(
            loaded, prompts, e.general_max_new_tokens, e.general_answers_batch_size, f"{label}: {name}"
        )
        tasks[name] = score_generative(items, [a["text"] for a in answers])
        if not own_sequences:
            own_sequences = [p + a["ids"] for p, a in zip(ids, answers, strict=True)][: e.kl_prompts]
    out: dict[str, Any] = {"tasks": tasks}
    logps = None
    if base is None:  # the base, or a target with no comparison
        out["kl_sequences"] = own_sequences
        logps = token_log_probs(loaded.model, own_sequences) if label == "base" and own_sequences else None
    elif base_logps is not None and base["general"]["kl_sequences"]:
        tuned_logps = token_log_probs(loaded.model, base["general"]["kl_sequences"])
        out["kl"] = mean_kl(base_logps, tuned_logps) | {"prompts": len(base_logps)}
    out["seconds"] = time.perf_counter() - t0
    log.info("%s: general benchmarks took %.1f s", label, out["seconds"])
    return out, logps


def _save_logps(path: Path, logps: list[Any]) -> None:
    import torch

    with atomic_file(path, "wb") as f:
        torch.save(logps, f)


def _load_logps(path: Path) -> list[Any] | None:
    import torch

    return torch.load(path, weights_only=True) if path.is_file() else None


def _general_metrics(general: dict[str, Any], results: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """metrics.json's `general`: the paired comparison per task (or the target's scores alone) and KL."""
    from qlora_llm.benchmarks import compare

    e, tuned = cfg.eval, results["tuned"]["general"]
    if "base" in results:
        rows = compare(results["base"]["general"]["tasks"], tuned["tasks"], seed=e.general_seed)
    else:
        rows = [
            {"task": n, "kind": t["kind"], "metric": k, "n": t["n"], "base": None, "tuned": t[k]}
            for n, t in tuned["tasks"].items()
            for k in ("acc", "acc_norm")
            if k in t
        ]
        lik = [r for r in rows if r["kind"] == "likelihood" and r["metric"] == "acc"]
        if len(lik) > 1:
            mean = sum(r["tuned"] for r in lik) / len(lik)
            rows.append(
                {"task": "mean", "kind": "likelihood", "metric": "acc", "n": sum(r["n"] for r in lik)}
                | {"base": None, "tuned": mean}
            )
        rows = [r | {"diff": None, "lo": None, "hi": None, "verdict": None} for r in rows]
    return {
        "likelihood": [r for r in rows if r["kind"] == "likelihood"],
        "generative": [r for r in rows if r["kind"] == "generative"],
        "kl": tuned.get("kl"),
        "settings": {
            "tasks": list(general["samples"]) + list(general["items"]),
            "limit": e.general_limit,
            "generative_limit": e.general_generative_limit,
            "seed": e.general_seed,
            "interval": "paired bootstrap, 10000 resamples, 95% percentile",
        },
        "seconds": {
            label: r["general"]["seconds"] for label, r in results.items() if "seconds" in r["general"]
        },
    }


def _general_table(g: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for the comparison table: accuracy per task (acc; acc_norm lives in the report's section)."""
    rows = []
    for r in g["likelihood"] + g["generative"]:
        if r["metric"] != "acc":
            continue
        # Short enough for the CLI's 34-character column: basic_skills_x -> x.
        name = stock_name(r["task"]).removeprefix("basic_skills_")
        label = (
            "likelihood tasks mean acc"
            if name == "mean"
            else f"{name} acc" + (" (lm-eval)" if r["kind"] == "likelihood" else " (generative)")
        )
        rows.append(
            {
                "metric": f"general:{r['task']}",
                "label": label,
                "better": "higher",
                "base": r["base"],
                "tuned": r["tuned"],
                "change": r["diff"],
                "relative": r["diff"] / r["base"] if r["diff"] is not None and r["base"] else None,
                "format": "{:.0%}",
            }
        )
    if g["kl"] is not None:
        rows.append(
            {
                "metric": "general:kl",
                "label": "KL(base || tuned) per token",
                "better": "neither",
                "base": None,
                "tuned": g["kl"]["kl"],
                "change": None,
                "relative": None,
                "format": "{:.4f}",
            }
        )
    return rows


# (metric key, label, which direction is better, how to format)
TABLE = [
    ("perplexity_completion", "perplexity (answers)", "lower", "{:.3f}"),
    ("perplexity_full", "perplexity (full text)", "lower", "{:.3f}"),
    ("rouge1", "ROUGE-1 F1", "higher", "{:.4f}"),
    ("rouge2", "ROUGE-2 F1", "higher", "{:.4f}"),
    ("rougeL", "ROUGE-L F1", "higher", "{:.4f}"),
    ("rougeLsum", "ROUGE-Lsum F1", "higher", "{:.4f}"),
    ("rougeL_precision", "ROUGE-L precision", "higher", "{:.4f}"),
    ("rougeL_recall", "ROUGE-L recall", "higher", "{:.4f}"),
    ("answer_words", "answer length (mean words)", "neither", "{:.1f}"),
    ("reference_words", "reference length (mean words)", "neither", "{:.1f}"),
    ("stop_rate", "stop rate (EOS before the limit)", "higher", "{:.0%}"),
    ("benchmark_score", "benchmark prompts passed", "higher", "{:.0%}"),
    ("preference_accuracy", "pairs preferred (log-prob chosen > rejected)", "higher", "{:.0%}"),
    ("reward_accuracy", "reward accuracy (vs the base row)", "higher", "{:.0%}"),
    ("reward_margin", "reward margin (vs the base row)", "higher", "{:.3f}"),
    ("tokens_per_s", "generation tokens/s (p50)", "higher", "{:.1f}"),
    ("ttft_s", "time to first token s (p50)", "lower", "{:.3f}"),
    ("peak_memory_gib", "peak memory GiB", "lower", "{:.2f}"),
]


PAIR_KEYS = {"preference_accuracy", "reward_accuracy", "reward_margin"}


def pair_scores(loaded: LoadedModel, pairs: list[dict], cfg: Config) -> dict[str, Any]:
    """Summed log-probabilities of each pair's chosen and rejected answer, as DPO scores them."""
    from qlora_llm.data import pair_examples

    sides = {}
    for i, side in enumerate(("chosen", "rejected")):
        rows = tokenize_for_scoring([pair_examples(p)[i] for p in pairs], loaded.tokenizer, loaded.template)
        s = score_tokens(loaded.model, rows, batch_size=cfg.eval.batch_size, max_length=cfg.eval.max_length)
        sides[side] = [-nll for nll in s.nll_completion]
    preferred = [c > r for c, r in zip(sides["chosen"], sides["rejected"], strict=True)]
    return {"pair_logps": sides, "preference_accuracy": sum(preferred) / len(preferred)}


def add_rewards(results: dict[str, Any], beta: float) -> None:
    """DPO's implicit reward of the tuned model against the base row: beta * (log pi_tuned - log pi_base),
    chosen over rejected; its accuracy counts pairs whose chosen answer gains more (the base row scores
    0% and 0 by definition)."""
    tuned, base = results["tuned"]["pair_logps"], results["base"]["pair_logps"]
    margins = [
        beta * ((tc - bc) - (tr - br))
        for tc, bc, tr, br in zip(
            tuned["chosen"], base["chosen"], tuned["rejected"], base["rejected"], strict=True
        )
    ]
    results["tuned"] |= {
        "reward_accuracy": sum(m > 0 for m in margins) / len(margins),
        "reward_margin": sum(margins) / len(margins),
    }
    results["base"] |= {"reward_accuracy": 0.0, "reward_margin": 0.0}


def _flat(m: dict[str, Any]) -> dict[str, Any]:
    return m | {
        "tokens_per_s": m["speed"]["tokens_per_s"]["p50"],
        "ttft_s": m["speed"]["time_to_first_token_s"]["p50"],
        "peak_memory_gib": (m["memory"]["peak_bytes"] or 0) / 2**30 or None,
    }


TIMED = ("tokens_per_s", "ttft_s")
"""The table's rows that are a timing: with the same computation on both sides, only the host moves them."""


def comparison_table(
    tuned: dict[str, Any], base: dict[str, Any] | None, *, same_computation: bool = False
) -> list[dict[str, Any]]:
    """Base vs tuned, row by row. `same_computation`: the tuned model runs the base's exact shapes (the
    adapter merged), so its timed rows are marked `timing_noise` and get no verdict."""
    rows = []
    t, b = _flat(tuned), _flat(base) if base else {}
    for key, label, better, fmt in TABLE:
        tv, bv = t.get(key), b.get(key)
        if key in PAIR_KEYS and tv is None and bv is None:
            continue  # not a preference evaluation
        change = None
        if tv is not None and bv is not None:
            change = tv - bv
        rows.append(
            {
                "metric": key,
                "label": label,
                "better": better,
                "base": bv,
                "tuned": tv,
                "change": change,
                "relative": change / bv if change is not None and bv else None,
                "format": fmt,
            }
            | ({"timing_noise": True} if same_computation and key in TIMED and change is not None else {})
        )
    return rows


def _worst(metrics: dict[str, Any], records: list[dict], n: int = 5) -> list[dict[str, Any]]:
    tuned, base = metrics["tuned"]["examples"], metrics["base"]["examples"] if metrics.get("base") else None
    order = sorted(range(len(tuned)), key=lambda i: tuned[i]["rougeL"])[:n]
    return [
        {
            "index": i,
            "prompt": to_messages(records[i])[-2]["content"] if len(to_messages(records[i])) > 1 else "",
            "reference": to_messages(records[i])[-1]["content"],
            "tuned": tuned[i]["answer"],
            "tuned_rougeL": tuned[i]["rougeL"],
            "base": base[i]["answer"] if base else None,
            "base_rougeL": base[i]["rougeL"] if base else None,
        }
        for i in order
    ]


def evaluate(
    cfg: Config,
    target: str | Path,
    *,
    data: Path | None = None,
    compare: str | None = None,
    output_dir: Path | None = None,
) -> EvalResult:
    """Measure TARGET (and, by default, the base it was trained from) on the eval data; write the report.

    `compare` (default `eval.compare`): "auto" (the run's base model), "none", or another target.
    """
    from qlora_llm.fingerprint import library_versions

    found = find_target(target, cfg.model)
    base_target = _compare_target(found, compare or cfg.eval.compare)
    data_file, records = _eval_records(cfg, found, data)
    if cfg.eval.max_examples is not None:
        records = records[: cfg.eval.max_examples]
    if not records:
        raise EvalError(f"{data_file}: no examples to evaluate.")
    from qlora_llm.data import is_pair, pair_examples

    # Preference pairs: the usual metrics on the chosen answers, plus how the pairs are scored.
    pairs = records if is_pair(records[0]) else None
    if pairs:
        records = [pair_examples(p)[0] for p in pairs]
    prompts = load_benchmark_prompts(cfg.eval.benchmark_prompts) if cfg.eval.benchmark_prompts else []
    general = _general_plan(cfg)  # before any model loads: a missing extra or a bad task name fails fast
    out = _output_dir(cfg, found, output_dir)
    log.info(
        "evaluating %s (%s) on %d examples of %s; base: %s",
        found.name,
        found.kind,
        len(records),
        data_file,
        base_target.name if base_target else "none",
    )

    results, reused = _score_models(cfg, found, base_target, records, pairs, prompts, general)
    if pairs and "base" in results:
        add_rewards(results, _run_beta(found))
    table = comparison_table(
        results["tuned"], results.get("base"), same_computation=_same_computation(cfg, found, compare)
    )
    general_metrics = _general_metrics(general, results, cfg) if general else None
    if general_metrics:
        table += _general_table(general_metrics)
    notes = _notes(cfg, found, results, reused, table)
    metrics = {
        "target": str(found.name),
        "kind": found.kind,
        "compare": base_target.name if base_target else None,
        "data": {"file": str(data_file), "sha256": sha256_file(Path(data_file)), "examples": len(records)},
        "settings": cfg.eval.model_dump(mode="json") | {"device": cfg.model.device},
        "versions": library_versions() | _rouge_version(),
        "template": found.template,
        "tuned": results["tuned"],
        "base": results.get("base"),
        "table": table,
        "general": general_metrics,
        "notes": notes,
    }
    metrics["headline"] = headline(table, general_metrics)
    metrics["worst_examples"] = _worst(metrics, records)
    metrics["benchmark_prompts"] = [
        {"id": p["id"], "set": p["set"], "prompt": p["prompt"], "keywords": p["keywords"]}
        | {label: results[label]["benchmark"]["results"][i] for label in results}
        for i, p in enumerate(prompts)
    ]
    _write_outputs(out, metrics, results, records)
    write_report(metrics, out)
    log.info("%s", metrics["headline"])
    return EvalResult(out, metrics)


def _same_computation(cfg: Config, found: Target, compare: str | None) -> bool:
    """Whether the fine-tuned model computes with its base's exact shapes: a merged model, or an adapter
    merged in memory (a plain base), compared with the base it was trained from."""
    if (compare or cfg.eval.compare) != "auto":
        return False
    return found.kind == "merged" or (found.adapter_dir is not None and cfg.eval.quantization == "none")


def _output_dir(cfg: Config, found: Target, output_dir: Path | None) -> Path:
    """Where the report goes: the given folder, eval.output_dir, else `eval/` in the run folder."""
    out = Path(output_dir or cfg.eval.output_dir or ((found.path or Path("runs/eval")) / "eval"))
    if (
        found.kind == "adapter"
        and found.path is not None
        and output_dir is None
        and cfg.eval.output_dir is None
    ):
        out = (
            found.path.parent / "eval"
            if (found.path.parent / "config.yaml").is_file()
            else found.path / "eval"
        )
    return out


def _score_models(
    cfg: Config,
    found: Target,
    base_target: Target | None,
    records: list[dict],
    pairs: list[dict] | None,
    prompts: list[dict],
    general: dict[str, Any] | None,
) -> tuple[dict[str, Any], Path | None]:
    """Each model's figures, the base first: reused from the cache when the same evaluation was made, else
    computed in a process of its own (apart.py), so the fine-tuned model's evaluation does not stack on
    what the base's left in this one (0.25 GiB in the demo: the allocator's free pages in other threads)."""
    results: dict[str, Any] = {}
    reused: Path | None = None
    base_logps = None  # the base's next-token log-probs on the KL prompts, for KL(base || tuned)
    if base_target is not None:
        # The base scores the same for every run of the same model, data and settings: computed once.
        cache = _base_cache_file(cfg, base_target, pairs or records)
        if cache is not None and cache.is_file():
            results["base"], reused = json.loads(cache.read_text()), cache
            log.info("base model: reusing its evaluation with the same model, data and settings (%s)", cache)
            base_logps = _load_logps(cache.with_suffix(".kl.pt")) if general else None
        else:
            logps_file = cache.with_suffix(".kl.pt") if cache is not None else None
            results["base"], base_logps = _score_base_apart(
                cfg, base_target, records, pairs, prompts, logps_file
            )
            if cache is not None:  # after the log-probs: a cached figure always has its log-probs beside it
                atomic_write_text(cache, json.dumps(results["base"], ensure_ascii=False) + "\n")
    results["tuned"], _ = _score_model(
        cfg,
        "tuned",
        found,
        records,
        pairs,
        prompts,
        general,
        results.get("base"),
        base_logps,
    )
    return results, reused


def _score_model(
    cfg: Config,
    label: str,
    target: Target,
    records: list[dict],
    pairs: list[dict] | None,
    prompts: list[dict],
    general: dict[str, Any] | None,
    base: dict[str, Any] | None = None,
    base_logps: list[Any] | None = None,
) -> tuple[dict[str, Any], list[Any] | None]:
    """One model's figures and, for the base, its log-probs on the KL prompts; compared with `base` where
    given (the fine-tuned model, or a target with no comparison, is "tuned")."""
    # Merged in memory: the model `merge` ships, and its greedy answers ~3x as fast on a CPU.
    loaded = load_target(target, device=cfg.model.device, quantization=cfg.eval.quantization, merge=True)
    peak = PeakMemory(loaded.device)  # after loading: the model's own use while it is evaluated
    logps = None
    try:
        result = _evaluate_model(loaded, records, cfg, prompts, label)
        if pairs:
            result |= pair_scores(loaded, pairs, cfg)
        if general:
            result["general"], logps = _evaluate_general(loaded, general, cfg, label, base, base_logps)
    finally:
        memory = peak.stop()
    result["memory"] = memory
    return result, logps


def _score_base_apart(
    cfg: Config,
    base: Target,
    records: list[dict],
    pairs: list[dict] | None,
    prompts: list[dict],
    logps_file: Path | None,
) -> tuple[dict[str, Any], list[Any] | None]:
    """`_score_model` of the base in a process of its own; its figures and KL log-probs. The process writes
    the log-probs to `logps_file` (the cache's, written once), else to a temporary folder of ours."""
    import contextlib
    import tempfile

    from qlora_llm.apart import call

    scratch = tempfile.TemporaryDirectory(prefix="qlora-llm-base-") if logps_file is None else None
    with scratch or contextlib.nullcontext():
        logps_file = logps_file or Path(scratch.name) / "kl.pt"
        target = {
            "kind": base.kind,
            "path": str(base.path) if base.path else None,
            "model_cfg": base.model_cfg.model_dump(mode="json"),
            "adapter_dir": str(base.adapter_dir) if base.adapter_dir else None,
            "manifest": base.manifest,
        }
        request = {"config": cfg.model_dump(mode="json"), "target": target, "records": records}
        request |= {"pairs": pairs, "prompts": prompts, "logps_file": str(logps_file)}
        result = call(
            "qlora_llm.evaluate:score_base_in_child",
            request,
            what="base model's evaluation",
            again="Run the same command again to evaluate again.",
        )
        log.info("base model: evaluated in a process of its own (pid %d)", result["pid"])
        return result["figures"], _load_logps(logps_file) if result["logps"] else None


def score_base_in_child(request: dict[str, Any]) -> dict[str, Any]:
    """What `_score_base_apart`'s process runs: the base's figures (its log-probs go to a file)."""
    import os

    from qlora_llm.config import ModelConfig

    cfg = Config.model_validate(request["config"])
    t = request["target"]
    target = Target(
        t["kind"],
        Path(t["path"]) if t["path"] else None,
        ModelConfig.model_validate(t["model_cfg"]),
        Path(t["adapter_dir"]) if t["adapter_dir"] else None,
        t["manifest"],
    )
    figures, logps = _score_model(
        cfg, "base", target, request["records"], request["pairs"], request["prompts"], _general_plan(cfg)
    )
    if logps is not None:
        _save_logps(Path(request["logps_file"]), logps)
    return {"figures": figures, "pid": os.getpid(), "logps": logps is not None}


def _notes(
    cfg: Config, found: Target, results: dict[str, Any], reused: Path | None, table: list[dict[str, Any]]
) -> list[str]:
    """What a reader needs to read the figures right."""
    notes = []
    non_ascii = max(r["rouge_texts_mostly_non_ascii"] for r in results.values())
    if non_ascii:
        notes.append(
            f"{non_ascii} text(s) are mostly non-ASCII: rouge-score keeps only a-z and 0-9 tokens, so they "
            "score as empty; ROUGE is not meaningful for them."
        )
    if found.adapter_dir is not None and cfg.eval.quantization != "none":
        notes.append(
            "The fine-tuned model ran with its LoRA adapter unmerged on the 4-bit base (extra matmuls per "
            "layer); a merged model (`qlora-llm merge`) decodes at the base model's speed."
        )
    elif found.adapter_dir is not None:
        notes.append(
            "The fine-tuned model ran with its LoRA adapter merged into the weights in memory, as "
            "`qlora-llm merge` writes it."
        )
    if any(r.get("timing_noise") for r in table):
        notes.append(
            "Speed: the fine-tuned model computes with the base's exact shapes (merged), and each was timed "
            "once, minutes apart, on the same fixed-length answer: a difference in its speed rows is this "
            "machine's timing noise, so they carry no verdict."
        )
    if reused is not None:
        notes.append(
            f"The base model's figures were computed by an earlier evaluation with the same model, data and "
            f"settings and reused ({reused}); its speed and memory were measured then."
        )
    elif "base" in results:
        notes.append(
            "Peak memory: each model's is the resident peak of the process it was evaluated in (the base's "
            "in a process of its own), libraries included; the fine-tuned model's also holds the base's "
            "log-probs it is compared with for KL."
        )
    notes.append(
        "Perplexity is exp(mean NLL) over every scored token of the set (token-weighted); 'answers' scores only "
        "the completion tokens, EOS included, as training does."
    )
    return notes


def _write_outputs(out: Path, metrics: dict[str, Any], results: dict[str, Any], records: list[dict]) -> None:
    """examples.jsonl (every answer beside its reference) and metrics.json."""
    out.mkdir(parents=True, exist_ok=True)
    examples = [
        {"index": i, "reference": to_messages(r)[-1]["content"]}
        | {label: results[label]["examples"][i] for label in results}
        for i, r in enumerate(records)
    ]
    atomic_write_text(
        out / "examples.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in examples)
    )
    for label in results:
        results[label].pop("examples")
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")


def _run_beta(target: Target) -> float:
    """The run's train.beta (DPO's), so the rewards are on the scale it trained with; else DPO's 0.1."""
    from qlora_llm.config import load_config

    for folder in (target.path, target.adapter_dir):
        if folder is not None and (Path(folder) / "config.yaml").is_file():
            return load_config(Path(folder) / "config.yaml").train.beta
    return 0.1


def _base_cache_file(cfg: Config, base: Target, records: list[dict]) -> Path | None:
    """Where the base model's results for these model, data and settings live; None if not pinnable."""
    from qlora_llm import __version__
    from qlora_llm.fingerprint import digest, file_digest, library_versions, model_fingerprint
    from qlora_llm.model import pick_device

    model = model_fingerprint(base.model_cfg)
    if model is None:
        return None
    e, m = cfg.eval, base.model_cfg
    key = digest(
        {
            "model": model,
            "records": digest(records),
            "eval": e.model_dump(mode="json", exclude={"data_file", "output_dir", "compare", "max_examples"}),
            "benchmark": file_digest(e.benchmark_prompts) if e.benchmark_prompts else None,
            "load": {
                "device": pick_device(cfg.model.device),
                "compute_dtype": m.compute_dtype,
                "cpu_4bit_kernel": m.cpu_4bit_kernel if e.quantization != "none" else None,
                "double_quant": m.double_quant,
            },
            "template": base.template,
            "tokens": base.manifest.get("tokens", {}),
            "speed": "max_new_tokens, EOS ignored",  # how speed_benchmark times: not what older caches hold
            "versions": library_versions() | _rouge_version() | {"qlora_llm": __version__},
        }
    )
    return Path(cfg.model.cache_dir).expanduser() / "evals" / f"base-{key}.json"


def _rouge_version() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return {"rouge-score": version("rouge-score")}
    except PackageNotFoundError:
        return {"rouge-score": "not installed"}
