"""One Generator, used by `qlora-llm chat`, `qlora-llm generate`, the server and the evaluation.

It loads a target once (a run folder, an adapter folder, a merged model or a model name), prompts the
model exactly as it was trained (the template and stop tokens recorded in the run's manifest), and
generates: all at once, or streamed piece by piece. Any call can be cancelled between two tokens.

    gen = Generator.load("runs/smollm2-aclsum")
    print(gen.generate("Summarize: ...", SamplingParams(max_new_tokens=64, temperature=0)).text)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from qlora_llm.model import LoadedModel, load_target
from qlora_llm.templates import render_prompt

log = logging.getLogger(__name__)

Prompt = str | list[dict[str, str]]
"""A user message, or a conversation (role/content dicts) ending with a user turn."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 0.7
    """0 is greedy and deterministic."""
    top_p: float = 0.9
    seed: int | None = None
    """Seed for sampling; None draws from the global RNG."""
    ignore_eos: bool = False
    """Generate exactly max_new_tokens, stop tokens suppressed: a fixed amount of work, for timing."""

    @property
    def greedy(self) -> bool:
        # Below 1e-4 sampling is greedy in effect, and dividing logits by a tiny (or denormal) temperature
        # overflows to inf, which softmax turns into NaN: found by schemathesis with temperature=2e-313.
        return self.temperature < 1e-4


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length", "cancelled"]
    """`stop`: the model ended with a stop token; `length`: max_new_tokens reached."""
    time_to_first_token_s: float | None
    total_s: float
    token_ids: list[int] = field(default_factory=list)


class _Cancel:
    """A StoppingCriteria that ends generation at the next token once `event` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


class _Clock:
    """A streamer that only timestamps the first generated token (generate's first `put` is the prompt)."""

    def __init__(self, sync: Any):
        self.calls, self.first, self.sync = 0, None, sync

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:
            self.sync()
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


class Generator:
    """A loaded model plus the way it was trained to be prompted."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.stop_ids = loaded.stop_ids
        # generate() is not thread-safe on one model; callers that share a Generator go through this lock.
        self.lock = threading.Lock()

    @classmethod
    def load(
        cls, target: str | Path, *, model_cfg: Any = None, device: str = "auto", quantization: str = "none"
    ) -> Generator:
        return cls(load_target(target, model_cfg=model_cfg, device=device, quantization=quantization))

    @property
    def context_length(self) -> int:
        return self.loaded.context_length

    def encode(self, prompt: Prompt) -> list[int]:
        """Prompt token ids, rendered by the run's template exactly as training rendered its prompts."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = render_prompt(messages, self.loaded.template, self.tokenizer)
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def _sync(self) -> None:
        import torch

        if self.loaded.device == "cuda":
            torch.cuda.synchronize()

    def _generate_kwargs(
        self, ids: list[int], params: SamplingParams, cancel: threading.Event | None
    ) -> dict:
        import torch
        from transformers import StoppingCriteriaList

        input_ids = torch.tensor([ids], device=self.model.device)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "max_new_tokens": params.max_new_tokens,
            "eos_token_id": self.stop_ids,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if params.ignore_eos:
            kwargs["min_new_tokens"] = params.max_new_tokens
        if params.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=None)
        if cancel is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancel(cancel)])
        if params.seed is not None:
            torch.manual_seed(params.seed)
        return kwargs

    def _finish(
        self, ids: list[int], out: list[int], params: SamplingParams, cancelled: bool
    ) -> tuple[str, str]:
        if out and out[-1] in self.stop_ids:
            reason = "stop"
        elif cancelled:
            reason = "cancelled"
        else:
            reason = "length" if len(out) >= params.max_new_tokens else "stop"
        return self.tokenizer.decode(out, skip_special_tokens=True), reason

    def generate(
        self,
        prompt: Prompt | list[int],
        params: SamplingParams | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> Completion:
        """The whole answer at once. `prompt` may also be token ids from `encode`."""
        import torch

        params = params or SamplingParams()
        ids = (
            prompt
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], int)
            else self.encode(prompt)
        )
        clock = _Clock(self._sync)
        with self.lock, torch.inference_mode():
            self._sync()
            start = time.perf_counter()
            output = self.model.generate(**self._generate_kwargs(ids, params, cancel), streamer=clock)
            self._sync()
            total = time.perf_counter() - start
        out = output[0, len(ids) :].tolist()
        text, reason = self._finish(ids, out, params, cancel is not None and cancel.is_set())
        ttft = None if clock.first is None else clock.first - start
        return Completion(text, len(ids), len(out), reason, ttft, total, out)

    def stream(
        self,
        prompt: Prompt | list[int],
        params: SamplingParams | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> Iterator[str]:
        """Text pieces as they are generated; the generator's return value is the `Completion`.

        Closing the iterator early (a client went away, Ctrl-C) stops generation at the next token.
        """
        from transformers import TextIteratorStreamer

        params = params or SamplingParams()
        ids = (
            prompt
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], int)
            else self.encode(prompt)
        )
        cancel = cancel or threading.Event()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, Any] = {}

        def work() -> None:
            import torch

            try:
                with self.lock, torch.inference_mode():
                    result["start"] = time.perf_counter()
                    kwargs = self._generate_kwargs(ids, params, cancel)
                    result["output"] = self.model.generate(**kwargs, streamer=streamer)
            except BaseException as err:  # surfaced in the consuming thread below
                result["error"] = err
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        first, finished = None, False
        try:
            # Started inside the try: a Ctrl-C right after start must still cancel and join it.
            thread.start()
            for piece in streamer:
                if first is None:
                    first = time.perf_counter()
                if piece:
                    yield piece
            finished = True
        finally:
            if not finished:  # closed early: stop the model at its next token
                cancel.set()
            if thread.ident is not None:
                thread.join()
        if "error" in result:
            raise result["error"]
        out = result["output"][0, len(ids) :].tolist()
        text, reason = self._finish(ids, out, params, cancel.is_set())
        start = result["start"]
        return Completion(
            text,
            len(ids),
            len(out),
            reason,
            None if first is None else first - start,
            time.perf_counter() - start,
            out,
        )


