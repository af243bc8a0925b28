"""Dynamic batching: requests that arrive together are decoded together, token by token.

On a CPU a 135M model's forward pass costs about the same for 1 row as for 8 (per-layer overhead
dominates), so decoding concurrent requests as one batch multiplies throughput. transformers'
`generate()` cannot serve this: one batch shares one max_new_tokens, one temperature and one stopping
rule, and offers no per-row streaming or cancellation. So the decode loop is written here: left-padded
prompts, one KV cache, per-row sampling (temperature, top_p, seed), per-row stop tokens and limits, a
text delta per token to each request's asyncio queue, and a cancel flag checked before every token.
Offline greedy decoding (evaluation, merge and export checks, self-replay) is one function,
`qlora_llm.generate.generate_greedy`, batched through `generate()`: its rows all start together, share
one limit and need no streaming. The server keeps this sampler for what that one cannot do: rows that
join and leave mid-decode, per-row sampling settings and limits, streaming and cancellation.

The batch is continuous: between two tokens, requests that arrived meanwhile are prefilled and join
the running batch (their KV cache left-padded to the batch's width), and finished rows leave it, so a
short request never waits for a long one. The engine runs in one thread (one model, one batch at a
time). A new batch forms when the first waiting request has waited `batch_wait_s` or
`max_batch_size` requests are waiting. A batch decodes with one adapter; requests for another wait
until it drains, and nobody joins a batch while a request for another adapter waits (no starvation).
Past `max_queue` requests running or waiting, `submit` refuses.
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

from qlora_llm.errors import QloraError
from qlora_llm.generate import SamplingParams
from qlora_llm.model import LoadedModel

log = logging.getLogger(__name__)


class QueueFull(QloraError, RuntimeError):
    """More requests are running or waiting than the server accepts."""


@dataclass(eq=False)
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
    rng: Any = None
    done: bool = False

    def emit(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the request's event loop is closed: nobody is listening any more
            self.cancel.set()


@dataclass
class _Batch:
    """The rows decoding together and their state between two tokens."""

    jobs: list[Job]
    cache: Any
    """The model's DynamicCache: per layer, keys and values of shape (B, heads, W, head_dim)."""
    attention: Any
    """(B, W): 1 for a real token, 0 for left padding."""
    positions: Any
    """(B, 1): position of each row's last token, counted over its own tokens only."""
    logits: Any
    """(B, vocab): scores of each row's next token."""


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
        self._jobs: list[Job] = []  # waiting, oldest first
        self._running: list[Job] = []  # in the batch being decoded
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="qlora-llm-engine", daemon=True)
        self.prefills = (
            0  # prefill passes so far: a request that joined a running batch adds one (tests read it)
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            for job in self._jobs + self._running:
                job.cancel.set()
            for job in self._jobs:
                job.emit("error", "the server is shutting down")
            self._jobs = []
            self._cond.notify_all()
        self._thread.join(timeout=30)

    @property
    def in_flight(self) -> int:
        with self._cond:
            return len(self._jobs) + len(self._running)

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._jobs) + len(self._running) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already running or waiting")
            self._jobs.append(job)
            self._cond.notify_all()

    # ----------------------------------------------------------------------------------------------

    def _take(self, adapter: str | None, room: int) -> list[Job]:
        """Move up to `room` waiting jobs for `adapter` into the running set (call with the lock held)."""
        taken = [j for j in self._jobs if j.adapter == adapter][:room]
        self._jobs = [j for j in self._jobs if j not in taken]
        self._running += taken
        return taken

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
            return self._take(self._jobs[0].adapter, self.max_batch_size)

    def _joiners(self, adapter: str | None) -> list[Job]:
        """Waiting jobs that may join the running batch now: same adapter, and none other waits first."""
        with self._cond:
            room = self.max_batch_size - len(self._running)
            if room <= 0 or not self._jobs or self._jobs[0].adapter != adapter or self._stop:
                return []
            return self._take(adapter, room)

    def _release(self, job: Job) -> None:
        with self._cond:
            self._running.remove(job)

    def _run(self) -> None:
        while True:
            jobs = self._next_batch()
            if jobs is None:
                return
            try:
                self._decode(jobs)
            except Exception as err:  # one bad batch must not take the server down
                log.exception("generation failed")
                for j in list(self._running):
                    j.emit("error", f"generation failed: {type(err).__name__}")
            finally:
                with self._cond:
                    self._running = []

    def _adapter_context(self, adapter: str | None) -> Any:
        from peft import PeftModel

        model = self.loaded.model
        if not isinstance(model, PeftModel):
            return contextlib.nullcontext()
        if adapter is None:
            return model.disable_adapter()
        model.set_adapter(adapter)
        return contextlib.nullcontext()

    def _decode(self, jobs: list[Job]) -> None:
        import torch

        stops = set(self.loaded.stop_ids)
        adapter = jobs[0].adapter
        with torch.inference_mode(), self._adapter_context(adapter):
            batch = self._prefill(jobs)
            while batch is not None:
                tokens = self._sample(batch.logits, batch.jobs)  # (B,)
                now = time.perf_counter()
                keep = []
                for b, j in enumerate(batch.jobs):
                    token = int(tokens[b])
                    if j.cancel.is_set():
                        self._finish(j, "cancelled")
                    elif token in stops:
                        j.first_token_at = j.first_token_at or now
                        self._finish(j, "stop")
                    else:
                        j.first_token_at = j.first_token_at or now
                        j.generated.append(token)
                        self._emit_delta(j)
                        if len(j.generated) >= j.params.max_new_tokens:
                            self._finish(j, "length")
                        else:
                            keep.append(b)
                batch = self._select(batch, keep)
                if batch is not None:
                    self._step(batch, tokens[keep])
                new = self._prefill(self._joiners(adapter))
                if new is not None:
                    batch = new if batch is None else self._merge(batch, new)

    def _prefill(self, jobs: list[Job]) -> _Batch | None:
        """Run the left-padded prompts of `jobs` through the model: their cache and first logits.

        Jobs cancelled while they waited finish here without touching the model.
        """
        import torch
        from transformers import DynamicCache

        for j in jobs:
            if j.cancel.is_set():
                self._finish(j, "cancelled")
        jobs = [j for j in jobs if not j.done]
        if not jobs:
            return None

        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        pad = tokenizer.pad_token_id  # load_target set one (model.ensure_pad_token)
        device = next(model.parameters()).device
        n, width = len(jobs), max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((n, width), pad, dtype=torch.long)
        attention = torch.zeros(n, width, dtype=torch.long)
        for b, j in enumerate(jobs):
            ids[b, width - len(j.prompt_ids) :] = torch.tensor(j.prompt_ids)
            attention[b, width - len(j.prompt_ids) :] = 1
            seed = j.params.seed if j.params.seed is not None else random.getrandbits(63)
            j.rng = torch.Generator().manual_seed(seed)
        # Left padding: each row's positions count its own tokens only, as if it ran alone.
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        attention, positions = attention.to(device), positions.to(device)
        # A cache of plain full-length layers even for sliding-window models (the model's mask still
        # applies the window): joining and trimming reshape it by hand, which a windowed layer forbids.
        out = self.loaded.model(
            input_ids=ids.to(device),
            attention_mask=attention,
            position_ids=positions,
            cache=DynamicCache(),
            use_cache=True,
            logits_to_keep=1,
        )
        self.prefills += 1
        return _Batch(list(jobs), out.cache, attention, positions[:, -1:], out.logits[:, -1, :])

    def _step(self, batch: _Batch, tokens: Any) -> None:
        """Feed each row its sampled token: the batch's cache grows by one and its logits move on."""
        import torch

        n = len(batch.jobs)
        if self.metrics is not None:
            self.metrics.batch_size.observe(n)
        batch.attention = torch.cat([batch.attention, batch.attention.new_ones(n, 1)], dim=1)
        batch.positions = batch.positions + 1
        out = self.loaded.model(
            input_ids=tokens.view(n, 1).to(batch.attention.device),
            attention_mask=batch.attention,
            position_ids=batch.positions,
            cache=batch.cache,
            use_cache=True,
        )
        batch.cache, batch.logits = out.cache, out.logits[:, -1, :]

    @staticmethod
    def _select(batch: _Batch, keep: list[int]) -> _Batch | None:
        """Only the rows in `keep`; padding columns no remaining row needs are cut off the left."""
        import torch

        if not keep:
            return None
        if len(keep) < len(batch.jobs):
            index = torch.tensor(keep, device=batch.attention.device)
            batch.jobs = [batch.jobs[b] for b in keep]
            batch.attention, batch.positions = batch.attention[index], batch.positions[index]
            batch.logits = batch.logits[index]
            for layer in batch.cache.layers:
                layer.batch_select_indices(index)
        unused = int(batch.attention.any(0).long().argmax())  # leading columns padding in every row
        if unused:
            batch.attention = batch.attention[:, unused:]
            for layer in batch.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
        return batch

    @staticmethod
    def _merge(batch: _Batch, new: _Batch) -> _Batch:
        """One batch of both: the narrower one's cache and mask are left-padded to the wider one's width."""
        import torch
        import torch.nn.functional as F

        width = max(batch.attention.shape[1], new.attention.shape[1])

        def widen(x: Any, dim_from_end: int) -> Any:
            pad = width - x.shape[-dim_from_end]
            return x if pad == 0 else F.pad(x, (0, 0) * (dim_from_end - 1) + (pad, 0))

        for old_layer, new_layer in zip(batch.cache.layers, new.cache.layers, strict=True):
            old_layer.keys = torch.cat([widen(old_layer.keys, 2), widen(new_layer.keys, 2)])
            old_layer.values = torch.cat([widen(old_layer.values, 2), widen(new_layer.values, 2)])
        batch.jobs += new.jobs
        batch.attention = torch.cat([widen(batch.attention, 1), widen(new.attention, 1)])
        batch.positions = torch.cat([batch.positions, new.positions])
        batch.logits = torch.cat([batch.logits, new.logits])
        return batch

    @staticmethod
    def _sample(logits: Any, jobs: list[Job]) -> Any:
        import torch

        picked = []
        for b, j in enumerate(jobs):
            row = logits[b].float().cpu()
            if j.params.greedy:
                picked.append(int(row.argmax()))
                continue
            probs = torch.softmax(row / j.params.temperature, dim=-1)
            if j.params.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
                drop = sorted_probs.cumsum(0) - sorted_probs > j.params.top_p
                sorted_probs[drop] = 0.0
                probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
            picked.append(int(torch.multinomial(probs, 1, generator=j.rng)))
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
        job.text, job.done = text, True
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
        self._release(job)
        job.emit("done", result)
