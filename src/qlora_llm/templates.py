"""Prompt formats: the one place that turns an example into the text a model sees.

Two templates:
- `mistral`: the seed's format, exactly `<s>[INST] {instruction}\\n\\n{input} [/INST] {output}</s>`
  (`<s>[INST] {instruction} [/INST] {output}</s>` when input is empty); multi-turn conversations as
  Mistral-Instruct writes them: `<s>[INST] u1 [/INST] a1</s>[INST] u2 [/INST] a2</s>`.
- `auto`: the tokenizer's own chat template (SmolLM2's is ChatML).
`default` picks one of them per tokenizer (`resolve_template`): the model's own chat template when it
has one, the seed's format when it has none or when its own is Mistral's `[INST]` format.

`render` returns the prompt and the completion apart, because training learns only the completion.
The BOS text is kept apart too: the tokenizer adds BOS itself, so passing `<s>` as text as well would
start every example with two BOS tokens.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Literal

TemplateName = Literal["default", "mistral", "auto"]
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Rendered:
    prompt: str
    """Everything before the answer, without the BOS text (the tokenizer adds BOS)."""
    completion: str
    """The answer the model learns, ending with the EOS text."""
    bos: str = ""
    """The BOS text the tokenizer adds in front ("" when it adds none)."""

    @property
    def text(self) -> str:
        """The whole example as the model sees it, BOS included: for display and checks."""
        return self.bos + self.prompt + self.completion


def to_messages(example: dict[str, Any]) -> list[dict[str, str]]:
    """A canonical record (seed fields or `messages`) as a chat: the instruction and input make one user turn."""
    if "messages" in example:
        return example["messages"]
    user = example["instruction"]
    if example.get("input"):
        user = f"{user}\n\n{example['input']}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": example["output"]}]


_ADDS_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def adds_bos(tokenizer: Any) -> bool:
    """Whether `tokenizer(text)` puts BOS in front by itself (Mistral/Llama yes, SmolLM2 no).

    Asked once per tokenizer: rendering 100k records would otherwise tokenize "a" 100k times.
    """
    known = _ADDS_BOS.get(tokenizer)
    if known is None:
        bos_id = tokenizer.bos_token_id
        ids = tokenizer("a", add_special_tokens=True)["input_ids"] if bos_id is not None else []
        known = _ADDS_BOS[tokenizer] = len(ids) > 0 and ids[0] == bos_id
    return known


def _special_texts(tokenizer: Any | None) -> tuple[str, str]:
    """(BOS text the tokenizer adds, EOS text); the seed's `<s>`/`</s>` when no tokenizer is given."""
    if tokenizer is None:
        return "<s>", "</s>"
    bos = tokenizer.bos_token if adds_bos(tokenizer) else ""
    return bos or "", tokenizer.eos_token or ""


def _mistral_turns(messages: list[dict[str, str]]) -> list[tuple[str, str]]:
    """[(user text, assistant text), ...]; a leading system message joins the first user turn."""
    turns = []
    system = None
    pending_user = None
    for m in messages:
        if m["role"] == "system":
            system = m["content"]
        elif m["role"] == "user":
            pending_user = f"{system}\n\n{m['content']}" if system and not turns else m["content"]
        else:
            turns.append((pending_user or "", m["content"]))
            pending_user = None
    return turns


def _render_mistral(messages: list[dict[str, str]], bos: str, eos: str) -> Rendered:
    turns = _mistral_turns(messages)
    history = "".join(f"[INST] {u} [/INST] {a}{eos}" for u, a in turns[:-1])
    user, answer = turns[-1]
    return Rendered(prompt=f"{history}[INST] {user} [/INST]", completion=f" {answer}{eos}", bos=bos)


def _render_auto(messages: list[dict[str, str]], tokenizer: Any, bos: str, eos: str) -> Rendered:
    if not tokenizer.chat_template:
        raise ValueError(
            f"template 'auto' needs a chat template, and the tokenizer of {tokenizer.name_or_path!r} "
            "has none. Use model.template=mistral."
        )
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(
            f"the chat template of {tokenizer.name_or_path!r} renders the conversation differently with and "
            "without the answer, so prompt and completion cannot be separated. Use model.template=mistral."
        )
    completion = full[len(prompt) :]
    # Many templates end a turn with EOS plus a newline; the example must end on EOS, which is learned.
    cut = completion.rfind(eos) if eos else -1
    if cut >= 0 and not completion[cut + len(eos) :].strip():
        completion = completion[: cut + len(eos)]
    else:
        completion = completion.rstrip() + eos
    if bos and prompt.startswith(bos):
        prompt = prompt[len(bos) :]  # the tokenizer adds BOS itself
    return Rendered(prompt=prompt, completion=completion, bos=bos)


def resolve_template(template: str, tokenizer: Any | None) -> Literal["mistral", "auto"]:
    """`default` -> `auto` for a tokenizer with its own (non-[INST]) chat template, else `mistral`."""
    if template != "default":
        return template  # type: ignore[return-value]
    own = getattr(tokenizer, "chat_template", None)
    return "auto" if isinstance(own, str) and own and "[INST]" not in own else "mistral"


def render(
    example: dict[str, Any], template: TemplateName = "mistral", tokenizer: Any | None = None
) -> Rendered:
    """Render one canonical record (as `prepare` writes them) for training or scoring."""
    bos, eos = _special_texts(tokenizer)
    messages = to_messages(example)
    template = resolve_template(template, tokenizer)
    if template == "mistral":
        return _render_mistral(messages, bos, eos)
    if tokenizer is None:
        raise ValueError("template 'auto' needs the model's tokenizer")
    return _render_auto(messages, tokenizer, bos, eos)


def render_prompt(
    messages: list[dict[str, str]], template: TemplateName = "mistral", tokenizer: Any | None = None
) -> str:
    """The generation prompt for a conversation ending with a user turn (BOS not included)."""
    placeholder = [*messages, {"role": "assistant", "content": "x"}]
    return render({"messages": placeholder}, template, tokenizer).prompt
