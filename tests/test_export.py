"""Exports: the template travels (Jinja for GGUF/vLLM, Go for Ollama), vLLM's refusals, and the real llama.cpp."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from qlora_llm.export import (
    CHECK_CONVERSATIONS,
    MISTRAL_JINJA,
    VERIFY_LIMITS,
    ExportError,
    check_vllm_adapter,
    compare_logits,
    divergence,
    export,
    ollama_template,
    render_jinja,
)
from qlora_llm.templates import render_prompt

# SmolLM2-135M-Instruct's own chat template (ChatML with a default system prompt), as it ships.
CHATML_WITH_DEFAULT_SYSTEM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Ollama executes TEMPLATE with Go's text/template over {.Messages}; this runs the real thing.
GO_RENDERER = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	src, err := os.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	var conversations [][]Message
	if err := json.NewDecoder(os.Stdin).Decode(&conversations); err != nil {
		panic(err)
	}
	t := template.Must(template.New("Modelfile").Parse(string(src)))
	out := []string{}
	for _, messages := range conversations {
		var b strings.Builder
		if err := t.Execute(&b, map[string]any{"Messages": messages}); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """Render a Go template over conversations with Go's own text/template (CI installs Debian's golang-go)."""
    if shutil.which("go") is None:
        if os.environ.get("CI"):
            pytest.fail("Go is missing: .ci/run installs golang-go for the Ollama template test")
        pytest.skip("needs Go (apt-get install golang-go) to run Ollama's template engine")
    folder = tmp_path_factory.mktemp("go-render")
    (folder / "main.go").write_text(GO_RENDERER)
    env = {**os.environ, "GOCACHE": str(folder / "cache"), "GO111MODULE": "off", "GOFLAGS": ""}
    subprocess.run(
        ["go", "build", "-o", str(folder / "render"), str(folder / "main.go")], check=True, env=env
    )

    def render(template: str, conversations: list) -> list[str]:
        (folder / "template.txt").write_text(template)
        done = subprocess.run(
            [str(folder / "render"), str(folder / "template.txt")],
            input=json.dumps(conversations),
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(done.stdout)

    return render


@pytest.fixture
def chatml_tokenizer(mistral_tokenizer):
    tokenizer = mistral_tokenizer.__class__.from_pretrained(mistral_tokenizer.name_or_path)
    tokenizer.chat_template = CHATML_WITH_DEFAULT_SYSTEM
    return tokenizer


def test_the_mistral_jinja_renders_every_conversation_as_our_template(mistral_tokenizer):
    """What GGUF and vLLM carry for template=mistral is our [INST] format, system message and BOS included."""
    for conversation in CHECK_CONVERSATIONS:
        ours = render_prompt(conversation, "mistral", mistral_tokenizer)
        assert render_jinja(MISTRAL_JINJA, conversation, mistral_tokenizer) == ours
    assert render_prompt(CHECK_CONVERSATIONS[1], "mistral", mistral_tokenizer) == (
        "[INST] Be brief.\n\nName a colour. [/INST]"
    )


@pytest.mark.parametrize("template", ["mistral", "auto"])
def test_the_ollama_template_renders_as_ours_in_go(template, mistral_tokenizer, chatml_tokenizer, go_render):
    """Our template, as the Modelfile's TEMPLATE, gives the same prompt text under Go's text/template."""
    tokenizer = mistral_tokenizer if template == "mistral" else chatml_tokenizer
    go = ollama_template(template, tokenizer)
    ours = [render_prompt(c, template, tokenizer) for c in CHECK_CONVERSATIONS]
    assert go_render(go, CHECK_CONVERSATIONS) == ours
    if template == "auto":  # the model's default system prompt is kept when the user gives none
        assert ours[0].startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
        assert ours[0].endswith("<|im_start|>user\nHi there.<|im_end|>\n<|im_start|>assistant\n")


def test_a_template_that_repeats_the_message_cannot_become_an_ollama_template(chatml_tokenizer):
    chatml_tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}|{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ExportError, match="the template repeats or drops message contents"):
        ollama_template("auto", chatml_tokenizer)


def _adapter(folder: Path, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 16, "bias": "none"} | config))
    return folder


def test_vllm_checks_say_what_vllm_would_refuse(tmp_path):
    assert check_vllm_adapter(_adapter(tmp_path / "a")) == 16
    assert check_vllm_adapter(_adapter(tmp_path / "b", r=20)) == 32  # the next rank vLLM accepts
    with pytest.raises(
        ExportError, match="DoRA adapters are not supported by vLLM: train with lora.use_dora=false"
    ):
        check_vllm_adapter(_adapter(tmp_path / "c", use_dora=True))
    with pytest.raises(ExportError, match=r"modules_to_save \(lm_head\) are not LoRA weights"):
        check_vllm_adapter(_adapter(tmp_path / "d", modules_to_save=["lm_head"]))
    with pytest.raises(ExportError, match="rank 1024 is above vLLM's largest \\(512\\)"):
        check_vllm_adapter(_adapter(tmp_path / "e", r=1024))


def test_vllm_export_of_a_run_has_the_adapter_template_and_command(tiny_run, tmp_path, mistral_tokenizer):
    from peft import PeftConfig

    out = tmp_path / "vllm"
    result = export(tiny_run, "vllm", out_dir=out, device="cpu")
    assert result.out_dir == out and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "adapter" / "optimizer.pt").exists()
    rank = json.loads((tiny_run / "final_adapter" / "adapter_config.json").read_text())["r"]
    assert PeftConfig.from_pretrained(out / "adapter").r == rank == 16
    assert (out / "chat_template.jinja").read_text() == MISTRAL_JINJA
    (command,) = result.commands
    name = tiny_run.name.lower()
    assert f"--enable-lora --lora-modules {name}={out.resolve() / 'adapter'}" in command
    assert re.search(r"--max-lora-rank 16 ", command)
    assert f"--chat-template {out.resolve() / 'chat_template.jinja'}" in command
    assert command in (out / "EXPORT.md").read_text()
    assert json.loads((out / "export.json").read_text())["format"] == "vllm"
    with pytest.raises(ExportError, match="already exists; pass --force to replace it"):
        export(tiny_run, "vllm", out_dir=out, device="cpu")


def test_an_exported_adapter_carries_the_adapter_scale(tiny_run, tmp_path):
    """model.adapter_scale=0.5 (WiSE-FT) is baked into the exported adapter's alphas: loaded by plain PEFT,
    as vLLM would read it, it computes what our scaled model computes, not the unscaled fine-tune."""
    import torch
    from peft import PeftModel

    from qlora_llm.config import load_config
    from qlora_llm.model import load_target

    half = load_config(None, ["model.adapter_scale=0.5", "model.device=cpu"]).model
    out = tmp_path / "vllm"
    export(tiny_run, "vllm", out_dir=out, device="cpu", model_cfg=half)
    alpha = json.loads((tiny_run / "final_adapter" / "adapter_config.json").read_text())["lora_alpha"]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["lora_alpha"] == alpha * 0.5
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    with torch.no_grad():
        ours = load_target(tiny_run, model_cfg=half, device="cpu").model(ids).logits
        full = load_target(tiny_run, device="cpu").model(ids).logits
        base = load_target(tiny_run, device="cpu", adapter=False).model
        exported = PeftModel.from_pretrained(base, str(out / "adapter")).eval()(ids).logits
    assert torch.allclose(exported, ours, atol=1e-5)
    assert not torch.allclose(exported, full, atol=1e-3)


def test_an_export_that_fails_leaves_nothing_under_its_name(tiny_run, tmp_path):
    bad = tmp_path / "dora-run"
    shutil.copytree(tiny_run, bad)
    config = json.loads((bad / "final_adapter" / "adapter_config.json").read_text())
    (bad / "final_adapter" / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(ExportError, match="vLLM would refuse this adapter: DoRA"):
        export(bad, "vllm", device="cpu")
    assert not (bad / "export-vllm").exists()
    assert not [p for p in bad.iterdir() if p.name.startswith(".export-vllm")]


def test_greedy_reference_answers_are_computed_once_per_merge(tmp_path):
    """Exports of one merged model reuse transformers' answers; new weights or other prompts recompute them."""
    from qlora_llm.export import ANSWERS_FILE, _reference_answers

    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "model.safetensors").write_bytes(b"weights")
    calls = []

    def generate(text="an answer"):
        calls.append(text)
        return [{"text": text, "ids": [5, 2], "tokens": 2, "finish_reason": "stop"}]

    cpu = "cpu torch.float32"
    first = _reference_answers(merged, [[1, 2, 3]], cpu, generate)
    assert _reference_answers(merged, [[1, 2, 3]], cpu, generate) == first and len(calls) == 1
    assert (
        _reference_answers(merged, [[1, 2, 4]], cpu, generate) == first and len(calls) == 2
    )  # other prompts
    assert _reference_answers(merged, [[1, 2, 4]], "cuda:0 torch.bfloat16", generate) and len(calls) == 3
    (merged / "model.safetensors").write_bytes(b"merged again, other weights")
    again = _reference_answers(merged, [[1, 2, 4]], cpu, lambda: generate("another answer"))
    assert again[0]["text"] == "another answer" and len(calls) == 4
    assert [p.name for p in merged.iterdir() if p.name.startswith(".")] == []  # no partial file left
    (merged / ANSWERS_FILE).write_text("{half a file")
    assert _reference_answers(merged, [[1, 2, 4]], cpu, generate) == first and len(calls) == 5


