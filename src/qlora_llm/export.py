"""Export a run to where people already run models: llama.cpp (GGUF), Ollama, and vLLM.

Each export starts from what was verified: GGUF and Ollama from the merged model (`qlora-llm merge`,
whose logits and greedy answers were checked against the adapter), vLLM from the adapter itself (or the
merged folder). The run's chat template and stop tokens travel with every export, because an exported
model without them answers in garbage or never stops (the failure peers' trackers are full of). Each
export is checked before it is put in place, and `EXPORT.md` beside the files says what was checked:

- GGUF: written by llama.cpp's own converter (`llamacpp.py`), read back (template, EOS), its template
  rendered with Jinja and compared with ours, and (unless `verify=False`) run in llama.cpp on the same
  tokens as transformers on the merged model (teacher-forced logits, `compare_logits`; free-running
  greedy agreement is reported beside it).
- Ollama: the GGUF plus a `Modelfile` whose Go `TEMPLATE` is built from our template and checked to
  render the same text on several conversations (`ollama_template`).
- vLLM: what vLLM refuses is refused here first, with what to change; the folder holds the adapter,
  the chat template and the exact `vllm serve` command.

    export("runs/smollm2-aclsum", "gguf", quant="q4_k_m")   # -> runs/smollm2-aclsum/export-gguf-q4_k_m/
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from qlora_llm.atomic import atomic_dir
from qlora_llm.errors import QloraError
from qlora_llm.llamacpp import LlamaCpp
from qlora_llm.model import find_target
from qlora_llm.templates import render_prompt, resolve_template

log = logging.getLogger(__name__)

FORMATS = ("gguf", "ollama", "vllm")
GGUF_QUANTS = ("f16", "q8_0", "q4_k_m")
"""f16 and q8_0 are written by the converter itself; K-quants need llama.cpp's llama-quantize."""
VERIFY_PROMPTS = 4
VERIFY_TOKENS = 32
"""Free-running greedy answers are compared on this many tokens, and reported (not required: see below)."""
VERIFY_MAX_NEW_TOKENS = 64
DECISIVE_MARGIN = 1.0
"""A position is decisive when transformers' top-1 token leads its top-2 by at least this many nats (e^1 = 2.7x
as likely). Below it, any rounding (f16 or quantized weights, another CPU's kernels) may flip the choice."""
VERIFY_LIMITS = {
    "f16": {"min_decisive_agreement": 1.0, "max_mean_kl": 1e-3},
    "q8_0": {"min_decisive_agreement": 0.99, "max_mean_kl": 0.02},
    "q4_k_m": {"min_decisive_agreement": 0.9, "max_mean_kl": 0.3},
    "lora": {"min_decisive_agreement": 1.0, "max_mean_kl": 1e-3},
}
"""What the GGUF must reproduce of transformers' logits on the same tokens (teacher-forced), per format.
Set at 3-200x what SmolLM2-135M measured on the reference answers (docs/merge-export.md gives the figures
and the command): a real divergence (a wrong tensor, a broken template or rope) costs nats of KL, not hundredths."""
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ranks vLLM's `--max-lora-rank` accepts (its LoRAConfig)."""

# The seed's [INST] format (templates._render_mistral) as Jinja, for tools that take a chat template:
# a system message joins the first user turn; each answer ends with EOS. BOS is the tokenizer's job.
MISTRAL_JINJA = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] + '\n\n' -%}"
    "{%- elif message['role'] == 'user' -%}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
    "{%- set ns.system = '' -%}"
    "{%- else -%}{{ ' ' + message['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Conversations every template translation is checked on: with and without a system message, 1-3 turns.
CHECK_CONVERSATIONS = [
    [{"role": "user", "content": "Hi there."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 + 3?\nTwo lines."},
    ],
    [
        {"role": "system", "content": "You summarize papers."},
        {"role": "user", "content": "Summarize: A."},
        {"role": "assistant", "content": "A is a paper."},
        {"role": "user", "content": "Shorter."},
        {"role": "assistant", "content": "A."},
        {"role": "user", "content": "Thanks!"},
    ],
]


class ExportError(QloraError, RuntimeError):
    """The export cannot be made or did not verify; nothing was written. The message says why."""


@dataclass
class ExportResult:
    out_dir: Path
    files: list[str]
    verification: dict[str, Any] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)


def chat_template_jinja(template: str, tokenizer: Any) -> str:
    """The run's template as the Jinja chat template that GGUF and vLLM carry."""
    if resolve_template(template, tokenizer) == "mistral":
        return MISTRAL_JINJA
    return tokenizer.chat_template


