"""Dynamic batching: requests that arrive together are decoded together, token by token.

On a CPU a 135M model's forward pass costs about the same for 1 row as for 8 (per-layer overhead
dominates), so decoding concurrent requests as one batch multiplies throughput. transformers'
`generate()` cannot serve this: one batch shares one max_new_tokens, one temperature and one stopping
rule, and offers no per-row streaming or cancellation. So the decode loop is written here: left-padded
prompts, one KV cache, per-row sampling (temperature, top_p, seed), per-row stop tokens and limits, a
text delta per token to each request's asyncio queue, and a cancel flag checked before every token.

The engine runs in one thread (one model, one batch at a time). A batch forms when the first waiting
request has waited `batch_wait_s` or `max_batch_size` requests are waiting; requests for another
adapter wait for the next batch. Past `max_queue` requests running or waiting, `submit` refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from qlora_llm.generate import SamplingParams
from qlora_llm.model import LoadedModel

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More requests are running or waiting than the server accepts."""


@dataclass
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None
    """PEFT adapter name to decode with; None = the model with every adapter disabled."""
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    generated: list[int] = field(default_factory=list)
    text: str = ""
    first_token_at: float | None = None

    def emit(self, kind: str, value: Any) -> None:
        # The request's event loop may be gone (server shutting down): nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_batch_size: int = 8,
        batch_wait_s: float = 0.01,
        max_queue: int = 32,
        metrics: Any = None,
    ):
        self.loaded = loaded
        self.max_batch_size, self.batch_wait_s, self.max_queue = max_batch_size, batch_wait_s, max_queue
        self.metrics = metrics
        self._jobs: list[Job] = []
        self._running = 0
        self._current: list[Job] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="qlora-llm-engine", daemon=True)
        self.batches = 0  # batches decoded so far (tests and the bench read it)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            for job in self._jobs + self._current:
                job.cancel.set()
            self._cond.notify_all()
        self._thread.join(timeout=30)

    @property
    def in_flight(self) -> int:
        with self._cond:
            return len(self._jobs) + self._running

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._jobs) + self._running >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already running or waiting")
            self._jobs.append(job)
            self._cond.notify_all()

    # ----------------------------------------------------------------------------------------------

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._jobs and not self._stop:
                self._cond.wait(timeout=0.5)
            if self._stop:
                return None
            deadline = self._jobs[0].submitted + self.batch_wait_s
            while len(self._jobs) < self.max_batch_size and not self._stop:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(timeout=left)
            adapter = self._jobs[0].adapter
            batch = [j for j in self._jobs if j.adapter == adapter][: self.max_batch_size]
            self._jobs = [j for j in self._jobs if j not in batch]
            self._running, self._current = len(batch), batch
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                live = [j for j in batch if not j.cancel.is_set()]
                for j in batch:
                    if j.cancel.is_set():
                        self._finish(j, "cancelled")
                if live:
                    self._decode(live)
            except Exception as err:  # one bad batch must not take the server down
                log.exception("generation failed")
                for j in batch:
                    j.emit("error", f"generation failed: {type(err).__name__}")
            finally:
                with self._cond:
                    self._running, self._current = 0, []

    def _adapter_context(self, adapter: str | None) -> Any:
        model = self.loaded.model
        if not hasattr(model, "peft_config"):
            return contextlib.nullcontext()
        if adapter is None:
            return model.disable_adapter()
        model.set_adapter(adapter)
        return contextlib.nullcontext()

    def _decode(self, jobs: list[Job]) -> None:
        import torch

        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        stops = set(self.loaded.stop_ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.loaded.stop_ids[0]
        device = next(model.parameters()).device
        n, width = len(jobs), max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((n, width), pad, dtype=torch.long)
        attention = torch.zeros(n, width, dtype=torch.long)
        for b, j in enumerate(jobs):
            ids[b, width - len(j.prompt_ids) :] = torch.tensor(j.prompt_ids)
            attention[b, width - len(j.prompt_ids) :] = 1
        # Left padding: each row's positions count its own tokens only, as if it ran alone.
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        rngs = [
            torch.Generator().manual_seed(
                j.params.seed if j.params.seed is not None else random.getrandbits(63)
            )
            for j in jobs
        ]
        active = [True] * n
        self.batches += 1
        if self.metrics is not None:
            self.metrics.batch_size.observe(n)
        with torch.inference_mode(), self._adapter_context(jobs[0].adapter):
            attention, positions = attention.to(device), positions.to(device)
            out = model(
                input_ids=ids.to(device),
                attention_mask=attention,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
            )
            while True:
                tokens = self._sample(out.logits[:, -1, :], jobs, rngs)  # (n,)
                now = time.perf_counter()
                for b, j in enumerate(jobs):
                    if not active[b]:
                        continue
                    if j.cancel.is_set():
                        active[b] = False
                        self._finish(j, "cancelled")
                        continue
                    token = int(tokens[b])
                    if j.first_token_at is None:
                        j.first_token_at = now
                    if token in stops:
                        active[b] = False
                        self._finish(j, "stop")
                        continue
                    j.generated.append(token)
                    self._emit_delta(j)
                    if len(j.generated) >= j.params.max_new_tokens:
                        active[b] = False
                        self._finish(j, "length")
                if not any(active):
                    return
                attention = torch.cat([attention, attention.new_ones(n, 1)], dim=1)
                positions = positions[:, -1:] + 1
                out = model(
                    input_ids=tokens.view(n, 1).to(device),
                    attention_mask=attention,
                    position_ids=positions,
                    cache=out.cache,
                    use_cache=True,
                )

    @staticmethod
    def _sample(logits: Any, jobs: list[Job], rngs: list[Any]) -> Any:
        import torch

        picked = []
        for b, j in enumerate(jobs):
            row = logits[b].float().cpu()
            if j.params.temperature == 0:
                picked.append(int(row.argmax()))
                continue
            probs = torch.softmax(row / j.params.temperature, dim=-1)
            if j.params.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
                drop = sorted_probs.cumsum(0) - sorted_probs > j.params.top_p
                sorted_probs[drop] = 0.0
                probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
            picked.append(int(torch.multinomial(probs, 1, generator=rngs[b])))
        return torch.tensor(picked)

    def _emit_delta(self, job: Job) -> None:
        text = self.loaded.tokenizer.decode(job.generated, skip_special_tokens=True)
        # A multi-byte character split across tokens decodes as U+FFFD until its last piece arrives.
        if text.endswith("\ufffd") or not text.startswith(job.text):
            return
        delta, job.text = text[len(job.text) :], text
        if delta:
            job.emit("delta", delta)

    def _finish(self, job: Job, reason: str) -> None:
        text = self.loaded.tokenizer.decode(job.generated, skip_special_tokens=True)
        if text.startswith(job.text) and len(text) > len(job.text):
            job.emit("delta", text[len(job.text) :])
        job.text = text
        now = time.perf_counter()
        result = {
            "text": text,
            "finish_reason": reason,
            "prompt_tokens": len(job.prompt_ids),
            "completion_tokens": len(job.generated),
            "time_to_first_token_s": None
            if job.first_token_at is None
            else job.first_token_at - job.submitted,
            "latency_s": now - job.submitted,
        }
        if self.metrics is not None:
            self.metrics.observe_generation(result)
        job.emit("done", result)