def test_near_ties_may_flip_but_a_decisive_flip_or_a_large_kl_is_a_divergence():
    """The teacher-forced check on logits with near-ties: rounding flips a near-tie, never a clear choice."""
    import torch

    torch.manual_seed(0)
    reference = torch.randn(40, 50)
    reference[:20, 7] = (
        reference[:20].max(-1).values + 3.0
    )  # 20 decisive positions: token 7 leads by >= 3 nats
    top = reference[20:].max(-1).values
    reference[20:, 3], reference[20:, 4] = top + 1.0, top + 1.0 - 1e-3  # 20 near-ties: 3 leads 4 by 0.001
    rounded = reference.clone()
    rounded[20:, 4] += 2e-3  # what f16 rounding can do: every near-tie flips
    figures = compare_logits(reference, rounded)
    assert (figures["decisive"], figures["decisive_flips"], figures["near_tie_flips"]) == (20, 0, 20)
    assert figures["decisive_agreement"] == 1.0 and figures["top1_agreement"] == 0.5
    assert figures["largest_flipped_lead"] == pytest.approx(1e-3, abs=1e-5)
    assert divergence(figures, VERIFY_LIMITS["f16"]) is None  # free-running greedy text would part here

    wrong = reference.clone()
    wrong[:2, 7] -= 6.0  # two clear choices changed: a different model, not rounding
    figures = compare_logits(reference, wrong)
    assert figures["decisive_flips"] == 2 and figures["decisive_agreement"] == 0.9
    assert 0.001 < figures["mean_kl"] < 0.3  # within 4-bit's allowance, far outside f16's
    assert divergence(figures, VERIFY_LIMITS["q4_k_m"]) is None
    assert divergence(figures, VERIFY_LIMITS["f16"]) == (
        "top-1 agreement 90.0% on the 20 decisive positions (lead >= 1.0 nats; 2 flipped), below the 100% required; "
        f"mean KL {figures['mean_kl']:.3g} nats, above the 0.001 allowed"
    )