def render_jinja(jinja: str, messages: list[dict[str, str]], tokenizer: Any) -> str:
    """A generation prompt through a Jinja chat template, as llama.cpp and vLLM apply it, without the BOS
    text when the tokenizer adds BOS itself (as our prompts are)."""
    from qlora_llm.templates import adds_bos

    text = tokenizer.apply_chat_template(
        messages, chat_template=jinja, add_generation_prompt=True, tokenize=False
    )
    bos = tokenizer.bos_token or ""
    return text[len(bos) :] if bos and adds_bos(tokenizer) and text.startswith(bos) else text


def _glue(template: str, tokenizer: Any) -> dict[tuple[str, str], str]:
    """The text our template puts between one message's content and the next, per pair of roles.

    Found by rendering conversations of sentinel contents: ("", role) is what comes before the first
    message, (role, "") what follows the last user message in a generation prompt.
    """
    cases = [
        [("user", "U1")],
        [("system", "S1"), ("user", "U1")],
        [("user", "U1"), ("assistant", "A1"), ("user", "U2")],
        [("system", "S1"), ("user", "U1"), ("assistant", "A1"), ("user", "U2")],
    ]
    glue: dict[tuple[str, str], str] = {}
    for case in cases:
        sentinels = [f"\x00{content}\x00" for _, content in case]
        messages = [{"role": r, "content": s} for (r, _), s in zip(case, sentinels, strict=True)]
        try:
            text = render_prompt(messages, template, tokenizer)
        except ValueError as err:  # a chat template that cannot be used as ours (templates.py says why)
            raise ExportError(str(err)) from err
        pieces = re.split("\x00[A-Z][0-9]\x00", text)
        if len(pieces) != len(case) + 1:
            raise ExportError(
                "the template repeats or drops message contents; Ollama's TEMPLATE cannot be derived from it"
            )
        roles = ["", *[r for r, _ in case], ""]
        for k, piece in enumerate(pieces):
            key = (roles[k], roles[k + 1])
            if glue.setdefault(key, piece) != piece:
                raise ExportError(
                    f"the template puts different text between {key[0] or 'start'} and {key[1] or 'answer'} messages in different conversations; Ollama's TEMPLATE cannot be derived from it"
                )
    return glue


def _go_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid Go string literal for the characters we meet


def ollama_template(template: str, tokenizer: Any) -> str:
    """Our template as an Ollama (Go text/template) TEMPLATE over `.Messages`.

    Written as the text between consecutive messages (`_glue`), which covers per-role prefixes and
    suffixes, default system prompts and the [INST] format's system message joined to the first user
    turn. Checked in tests by rendering it with Go's own text/template. A pair of roles our template
    never puts side by side (two user turns in a row) gets no text between them.
    """
    glue = _glue(template, tokenizer)
    branches = []
    for (before, after), text in sorted(glue.items()):
        if after == "" or not text:
            continue
        branches.append(f'(and (eq $prev "{before}") (eq .Role "{after}"))}}}}{{{{ {_go_string(text)} }}}}')
    body = "{{- else if ".join(branches)
    answer = glue.get(("user", ""), "")
    return (
        '{{- $prev := "" }}{{- range .Messages }}'
        f"{{{{- if {body}{{{{- end }}}}"
        "{{ .Content }}{{ $prev = .Role }}{{- end }}"
        f'{{{{- if eq $prev "user" }}}}{{{{ {_go_string(answer)} }}}}{{{{- end }}}}'
    )


def _merged_folder(found: Any, device: str) -> Path:
    """The verified merged model of a target: its own folder, the run's `merged/`, or merged now."""
    from qlora_llm.fingerprint import sha256_file
    from qlora_llm.merge import merge
    from qlora_llm.model import resolve_model

    if found.kind == "merged":
        return found.path
    if found.kind == "model":  # a base model alone: the converter needs its files
        resolved = Path(resolve_model(found.model_cfg.name, found.model_cfg.cache_dir))
        if resolved.is_dir():
            return resolved
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(found.model_cfg.name, revision=found.model_cfg.revision))
    existing = (
        found.path / "merged" if found.kind == "run" else found.path.with_name(found.path.name + "-merged")
    )
    verification = existing / "merge_verification.json"
    done = json.loads(verification.read_text()) if verification.is_file() else {}
    weights = found.adapter_dir / "adapter_model.safetensors"
    same_scale = done.get("adapter_scale", 1.0) == found.model_cfg.adapter_scale
    if done.get("passed") and same_scale and done.get("adapter_sha256") == sha256_file(weights):
        return existing
    log.info(
        "no verified merge of this adapter beside %s yet: merging it first (qlora-llm merge)", found.path
    )
    return merge(
        found.path, existing, model_cfg=found.model_cfg, device=device, force=existing.exists()
    ).out_dir


