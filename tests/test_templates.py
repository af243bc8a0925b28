"""Templates: the seed's Mistral format exactly, checked token by token with the real Mistral tokenizer."""

from __future__ import annotations

import pytest

from qlora_llm.templates import render, render_prompt

BOS, EOS = 1, 2
INST = [733, 16289, 28793]  # "[INST]" as mistral-common's v1 tokenizer encodes it
END_INST = [733, 28748, 16289, 28793]  # " [/INST]"

SEED = {"instruction": "Summarize the paper.", "input": "We study LoRA.", "output": "It studies LoRA."}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
}


def _count(ids, sub):
    return sum(ids[i : i + len(sub)] == sub for i in range(len(ids)))


def test_seed_format_exact_text():
    assert (
        render(SEED).text == "<s>[INST] Summarize the paper.\n\nWe study LoRA. [/INST] It studies LoRA.</s>"
    )
    no_input = {**SEED, "input": ""}
    assert render(no_input).text == "<s>[INST] Summarize the paper. [/INST] It studies LoRA.</s>"


def test_prompt_and_completion_apart_and_bos_not_in_text(mistral_tokenizer):
    r = render(SEED, "mistral", mistral_tokenizer)
    assert r.bos == "<s>"
    assert r.prompt == "[INST] Summarize the paper.\n\nWe study LoRA. [/INST]"
    assert r.completion == " It studies LoRA.</s>"


def test_asset_encodes_like_mistral_common(mistral_tokenizer):
    assert mistral_tokenizer("<s>[INST]", add_special_tokens=False)["input_ids"] == [BOS, *INST]


@pytest.mark.parametrize("example", [SEED, {**SEED, "input": ""}, CHAT], ids=["seed", "no-input", "chat"])
def test_token_ids_one_bos_inst_markers_and_eos_last(mistral_tokenizer, example):
    r = render(example, "mistral", mistral_tokenizer)
    ids = mistral_tokenizer(r.prompt + r.completion)["input_ids"]
    assert ids.count(BOS) == 1 and ids[0] == BOS
    assert ids[1:4] == INST
    turns = len([m for m in example.get("messages", [{"role": "user"}]) if m["role"] == "user"])
    assert _count(ids, INST) == turns and _count(ids, END_INST) == turns
    assert ids[-1] == EOS
    # Prompt tokens are a prefix of the whole: masking the prompt by its length masks exactly the prompt.
    prompt_ids = mistral_tokenizer(r.prompt)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    assert EOS not in ids[: len(prompt_ids)] or "messages" in example


def test_multi_turn_matches_mistral_chat_template(mistral_tokenizer):
    r = render(CHAT, "mistral", mistral_tokenizer)
    assert r.text == "<s>[INST] Be brief.\n\nHi there [/INST] Hello.</s>[INST] What is 2+2? [/INST] 4</s>"
    assert r.text == mistral_tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    assert r.completion == " 4</s>"


def test_render_prompt_for_generation(mistral_tokenizer):
    prompt = render_prompt([{"role": "user", "content": "Hi"}], "mistral", mistral_tokenizer)
    assert prompt == "[INST] Hi [/INST]"


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_auto_uses_models_own_template_and_ends_on_eos(mistral_tokenizer):
    import copy

    tok = copy.deepcopy(mistral_tokenizer)
    tok.chat_template = CHATML.replace("<|im_end|>", "</s>")
    r = render(SEED, "auto", tok)
    assert r.prompt == "<|im_start|>user\nSummarize the paper.\n\nWe study LoRA.</s>\n<|im_start|>assistant\n"
    assert r.completion == "It studies LoRA.</s>"  # the template's trailing newline after EOS is not learned
    assert tok(r.prompt + r.completion)["input_ids"][-1] == EOS


def test_auto_without_chat_template_says_what_to_do(mistral_tokenizer):
    import copy

    tok = copy.deepcopy(mistral_tokenizer)
    tok.chat_template = None
    with pytest.raises(ValueError, match="has none. Use model.template=mistral"):
        render(SEED, "auto", tok)