@pytest.mark.slow
def test_a_real_run_exported_to_gguf_computes_in_llama_cpp_what_it_computes_in_transformers(
    smollm2_run, tmp_path, go_render, monkeypatch
):
    """The real SmolLM2 run, through llama.cpp's converter and its own tools (built here from the pinned
    source): on the same tokens (benchmark prompts with transformers' greedy answers), each GGUF's logits
    agree with transformers' within its format's limits, and EXPORT.md says by how much; the Ollama
    q4_k_m export renders our template in Go; the GGUF adapter loads with --lora. And a GGUF that computes
    another model (the final norm's sign flipped in what the converter reads) is refused, nothing written.
    One test: the tools are built once (minutes), and every export shares the run's merge."""
    from gguf import GGUFReader
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    import qlora_llm.export as qexport

    # A copy: the export merges into RUN/merged first, and the shared run must stay as the merge test expects it.
    run = tmp_path / "run"
    shutil.copytree(smollm2_run, run, ignore=shutil.ignore_patterns("checkpoint-*", "merged", "eval"))
    f16 = export(run, "gguf", quant="f16", out_dir=tmp_path / "f16", device="cpu")
    forced = f16.verification["teacher_forced"]
    assert forced["texts"] == 4 and forced["tokenized_alike"] == 4 and forced["positions"] >= 40
    assert forced["decisive_agreement"] == 1.0 and forced["mean_kl"] < 1e-3, forced
    assert forced["max_abs_logprob_diff"] < 0.1  # f16 weights round log-probs by hundredths, no more
    assert len(f16.verification["greedy"]["agree_on_first"]) == 4  # free-running: reported
    reader = GGUFReader(str(tmp_path / "f16" / f16.files[0]))
    assert reader.fields["tokenizer.chat_template"].contents().startswith("{% for message in messages %}")
    md = (tmp_path / "f16" / "EXPORT.md").read_text()
    assert f"top-1 agreement 100.0% on the {forced['decisive']} decisive positions" in md

    q8 = export(run, "gguf", quant="q8_0", out_dir=tmp_path / "q8", device="cpu")
    assert q8.verification["greedy"]["answer_tokens"] == f16.verification["greedy"]["answer_tokens"]
    assert (tmp_path / "q8" / q8.files[0]).stat().st_size < 0.6 * (
        tmp_path / "f16" / f16.files[0]
    ).stat().st_size
    # 8-bit weights cost more than f16 rounding, and less than its limit.
    assert (
        forced["mean_kl"]
        < q8.verification["teacher_forced"]["mean_kl"]
        < VERIFY_LIMITS["q8_0"]["max_mean_kl"]
    )

    ollama = export(run, "ollama", quant="q4_k_m", out_dir=tmp_path / "ollama", device="cpu", verify=False)
    modelfile = (tmp_path / "ollama" / "Modelfile").read_text()
    assert modelfile.startswith(f'FROM ./{ollama.files[0]}\nTEMPLATE """')
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    go_template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    tokenizer = AutoTokenizer.from_pretrained(run / "final_adapter")
    ours = [render_prompt(c, "auto", tokenizer) for c in CHECK_CONVERSATIONS]
    assert go_render(go_template, CHECK_CONVERSATIONS) == ours
    assert (tmp_path / "ollama" / ollama.files[0]).stat().st_size < 0.4 * (
        tmp_path / "f16" / f16.files[0]
    ).stat().st_size

    lora = export(run, "gguf", adapter_only=True, out_dir=tmp_path / "lora", device="cpu")
    assert GGUFReader(str(tmp_path / "lora" / lora.files[0])).fields["general.type"].contents() == "adapter"
    assert lora.verification["teacher_forced"]["decisive_agreement"] == 1.0

    # The q8_0 check above ran the tools built without AMX: with it, ggml's AMX int8 kernel died with SIGILL
    # on a Xeon VM that advertises AMX. objdump comes with the compiler the build needed.
    from qlora_llm.llamacpp import BUILD_NAME, LlamaCpp, _no_amx_flags
    from qlora_llm.model import find_target

    if _no_amx_flags() and shutil.which("objdump"):
        # The tools the exports above built and ran (the default cache: export was given no model config),
        # not a second build of them.
        tool = LlamaCpp(find_target(run).model_cfg.cache_dir).root / f"bin-{BUILD_NAME}" / "llama-results"
        assert tool.is_file()
        code = subprocess.run(["objdump", "-d", str(tool)], capture_output=True, text=True, check=True).stdout
        assert not re.search(r"\s(tilezero|tileloadd|tdpbssd|ldtilecfg)\s", code)

    stage_for_converter = qexport._stage_for_converter

    def broken_stage(merged, stage, jinja):
        stage_for_converter(merged, stage, jinja)
        weights = load_file(stage / "model.safetensors")
        weights["model.norm.weight"] = -weights["model.norm.weight"]
        (stage / "model.safetensors").unlink()  # a link to the merged model, which must stay as it is
        save_file(weights, stage / "model.safetensors", metadata={"format": "pt"})

    monkeypatch.setattr(qexport, "_stage_for_converter", broken_stage)
    with pytest.raises(
        ExportError,
        match=r"^the f16 GGUF does not compute the model it was made from: on the same tokens \(\d+ answer "
        r"positions of 4 benchmark prompts\), llama.cpp's logits differ from transformers': top-1 agreement "
        r"0\.0% on the \d+ decisive positions .* Nothing was written\.$",
    ):
        export(run, "gguf", quant="f16", out_dir=tmp_path / "refused", device="cpu")
    assert not (tmp_path / "refused").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no partial folder
    monkeypatch.undo()

    # ggml's kernels were compiled at -O3, the rest at -O1 (a shorter build; the same outputs).
    build = LlamaCpp(find_target(run).model_cfg.cache_dir).root / f"build-{BUILD_NAME}"
    commands = {
        Path(c["file"]).name: c["command"] for c in json.loads((build / "compile_commands.json").read_text())
    }
    assert " -O3 " in commands["ops.cpp"] and " -O3 " in commands["ggml-quants.c"]
    assert " -O1 " in commands["llama-model.cpp"] and " -O3 " not in commands["arg.cpp"]