def export_name(found: Any) -> str:
    """What an export is called (file stems, the Ollama model, vLLM's LoRA name): the run's folder name."""
    if found.path is None:
        name = found.model_cfg.name.split("/")[-1]
    elif found.path.name in ("merged", "final_adapter"):
        name = found.path.parent.name
    else:
        name = found.path.name.removesuffix("-merged")
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "model"


def _default_out(found: Any, fmt: str, quant: str | None) -> Path:
    suffix = f"{fmt}-{quant}" if quant else fmt
    if found.kind == "run":
        return found.path / f"export-{suffix}"
    if found.path is not None:
        return found.path.with_name(f"{found.path.name}-{suffix}")
    return Path(f"{found.model_cfg.name.replace('/', '--')}-{suffix}")


def _run_settings(found: Any) -> Any:
    """The run's resolved config (for sampling defaults), else the defaults."""
    from qlora_llm.config import Config, load_config

    for folder in (found.path, found.adapter_dir):
        if folder is not None and (folder / "config.yaml").is_file():
            return load_config(folder / "config.yaml")
    return Config()


def _stop_texts(tokenizer: Any, stop_ids: list[int]) -> list[str]:
    return [tokenizer.convert_ids_to_tokens(i) for i in stop_ids]


def _stage_for_converter(merged: Path, stage: Path, jinja: str) -> None:
    """The merged folder as the converter should see it: same files (linked), our template in the tokenizer config."""
    stage.mkdir()
    for item in merged.iterdir():
        if item.name not in ("tokenizer_config.json", "chat_template.jinja", "chat_template.json"):
            (stage / item.name).symlink_to(item.resolve())
    config = (
        json.loads((merged / "tokenizer_config.json").read_text())
        if (merged / "tokenizer_config.json").is_file()
        else {}
    )
    config["chat_template"] = (
        jinja  # tokenizer_config.json's template wins over chat_template.jinja in gguf-py
    )
    (stage / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def check_gguf(path: Path, jinja: str, eos_id: int, tokenizer: Any, template: str) -> dict[str, Any]:
    """Read a GGUF back: it carries our chat template and EOS, and its template renders as ours does."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key: str) -> Any:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    problems = []
    if value("tokenizer.chat_template") != jinja:
        problems.append("its tokenizer.chat_template is not the run's template")
    if value("tokenizer.ggml.eos_token_id") != eos_id:
        problems.append(f"its EOS id is {value('tokenizer.ggml.eos_token_id')}, the run trained on {eos_id}")
    same = sum(
        render_jinja(jinja, c, tokenizer) == render_prompt(c, template, tokenizer)
        for c in CHECK_CONVERSATIONS
    )
    if same != len(CHECK_CONVERSATIONS):
        problems.append(
            f"its template renders {len(CHECK_CONVERSATIONS) - same} of {len(CHECK_CONVERSATIONS)} conversations differently from ours"
        )
    if problems:
        raise ExportError(f"{path.name}: " + "; ".join(problems) + ". Nothing was written.")
    return {
        "chat_template": "the run's (checked)",
        "eos_token_id": eos_id,
        "eot_token_id": value("tokenizer.ggml.eot_token_id"),
        "conversations_rendered_identically": same,
        "file_type": value("general.file_type"),
    }


def _agreement(
    prompt_ids: list[int], reference_ids: list[int], finished: bool, llama_text: str, tokenizer: Any
) -> dict[str, Any]:
    """How many of transformers' greedy tokens llama.cpp's text reproduces, and whether both stopped."""
    shown_prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    if not llama_text.startswith(shown_prompt):
        # A measure, not a check (compare_with_llama_cpp): an echo we cannot parse counts as no agreement.
        log.warning("llama.cpp's output does not start with the prompt it was given: %r", llama_text[:200])
        shown_prompt = ""
    stopped = llama_text.endswith(" [end of text]\n")
    text = llama_text[len(shown_prompt) :].removesuffix(" [end of text]\n")
    ids = [i for i in reference_ids if i not in tokenizer.all_special_ids]
    agree = 0
    while agree < len(ids) and text.startswith(tokenizer.decode(ids[: agree + 1], skip_special_tokens=True)):
        agree += 1
    return {
        "tokens": len(ids),
        "agree": agree,
        "both_stopped_together": finished
        and stopped
        and agree == len(ids)
        and text == tokenizer.decode(ids, skip_special_tokens=True),
        "transformers_stopped": finished,
        "llama_cpp_stopped": stopped,
    }


def compare_logits(reference: Any, test: Any, margin: float = DECISIVE_MARGIN) -> dict[str, Any]:
    """Teacher-forced agreement of two models' logits at the same positions (rows: positions, columns: vocab).

    KL(reference || test) per position, the log-prob difference of the reference's top-1 token, and top-1
    agreement, counted apart where the reference's lead over its second choice is at least `margin` nats
    (decisive) and where it is not (near-ties: a flip there is rounding, not a different model).
    """
    import torch

    ref = torch.as_tensor(reference).double().log_softmax(-1)
    tst = torch.as_tensor(test).double().log_softmax(-1)
    top2 = ref.topk(2, dim=-1)
    lead = top2.values[:, 0] - top2.values[:, 1]
    choice = top2.indices[:, 0]
    same = choice == tst.argmax(-1)
    decisive = lead >= margin
    kl = (ref.exp() * (ref - tst)).sum(-1)
    dlogp = (ref.gather(1, choice[:, None]) - tst.gather(1, choice[:, None]))[:, 0].abs()
    n_decisive = int(decisive.sum())
    return {
        "positions": len(lead),
        "decisive": n_decisive,
        "decisive_margin": margin,
        "decisive_agreement": float(same[decisive].double().mean()) if n_decisive else 1.0,
        "decisive_flips": int((~same & decisive).sum()),
        "near_tie_flips": int((~same & ~decisive).sum()),
        "top1_agreement": float(same.double().mean()),
        "largest_flipped_lead": float(lead[~same].max()) if bool((~same).any()) else 0.0,
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "mean_abs_logprob_diff": float(dlogp.mean()),
        "max_abs_logprob_diff": float(dlogp.max()),
    }


def divergence(figures: dict[str, Any], limits: dict[str, float]) -> str | None:
    """Why a teacher-forced comparison shows a different model (None when it is within the limits)."""
    problems = []
    if figures["decisive_agreement"] < limits["min_decisive_agreement"]:
        problems.append(
            f"top-1 agreement {figures['decisive_agreement']:.1%} on the {figures['decisive']} decisive positions "
            f"(lead >= {figures['decisive_margin']} nats; {figures['decisive_flips']} flipped), "
            f"below the {limits['min_decisive_agreement']:.0%} required"
        )
    if figures["mean_kl"] > limits["max_mean_kl"]:
        problems.append(f"mean KL {figures['mean_kl']:.3g} nats, above the {limits['max_mean_kl']:g} allowed")
    return "; ".join(problems) or None


def _teacher_forced(
    tools: LlamaCpp, gguf: Path, loaded: Any, texts: list[tuple[str, str]], lora: Path | None
) -> dict[str, Any]:
    """llama.cpp's and transformers' logits on the same tokens (prompt + reference answer), on the answers' positions."""
    import torch

    tokenizer = loaded.tokenizer
    device = next(loaded.model.parameters()).device
    refs, tests, same_tokens = [], [], 0
    for prompt, answer in texts:
        tokens, logits = tools.logits(gguf, prompt + answer, lora=lora)
        # llama-results does not parse special-token text; transformers splits it the same way when asked.
        ours = tokenizer(prompt + answer, add_special_tokens=True, split_special_tokens=True)["input_ids"]
        head = tokenizer(prompt, add_special_tokens=True, split_special_tokens=True)["input_ids"]
        same_tokens += tokens == ours
        start = (
            len(head) - 1 if tokens[: len(head)] == head else 0
        )  # the position that predicts the answer's first token
        with torch.inference_mode():
            ref = loaded.model(torch.tensor([tokens], device=device)).logits[0].float().cpu()
        if ref.shape[1] < logits.shape[1]:
            raise ExportError(
                f"the GGUF's vocabulary has {logits.shape[1]} tokens, the model's {ref.shape[1]}; nothing was written."
            )
        refs.append(ref[start:, : logits.shape[1]])  # transformers may pad its vocabulary; llama.cpp does not
        tests.append(torch.from_numpy(logits[start:]))
    figures = compare_logits(torch.cat(refs), torch.cat(tests))
    figures["texts"] = len(texts)
    figures["tokenized_alike"] = same_tokens
    return figures


def compare_with_llama_cpp(
    tools: LlamaCpp,
    gguf: Path,
    merged: Path,
    template: str,
    device: str,
    kind: str,
    lora: Path | None = None,
) -> dict[str, Any]:
    """The GGUF in llama.cpp against transformers on the merged model, on benchmark prompts.

    Teacher-forced (what is verified, against `VERIFY_LIMITS[kind]`): both models' logits on the same
    tokens, a prompt and transformers' greedy answer to it (`compare_logits`); a GGUF outside the limits
    raises ExportError. Free-running (what is reported): llama.cpp's own greedy answers, which part from
    transformers' at the first near-tie rounding flips, after which the two texts are unrelated; so they
    are a measure, not a test, on a CPU whose kernels round differently.
    """
    from qlora_llm.generate import generate_greedy
    from qlora_llm.model import load_target

    prompts = _verify_prompts()
    log.info("verifying the %s GGUF in llama.cpp against transformers on %d prompts", kind, len(prompts))
    loaded = load_target(merged, device=device)
    tokenizer = loaded.tokenizer
    rendered = [render_prompt([{"role": "user", "content": p}], template, tokenizer) for p in prompts]
    ids = [tokenizer(r, add_special_tokens=True)["input_ids"] for r in rendered]
    weights = next(loaded.model.parameters())
    answers = _reference_answers(
        merged,
        ids,
        f"{weights.device} {weights.dtype}",
        partial(generate_greedy, loaded, ids, max_new_tokens=VERIFY_MAX_NEW_TOKENS, batch_size=1),
    )
    forced = _teacher_forced(
        tools, gguf, loaded, [(r, a["text"]) for r, a in zip(rendered, answers, strict=True)], lora
    )
    forced["limits"] = VERIFY_LIMITS[kind]
    why = divergence(forced, VERIFY_LIMITS[kind])
    if why:
        raise ExportError(
            f"the {kind} GGUF does not compute the model it was made from: on the same tokens "
            f"({forced['positions']} answer positions of {forced['texts']} benchmark prompts), llama.cpp's logits "
            f"differ from transformers': {why}. Nothing was written."
        )
    rows = []
    for prompt, prompt_ids, answer in zip(rendered, ids, answers, strict=True):
        text = tools.complete(gguf, prompt, VERIFY_MAX_NEW_TOKENS, lora=lora)
        rows.append(_agreement(prompt_ids, answer["ids"], answer["finish_reason"] == "stop", text, tokenizer))
    del loaded
    return {
        "teacher_forced": forced,
        "greedy": {
            "prompts": len(rows),
            "max_new_tokens": VERIFY_MAX_NEW_TOKENS,
            "agree_on_first": [r["agree"] for r in rows],
            "answer_tokens": [r["tokens"] for r in rows],
            "stopped_together": sum(r["both_stopped_together"] for r in rows),
            "transformers_stopped": sum(r["transformers_stopped"] for r in rows),
            "all_agree": all(r["agree"] >= min(VERIFY_TOKENS, r["tokens"]) for r in rows),
        },
    }


ANSWERS_FILE = "export_answers.json"
"""Transformers' greedy answers to the verification prompts, kept in the merged folder: every export of
one merge (f16, q8_0, the adapter, Ollama) compares against the same answers, computed once. On a
135M model that is 13 s of a 45 s verified export on 2 cores; on a 7B model on a CPU, minutes."""


def _weights_key(folder: Path) -> list[list[Any]]:
    """Which weights a folder holds, cheaply: name, size and modification time of each safetensors file
    (a new merge writes new files, so the key changes with it)."""
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.glob("*.safetensors"))]


