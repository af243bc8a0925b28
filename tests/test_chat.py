"""The single-shot and chat modes, through the CLI and the seed's scripts/inference.py."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_llm.chat import chat_loop
from qlora_llm.cli import main
from qlora_llm.generate import Generator, SamplingParams

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def generator(tiny_run) -> Generator:
    return Generator.load(tiny_run, device="cpu")


def test_generator_prompts_as_the_run_was_trained(generator, mistral_tokenizer):
    assert generator.loaded.template == "mistral" and generator.stop_ids == [mistral_tokenizer.eos_token_id]
    ids = generator.encode("What comes after a?")
    assert ids == mistral_tokenizer("[INST] What comes after a? [/INST]")["input_ids"]
    assert ids[:2] == [1, 733]  # one BOS, then "[INST]": never a second BOS from the text


def test_generate_prints_an_answer_and_greedy_is_deterministic(tiny_run, capsys, monkeypatch):
    flags = ["--temperature", "0", "--max-new-tokens", "6"]
    assert main(["generate", str(tiny_run), "What comes after a?", *flags]) == 0
    first = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("What comes after a?"))
    assert main(["generate", str(tiny_run), "-", *flags]) == 0  # the prompt from stdin, same answer
    assert capsys.readouterr().out == first and first.strip()


def test_generate_rejects_bad_sampling_and_an_empty_prompt_before_loading(tiny_run, capsys):
    assert main(["generate", str(tiny_run), "hi", "--temperature", "5"]) == 2
    assert "serve.temperature: Input should be less than or equal to 2 (got 5.0)" in capsys.readouterr().err
    assert main(["generate", str(tiny_run), "hi", "--max-new-tokens", "0"]) == 2
    assert "serve.max_new_tokens: Input should be greater than 0" in capsys.readouterr().err
    assert main(["generate", str(tiny_run), "  "]) == 2
    assert "error: the prompt is empty" in capsys.readouterr().err


def test_sampling_with_a_seed_repeats_and_stream_equals_generate(generator):
    params = SamplingParams(max_new_tokens=8, temperature=0.7, top_p=0.9, seed=3)
    assert generator.generate("hello", params).text == generator.generate("hello", params).text
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    pieces = generator.stream("hello", greedy)
    text = ""
    try:
        while True:
            text += next(pieces)
    except StopIteration as done:
        completion = done.value
    assert text == completion.text == generator.generate("hello", greedy).text
    assert completion.finish_reason in ("stop", "length") and completion.completion_tokens <= 8


def test_closing_a_stream_cancels_generation(generator):
    stream = generator.stream("hello", SamplingParams(max_new_tokens=500, temperature=1.0, seed=0))
    next(stream)
    stream.close()  # what Ctrl-C in chat does: generation stops at the next token
    assert not generator.lock.locked()


def test_chat_loop_keeps_history_resets_and_exits(generator):
    seen = []
    real_stream = generator.stream

    def spy(messages, params):
        seen.append([dict(m) for m in messages])
        return real_stream(messages, params)

    generator.stream = spy
    lines = iter(["hello", "and then?", "/reset", "again", "/nope", "/exit", "never read"])
    out = []
    try:
        history = chat_loop(
            generator,
            SamplingParams(max_new_tokens=4, temperature=0),
            read=lambda _: next(lines),
            write=out.append,
        )
    finally:
        del generator.stream
    assert [len(m) for m in seen] == [1, 3, 1]  # history sent as messages; /reset forgets it
    assert seen[1][0] == {"role": "user", "content": "hello"} and seen[1][1]["role"] == "assistant"
    assert seen[2] == [{"role": "user", "content": "again"}]
    assert "(conversation reset)\n" in out and any(o.startswith("unknown command /nope") for o in out)
    assert [m["role"] for m in history] == ["user", "assistant"]


def test_ctrl_c_stops_the_answer_not_the_chat(generator):
    class Interrupting:
        def __init__(self):
            self.closed = False

        def __iter__(self):
            yield "partial"
            raise KeyboardInterrupt

        def close(self):
            self.closed = True

    stream = Interrupting()
    generator.stream = lambda messages, params: stream
    lines = iter(["tell me", "/exit"])
    out = []
    try:
        history = chat_loop(generator, SamplingParams(), read=lambda _: next(lines), write=out.append)
    finally:
        del generator.stream
    assert stream.closed and " [stopped]" in out
    assert history == [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": "partial"}]


def test_an_answer_stopped_before_a_word_drops_the_question(generator):
    def interrupted(messages, params):
        raise KeyboardInterrupt  # Ctrl-C before the first piece
        yield

    generator.stream = interrupted
    lines = iter(["first", "/exit"])
    out = []
    try:
        history = chat_loop(generator, SamplingParams(), read=lambda _: next(lines), write=out.append)
    finally:
        del generator.stream
    assert history == [] and " [stopped]" in out


def test_ctrl_c_during_a_real_stream_cancels_the_model(generator):
    streams = []
    real_stream = generator.stream

    def spy(messages, params):
        streams.append(real_stream(messages, params))
        return streams[-1]

    def write(text):
        out.append(text)
        if out[-2:-1] == ["assistant> "]:
            raise KeyboardInterrupt  # Ctrl-C lands while the first piece is printed

    generator.stream = spy
    lines = iter(["tell me a long story", "/exit"])
    out = []
    params = SamplingParams(max_new_tokens=500, temperature=1.0, seed=0)
    try:
        history = chat_loop(generator, params, read=lambda _: next(lines), write=write)
    finally:
        del generator.stream
    assert " [stopped]" in out and streams[0].gi_frame is None  # the stream was closed...
    assert not generator.lock.locked()  # ...and the model thread finished: it is free for the next turn
    assert history[-1] == {"role": "assistant", "content": out[out.index("assistant> ") + 1].strip()}


def test_eof_at_the_prompt_ends_the_chat(generator):
    def eof(_):
        raise EOFError

    assert chat_loop(generator, SamplingParams(), read=eof, write=lambda _: None) == []


def test_seed_scripts_interface_single_mode(tiny_run, capsys):
    flags = ["--temperature", "0", "--max_new_tokens", "4"]
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "inference.py"), "--mode", "single", "--model", str(tiny_run)]
        + ["--prompt", "-not a flag", *flags],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    # The same code as `qlora-llm generate`: the same greedy answer.
    assert (
        main(["generate", str(tiny_run), "--temperature=0", "--max-new-tokens=4", "--", "-not a flag"]) == 0
    )
    assert run.stdout == capsys.readouterr().out and run.stdout.strip()


def test_seed_scripts_interface_says_what_is_missing_and_serves_in_api_mode(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("inference", ROOT / "scripts" / "inference.py")
    inference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(inference)
    with pytest.raises(SystemExit) as exit:
        inference.main(["--mode", "single"])
    assert exit.value.code == 2 and "--mode single needs --prompt" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # no runs/smollm2-aclsum here
    with pytest.raises(SystemExit) as exit:
        inference.main(["--mode", "chat"])
    assert exit.value.code == 2
    assert "no --model given and runs/smollm2-aclsum is not here" in capsys.readouterr().err
    calls = []
    monkeypatch.setattr(
        "qlora_llm.server.app.serve", lambda cfg, target, **kw: calls.append((cfg, target, kw))
    )
    assert inference.main(["--mode", "api", "--model", "some-model", "--port", "9002", "--api-key", "k"]) == 0
    cfg, target, kw = calls[0]
    assert (target, cfg.serve.port, kw["api_key"]) == ("some-model", 9002, "k")


def test_chat_cli_reads_the_terminal_and_streams(tiny_run, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("What comes after a?\n/reset\n/exit\n"))
    assert main(["chat", str(tiny_run), "--temperature", "0", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Commands: /reset") and "assistant> " in out and "(conversation reset)" in out


def test_serve_cli_passes_target_adapters_key_and_address(tiny_run, tiny_mistral, monkeypatch):
    calls = []
    monkeypatch.setattr(
        "qlora_llm.server.app.serve",
        lambda cfg, target, *, adapters, api_key: calls.append((cfg, target, adapters, api_key)),
    )
    monkeypatch.setenv("QLORA_LLM_API_KEY", "from-env")
    args = ["serve", str(tiny_run), "--adapter", "a=runs/x", "--port", "9001", "serve.max_queue=4"]
    assert main(args) == 0
    cfg, target, adapters, key = calls[-1]
    assert (target, adapters, key) == (str(tiny_run), {"a": Path("runs/x")}, "from-env")
    assert (cfg.serve.host, cfg.serve.port, cfg.serve.max_queue) == ("127.0.0.1", 9001, 4)
    assert cfg.model.name == str(tiny_mistral)  # the run's own config.yaml was read
    assert main([*args, "--api-key", "flag"]) == 0 and calls[-1][3] == "flag"  # the flag wins over the env
    with pytest.raises(SystemExit) as exit:
        main(["serve", str(tiny_run), "--port", "9001", "--bogus"])
    assert exit.value.code == 2 and len(calls) == 2


def test_serve_cli_rejects_a_bad_adapter_flag(tiny_run, capsys):
    assert main(["serve", str(tiny_run), "--adapter", "nopath"]) == 2
    assert "--adapter 'nopath': expected NAME=PATH" in capsys.readouterr().err