def test_an_export_that_dies_mid_write_leaves_the_previous_one_intact(tiny_run, tmp_path, monkeypatch):
    import qlora_llm.export as qexport

    out = tmp_path / "vllm"
    export(tiny_run, "vllm", out_dir=out, device="cpu")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def dies_after_the_adapter(found, folder, final, **kwargs):
        shutil.copytree(found.adapter_dir, folder / "adapter")
        raise KeyboardInterrupt  # as Ctrl-C or a kill would, halfway through writing

    monkeypatch.setattr(qexport, "_export_vllm", dies_after_the_adapter)
    with pytest.raises(KeyboardInterrupt):
        export(tiny_run, "vllm", out_dir=out, device="cpu", force=True)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["vllm"]  # no half-written folder beside it


def test_an_export_remerges_when_the_adapter_changed_since_the_last_merge(tiny_run, tmp_path):
    """RUN/merged is reused only if it was merged from these adapter weights (by SHA-256)."""
    from safetensors.torch import load_file, save_file

    from qlora_llm.fingerprint import sha256_file

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("merged", "export-*"))
    export(run, "vllm", merged=True, out_dir=tmp_path / "first", device="cpu")
    weights = run / "final_adapter" / "adapter_model.safetensors"
    first = json.loads((run / "merged" / "merge_verification.json").read_text())
    assert first["adapter_sha256"] == sha256_file(weights)
    tensors = load_file(str(weights))
    save_file({k: v * 2 for k, v in tensors.items()}, str(weights))  # as a retrain would change them
    export(run, "vllm", merged=True, out_dir=tmp_path / "second", device="cpu")
    second = json.loads((run / "merged" / "merge_verification.json").read_text())
    assert second["adapter_sha256"] == sha256_file(weights) != first["adapter_sha256"]