def _reference_answers(
    merged: Path, ids: list[list[int]], computed_on: str, generate: Callable[[], list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """`generate()`'s answers to `ids`, or the ones kept for these prompts, these weights and this device
    and dtype (`computed_on`: a GPU's bf16 answers may differ from a CPU's fp32 ones), in ANSWERS_FILE.

    The file is written whole or not at all (a rename); a folder that cannot be written is only not
    cached into.
    """
    key = {
        "prompts": ids,
        "max_new_tokens": VERIFY_MAX_NEW_TOKENS,
        "weights": _weights_key(merged),
        "computed_on": computed_on,
    }
    kept = merged / ANSWERS_FILE
    try:
        cached = json.loads(kept.read_text())
        if cached["key"] == key:
            log.info("transformers' greedy answers: kept in %s from an earlier export of this merge", kept)
            return cached["answers"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    answers = generate()
    try:
        part = kept.with_name(f".{ANSWERS_FILE}.{os.getpid()}")
        part.write_text(json.dumps({"key": key, "answers": answers}) + "\n")
        os.replace(part, kept)
    except OSError as e:
        log.debug("not keeping the greedy answers in %s: %s", merged, e)
    return answers


def _verify_prompts() -> list[str]:
    from qlora_llm.evaluate import load_benchmark_prompts

    bench = Path("configs/benchmark_prompts.json")
    if bench.is_file():
        return [p["prompt"] for p in load_benchmark_prompts(bench)[:VERIFY_PROMPTS]]
    return [
        "Say hello.",
        "What is 2 + 2?",
        "Name three colours.",
        "Summarize: LoRA adapts large models cheaply.",
    ]


def export(
    target: str | Path,
    fmt: str = "gguf",
    *,
    quant: str | None = None,
    out_dir: Path | None = None,
    adapter_only: bool = False,
    merged: bool = False,
    verify: bool = True,
    force: bool = False,
    model_cfg: Any = None,
    device: str = "auto",
) -> ExportResult:
    """Export TARGET (a run, adapter or merged folder) as `gguf`, `ollama` or `vllm` into `out_dir`, atomically."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: not one of {', '.join(FORMATS)}.")
    if fmt == "vllm" and quant:
        raise ExportError("--quant is for gguf and ollama; vLLM serves the adapter on the 16-bit base.")
    if fmt != "vllm":
        quant = (quant or "f16").lower()
    if quant is not None and quant not in GGUF_QUANTS:
        raise ExportError(f"--quant {quant}: not one of {', '.join(GGUF_QUANTS)}.")
    found = find_target(target, model_cfg)
    if adapter_only and (fmt != "gguf" or found.adapter_dir is None):
        raise ExportError(
            "--adapter-only writes a run's LoRA adapter as a GGUF adapter: use it with --format gguf on a run or adapter folder."
        )
    if fmt == "vllm" and found.adapter_dir is None and not merged and found.kind != "merged":
        raise ExportError(
            f"{target}: has no adapter; vLLM export takes a run or adapter folder (or --merged)."
        )
    out_dir = (
        Path(out_dir)
        if out_dir is not None
        else _default_out(found, fmt + ("-adapter" if adapter_only else ""), quant)
    )
    if out_dir.exists() and not force:
        raise ExportError(f"{out_dir} already exists; pass --force to replace it, or --out DIR.")
    start = time.perf_counter()
    with atomic_dir(out_dir, replace=force) as tmp:
        if fmt == "vllm":
            result = _export_vllm(found, tmp, out_dir.resolve(), merged=merged, device=device)
        else:
            result = _export_gguf(found, tmp, quant, adapter_only=adapter_only, verify=verify, device=device)
            if fmt == "ollama":
                _, tokenizer = _template_and_tokenizer(_merged_folder(found, device), found)
                result.commands = _write_modelfile(found, tmp, result, tokenizer)
                result.files.append("Modelfile")
        (tmp / "EXPORT.md").write_text(_export_md(found, fmt, quant, out_dir, result))
        result.files.append("EXPORT.md")
        (tmp / "export.json").write_text(
            json.dumps(
                {
                    "format": fmt,
                    "quant": quant,
                    "source": str(found.name),
                    "files": result.files,
                    "verification": result.verification,
                    "commands": result.commands,
                },
                indent=2,
            )
            + "\n"
        )
    result.out_dir = out_dir
    log.info("exported %s as %s to %s in %.0f s", found.name, fmt, out_dir, time.perf_counter() - start)
    return result


def _template_and_tokenizer(folder: Path, found: Any) -> tuple[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return resolve_template(found.template, tokenizer), tokenizer


def _export_gguf(
    found: Any, out: Path, quant: str, *, adapter_only: bool, verify: bool, device: str
) -> ExportResult:
    tools = LlamaCpp(found.model_cfg.cache_dir)
    merged_dir = _merged_folder(found, device)
    template, tokenizer = _template_and_tokenizer(merged_dir, found)
    jinja = chat_template_jinja(template, tokenizer)
    eos_id = found.manifest.get("tokens", {}).get("eos_id", tokenizer.eos_token_id)
    stem = export_name(found)
    scratch = out / ".work"
    scratch.mkdir()
    stage = scratch / "model"
    _stage_for_converter(merged_dir, stage, jinja)
    verification: dict[str, Any] = {"llama_cpp": tools.version}
    if adapter_only:
        adapter_file = out / f"{stem}-lora-f16.gguf"
        base_dir = _merged_folder(find_target(found.model_cfg.name, found.model_cfg), device)
        lora_dir = found.adapter_dir
        if found.model_cfg.adapter_scale != 1.0:
            lora_dir = scratch / "adapter"
            shutil.copytree(
                found.adapter_dir, lora_dir, ignore=shutil.ignore_patterns("*.pt", "*.pth", "*.bin")
            )
            scale_adapter_config(lora_dir, found.model_cfg.adapter_scale)
        tools.convert_lora(lora_dir, base_dir, adapter_file)
        files = [adapter_file.name]
        if verify:
            base_gguf = scratch / "base-f16.gguf"
            base_stage = scratch / "base"
            _stage_for_converter(base_dir, base_stage, jinja)
            tools.convert(base_stage, base_gguf, "f16")
            verification |= compare_with_llama_cpp(
                tools, base_gguf, merged_dir, template, device, "lora", lora=adapter_file
            )
    else:
        gguf_file = out / f"{stem}-{quant}.gguf"
        if quant in ("f16", "q8_0"):
            log.info("converting %s to GGUF %s with llama.cpp's converter", merged_dir, quant)
            tools.convert(stage, gguf_file, quant)
        else:
            log.info("converting %s to GGUF %s with llama.cpp's converter", merged_dir, "f16")
            tools.convert(stage, scratch / "f16.gguf", "f16")
            log.info("quantizing to %s with llama-quantize", quant)
            tools.quantize(scratch / "f16.gguf", gguf_file, quant)
        files = [gguf_file.name]
        verification["gguf"] = check_gguf(gguf_file, jinja, eos_id, tokenizer, template)
        if verify:
            verification |= compare_with_llama_cpp(tools, gguf_file, merged_dir, template, device, quant)
    shutil.rmtree(scratch)
    result = ExportResult(out, files, verification)
    result.verification["template"] = template
    result.verification["stop_tokens"] = _stop_texts(
        tokenizer, sorted({eos_id, tokenizer.eos_token_id} - {None})
    )
    main = files[0]
    result.commands = (
        [
            f"qlora-llm export {found.model_cfg.name} --format gguf --out base  # the base model as GGUF, once",
            f"llama-cli -m base/*.gguf --lora {main}",
            f"llama-server -m base/*.gguf --lora {main} --jinja",
        ]
        if adapter_only
        else [f"llama-cli -m {main}", f"llama-server -m {main} --jinja"]
    )
    return result


def _write_modelfile(found: Any, out: Path, result: ExportResult, tokenizer: Any) -> list[str]:
    """Ollama's Modelfile: FROM the GGUF, the run's template as TEMPLATE, its stop tokens and sampling."""
    settings = _run_settings(found).serve
    go = ollama_template(result.verification["template"], tokenizer)
    if '"""' in go:
        raise ExportError(
            "the template contains three double quotes in a row, which a Modelfile cannot quote."
        )
    lines = [f"FROM ./{result.files[0]}", f'TEMPLATE """{go}"""']
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in result.verification["stop_tokens"]]
    lines += [
        f"PARAMETER temperature {settings.temperature}",
        f"PARAMETER top_p {settings.top_p}",
        f"PARAMETER num_predict {settings.max_new_tokens}",
    ]
    (out / "Modelfile").write_text("\n".join(lines) + "\n")
    name = export_name(found)
    return [f"ollama create {name} -f Modelfile", f"ollama run {name}"]


def check_vllm_adapter(adapter_dir: Path) -> int:
    """The `--max-lora-rank` vLLM needs for this adapter, or an ExportError naming what vLLM would refuse."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    problems = []
    rank = int(config.get("r", 0))
    if rank > VLLM_LORA_RANKS[-1]:
        problems.append(
            f"rank {rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]}): train with a smaller lora.r"
        )
    if config.get("use_dora"):
        problems.append("DoRA adapters are not supported by vLLM: train with lora.use_dora=false")
    if config.get("modules_to_save"):
        problems.append(
            f"modules_to_save ({', '.join(config['modules_to_save'])}) are not LoRA weights and vLLM does not load them: train without them"
        )
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("LoRA biases are not loaded by vLLM: train without them (bias 'none')")
    if problems:
        raise ExportError(
            f"{adapter_dir}: vLLM would refuse this adapter: "
            + "; ".join(problems)
            + ". Or export with --merged (serves the merged model, no LoRA)."
        )
    return next(r for r in VLLM_LORA_RANKS if r >= rank)


def scale_adapter_config(folder: Path, scale: float) -> None:
    """Bake `model.adapter_scale` into an exported adapter: its alphas times the scale.

    LoRA's delta is (alpha / r) x B A (alpha / sqrt(r) with rsLoRA): linear in alpha, so a copy whose
    alphas are scaled is W0 + scale x delta in any runtime that reads adapter_config.json (vLLM,
    llama.cpp's converter), with no runtime flag to remember. Scale 1 leaves the file as it is.
    """
    if scale == 1.0:
        return
    path = Path(folder) / "adapter_config.json"
    config = json.loads(path.read_text())
    config["lora_alpha"] = config["lora_alpha"] * scale
    config["alpha_pattern"] = {k: v * scale for k, v in (config.get("alpha_pattern") or {}).items()}
    path.write_text(json.dumps(config, indent=2) + "\n")
    log.info("adapter exported at scale %g (model.adapter_scale): lora_alpha %g", scale, config["lora_alpha"])


def _export_vllm(found: Any, out: Path, final: Path, *, merged: bool, device: str) -> ExportResult:
    """`out` is the folder being written; `final` where it will be (the command names final paths)."""
    from qlora_llm.model import resolve_model

    name = export_name(found)
    if merged or found.adapter_dir is None:
        source = _merged_folder(found, device)
        shutil.copytree(source, out / "model")
        template, tokenizer = _template_and_tokenizer(out / "model", found)
        cmd = ["vllm", "serve", str(final / "model"), "--served-model-name", name]
        files = ["model/"]
        verification: dict[str, Any] = {"merged": "verified by qlora-llm merge (merge_verification.json)"}
    else:
        rank_limit = check_vllm_adapter(found.adapter_dir)
        shutil.copytree(
            found.adapter_dir,
            out / "adapter",
            ignore=shutil.ignore_patterns(
                "optimizer.pt", "scheduler.pt", "rng_state*.pth", "training_args.bin", "trainer_state.json"
            ),
        )
        scale_adapter_config(out / "adapter", found.model_cfg.adapter_scale)
        template, tokenizer = _template_and_tokenizer(out / "adapter", found)
        base = Path(resolve_model(found.model_cfg.name, found.model_cfg.cache_dir))
        base_arg = str(base.resolve()) if base.exists() else found.model_cfg.name
        cmd = [
            "vllm",
            "serve",
            base_arg,
            "--enable-lora",
            "--lora-modules",
            f"{name}={final / 'adapter'}",
            "--max-lora-rank",
            str(rank_limit),
        ]
        files = ["adapter/"]
        verification = {"adapter": f"rank and options accepted by vLLM (--max-lora-rank {rank_limit})"}
    (out / "chat_template.jinja").write_text(chat_template_jinja(template, tokenizer))
    cmd += ["--chat-template", str(final / "chat_template.jinja")]
    verification["template"] = template
    return ExportResult(out, [*files, "chat_template.jinja"], verification, [shlex.join(cmd)])


def _export_md(found: Any, fmt: str, quant: str | None, out_dir: Path, result: ExportResult) -> str:
    """EXPORT.md: what the files are, how they were verified, and the commands to run them."""
    v = result.verification
    what = {
        "gguf": f"GGUF ({quant}) for llama.cpp, written by llama.cpp's own converter ({v.get('llama_cpp')})",
        "ollama": f"a GGUF ({quant}) and a Modelfile for Ollama ({v.get('llama_cpp')})",
        "vllm": "a LoRA adapter (or merged model) with its chat template, for vLLM",
    }[fmt]
    lines = [f"# {found.name} exported: {what}", "", "## Files", ""]
    lines += [f"- `{f}`" for f in result.files]
    lines += ["", "## How it was verified", ""]
    if "gguf" in v:
        g = v["gguf"]
        lines.append(
            f"- Read back: the chat template is the run's ({v['template']}), rendering {g['conversations_rendered_identically']} "
            f"of {len(CHECK_CONVERSATIONS)} test conversations exactly as qlora-llm does; EOS id {g['eos_token_id']}."
        )
    if "teacher_forced" in v:
        f, lim = v["teacher_forced"], v["teacher_forced"]["limits"]
        lines.append(
            f"- Run in llama.cpp on the same tokens as transformers (teacher-forced: {f['texts']} benchmark prompts, each with "
            f"transformers' greedy answer; {f['positions']} answer positions compared): top-1 agreement "
            f"{f['decisive_agreement']:.1%} on the {f['decisive']} decisive positions (transformers' top-1 leads by >= "
            f"{f['decisive_margin']:.1f} nats; required >= {lim['min_decisive_agreement']:.0%}), {f['top1_agreement']:.1%} on all "
            f"({f['near_tie_flips']} near-ties flipped); mean KL {f['mean_kl']:.2g} nats (allowed <= {lim['max_mean_kl']:g}), "
            f"max {f['max_kl']:.2g}; log-prob of transformers' choice differs by {f['mean_abs_logprob_diff']:.2g} on average, "
            f"{f['max_abs_logprob_diff']:.2g} at most."
        )
    if "greedy" in v:
        g = v["greedy"]
        lines.append(
            f"- Free-running in llama.cpp (reported, not required: greedy texts part at the first near-tie a rounding flips): "
            f"agreeing tokens per prompt {g['agree_on_first']} of {g['answer_tokens']}; "
            f"{g['stopped_together']} of {g['transformers_stopped']} answers that ended with EOS ended at the same token in llama.cpp."
        )
    elif fmt != "vllm":
        lines.append("- Not run in llama.cpp (exported with --no-verify).")
    for key in ("adapter", "merged"):
        if key in v:
            lines.append(f"- {v[key]}.")
    if fmt == "ollama":
        lines.append(
            "- The Modelfile's TEMPLATE is built from the run's template and renders the same prompts (tested with Go's text/template)."
        )
    if v.get("stop_tokens"):
        lines.append(f"- Stop tokens: {', '.join(f'`{s}`' for s in v['stop_tokens'])}.")
    lines += ["", "## Run it", "", f"From `{out_dir}`:", "", "```sh", *result.commands, "```", ""]
    return "\n".join(lines)
