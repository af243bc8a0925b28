"""generate.generate_greedy: the one batched greedy decoding path (evaluate, merge, export, replay)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from qlora_llm.generate import generate_greedy
from qlora_llm.model import ensure_pad_token


@pytest.fixture(scope="module")
def tiny(tiny_mistral, mistral_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_mistral, dtype=torch.float32).eval()
    return model, mistral_tokenizer


def prompts_of(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(100, 30000, (n - 1,), generator=g).tolist() for n in lengths]


def one_by_one(model, prompt: list[int], max_new: int, stops: set[int]) -> list[int]:
    """The definition: no padding, no mask, no cache, the whole sequence re-run for every token."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            out.append(token)
            if token in stops:
                break
    return out


def test_batched_greedy_equals_one_at_a_time_and_padding_does_not_leak(tiny):
    model, tokenizer = tiny
    prompts = prompts_of([3, 21, 8, 30, 5, 13])  # one batch of 3 holds rows 3 and 21 tokens long
    max_new = 10
    # A stop id that one row meets early while others run to the limit: both finish reasons in one batch.
    free = [one_by_one(model, p, max_new, set()) for p in prompts]
    stop = free[1][3]
    stops = {stop}
    expected = [one_by_one(model, p, max_new, stops) for p in prompts]
    reasons = ["stop" if e[-1] == stop else "length" for e in expected]
    assert "stop" in reasons and "length" in reasons  # the test exercises both
    ensure_pad_token(tokenizer)  # as load_target does: the pad is UNK here, never the stop id
    loaded = SimpleNamespace(model=model, tokenizer=tokenizer, stop_ids=[stop])

    for batch_size in (1, 3, 6):
        got = generate_greedy(loaded, prompts, max_new_tokens=max_new, batch_size=batch_size)
        assert [a["ids"] for a in got] == expected, f"batch_size={batch_size}"
        assert [a["finish_reason"] for a in got] == reasons
        assert [a["tokens"] for a in got] == [len(e) for e in expected]
        # Cut at the stop id: the pads generated after a row stopped never reach its text.
        texts = [tokenizer.decode(e, skip_special_tokens=True).strip() for e in expected]
        assert [a["text"] for a in got] == texts


def test_answers_come_back_in_the_callers_order(tiny):
    model, tokenizer = tiny
    prompts = prompts_of([25, 4, 12], seed=1)  # sorted internally to 4, 12, 25
    loaded = SimpleNamespace(model=model, tokenizer=tokenizer, stop_ids=[tokenizer.eos_token_id])
    got = generate_greedy(loaded, prompts, max_new_tokens=4, batch_size=2)
    alone = [generate_greedy(loaded, [p], max_new_tokens=4, batch_size=1)[0] for p in prompts]
    assert [a["ids"] for a in got] == [a["ids"] for a in alone]
    assert len({tuple(a["ids"]) for a in alone}) == 3  # distinct answers, so a reordering would show
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        generate_greedy(loaded, prompts, max_new_tokens=4, batch_size=0)


def test_the_speed_benchmark_times_the_same_number_of_tokens_whatever_the_answer_length(tiny):
    from qlora_llm.evaluate import speed_benchmark

    model, tokenizer = tiny
    prompt = prompts_of([9], seed=2)[0]
    stop = one_by_one(model, prompt, 1, set())[0]  # the model's first answer token: it stops at once
    ensure_pad_token(tokenizer)
    loaded = SimpleNamespace(model=model, tokenizer=tokenizer, stop_ids=[stop], device="cpu")
    answered = generate_greedy(loaded, [prompt], max_new_tokens=6, batch_size=1)[0]
    assert answered["tokens"] == 1 and answered["finish_reason"] == "stop"
    # A model that stops early is timed on as many tokens as one that runs to the limit.
    speed = speed_benchmark(loaded, prompt, max_new_tokens=6, runs=2, warmup=0)
    assert speed["generated_tokens"] == [6, 6]
    assert speed["tokens_per_s"]["p50"] > 0 and speed["time_per_output_token_s"]["p50"] > 0