def generate_greedy(
    loaded: LoadedModel,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 4,
    desc: str = "generating",
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Greedy answers to many prompts (token ids), `batch_size` rows per `generate` call.

    The one greedy decoding path for offline work: evaluation, benchmark prompts, merge and export
    verification, self-replay. Prompts are sorted by length so a batch wastes little padding, left-padded
    with an attention mask (transformers derives each row's position ids from it, so padding changes no
    answer beyond float rounding: tests/test_generate.py checks batched == one at a time), and returned
    in the caller's order. Each answer: `text` (stripped, special tokens removed), `ids` (up to and
    including the stop token), `tokens` (len of ids) and `finish_reason`: `stop` when a stop id ended it,
    `length` when max_new_tokens did. The server keeps its own sampler (server/engine.py says why).
    """
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    model, tokenizer, stops = loaded.model, loaded.tokenizer, set(loaded.stop_ids)
    pad = tokenizer.pad_token_id  # load_target set one (model.ensure_pad_token)
    order = sorted(range(len(prompts)), key=lambda k: len(prompts[k]))
    out: list[dict[str, Any]] = [{} for _ in prompts]
    device = next(model.parameters()).device
    bar = tqdm(total=len(prompts), desc=desc, unit="answer", disable=not progress, leave=False)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(prompts[k]) for k in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros(len(batch), width, dtype=torch.long)
            for b, k in enumerate(batch):
                ids[b, width - len(prompts[k]) :] = torch.tensor(prompts[k])
                attention[b, width - len(prompts[k]) :] = 1
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=sorted(stops),
                pad_token_id=pad,
            )[:, width:].tolist()
            for b, k in enumerate(batch):
                # A row that stopped early is padded to the batch's longest answer: cut at its stop id.
                new = generated[b]
                end = next((j for j, t in enumerate(new) if t in stops), None)
                kept = new if end is None else new[: end + 1]
                out[k] = {
                    "text": tokenizer.decode(kept, skip_special_tokens=True).strip(),
                    "tokens": len(kept),
                    "ids": kept,
                    "finish_reason": "length" if end is None else "stop",
                }
            bar.update(len(batch))
    bar.close()
    log.debug("%s: %d greedy answers, %d per batch", desc, len(prompts), batch_size)
    return out
