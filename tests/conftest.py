"""Shared fixtures: the real Mistral tokenizer and a tiny random-weight Mistral model, built once per session.

Everything here is offline: the tokenizer is the real Mistral-7B-Instruct v0.1/v0.2 tokenizer from
mistral-common that the package ships (src/qlora_llm/assets/tokenizers/), and the model is built from `MistralConfig`
with random weights, so the exact `[INST]` path is exercised without a download.
"""

from __future__ import annotations

import atexit
import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

# Caches the code writes under ~ (converted models, reused base evaluations) go to a fresh folder,
# removed when the suite exits: it holds ~1 GB of converted models, and CI machines share their disk.
os.environ["HOME"] = tempfile.mkdtemp(prefix="qlora-llm-test-home-")
atexit.register(shutil.rmtree, os.environ["HOME"], ignore_errors=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `compute_dtype: auto` picks bf16 for training on CPUs that compute it natively (a probe decides): the
# suite pins fp32 so its numbers are the same on every host; tests/test_model.py covers the probe and
# tests/test_trainer.py a bf16 run.
os.environ.setdefault("QLORA_LLM_CPU_AUTO_DTYPE", "float32")
# Library calls in the suite get the bounded kernel caches the CLI sets (src/qlora_llm/allocator.py).
from qlora_llm.allocator import bound_kernel_caches  # noqa: E402

bound_kernel_caches()

ROOT = Path(__file__).resolve().parents[1]
MISTRAL_TOKENIZER = (
    ROOT / "src" / "qlora_llm" / "assets" / "tokenizers" / "mistralai--Mistral-7B-Instruct-v0.2"
)


# Helpers the test files share (`from conftest import free_port, lora_state, read_metrics`).


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_tmpdir_env(tmp: Path) -> dict[str, str]:
    """os.environ for a subprocess whose temporary directory is `tmp` (made here), so a test can check the
    process left nothing there; torch.compile's cache stays where it was (inductor's default is in the
    temporary directory), warm."""
    tmp.mkdir(exist_ok=True)
    inductor = Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}"
    return {"TORCHINDUCTOR_CACHE_DIR": str(inductor), **os.environ, "TMPDIR": str(tmp)}


def lora_state(folder: Path) -> dict:
    """An adapter folder's LoRA tensors by name."""
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def read_metrics(run: Path) -> list[dict]:
    """A run's metrics.jsonl, one dict per logged row."""
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def generator(tiny_mistral):
    """The tiny Mistral loaded for serving (test_chat.py overrides it with a trained run)."""
    from qlora_llm.generate import Generator

    return Generator.load(tiny_mistral, device="cpu")


@pytest.fixture(scope="session")
def mistral_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MISTRAL_TOKENIZER)


def _save_tiny_mistral(folder: Path, tokenizer, num_key_value_heads: int) -> Path:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    MistralForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # save_pretrained drops `legacy`; the asset's config is the one that encodes like the Hub's v0.2.
    (folder / "tokenizer_config.json").write_text((MISTRAL_TOKENIZER / "tokenizer_config.json").read_text())
    return folder


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory, mistral_tokenizer) -> Path:
    """A 2-layer, hidden-64 MistralForCausalLM with the real 32k Mistral tokenizer, saved as a HF folder.

    Every projection has a multiple of 32 outputs and of 64 inputs, so its 4-bit layers can take both
    CPU kernels (src/qlora_llm/cpu4bit.py).
    """
    return _save_tiny_mistral(tmp_path_factory.mktemp("tiny-mistral"), mistral_tokenizer, 2)


@pytest.fixture(scope="session")
def tiny_odd(tmp_path_factory, mistral_tokenizer) -> Path:
    """The tiny Mistral with one KV head: k_proj and v_proj have 16 outputs, too few for the fused layout."""
    return _save_tiny_mistral(tmp_path_factory.mktemp("tiny-odd"), mistral_tokenizer, 1)


def reference_fused_gemv(A, B, out=None, state=None, **_):
    """What bitsandbytes' fused CPU kernel computes, in plain torch: for hosts without AVX512-BF16.

    Undo the block-of-32 repacking, look the 4-bit codes up in the NF4/FP4 table, scale by the bf16
    block constants, and multiply in bf16 with fp32 accumulation. On a host with the instructions,
    test_cpu4bit checks it against the real kernel.
    """
    import copy

    import torch
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    data, _ = _convert_weight_packed_for_cpu_inverse(B.clone(), copy.deepcopy(state))
    packed = data.view(torch.uint8).reshape(-1)
    codes = torch.empty(packed.numel() * 2, dtype=torch.long)
    codes[::2], codes[1::2] = (packed >> 4).long(), (packed & 0xF).long()
    n, k = state.shape
    scale = state.absmax.T.float().repeat_interleave(state.blocksize, dim=1)  # (N, K)
    weight = (state.code[codes].reshape(n, k).float() * scale).to(torch.bfloat16).float()
    return (A.to(torch.bfloat16).float() @ weight.T).to(torch.bfloat16).to(A.dtype)


@pytest.fixture(scope="session", autouse=True)
def _cpu_without_avx512bf16():
    """QLORA_LLM_TEST_NO_AVX512BF16=1 runs the suite as on a CPU without AVX512-BF16 (auto -> plain).

    bitsandbytes' own switch is off on every 4-bit layer anyway (cpu4bit.py); what differs on such a CPU
    is our choice, and `cpu_kernel` still emulates the fused kernel where a test asks for it.
    """
    if os.environ.get("QLORA_LLM_TEST_NO_AVX512BF16") != "1":
        yield
        return
    import qlora_llm.cpu4bit as cpu4bit

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu4bit, "fused_kernel_available", lambda: False)
        yield


@pytest.fixture(params=["fused", "plain"])
def cpu_kernel(request) -> Iterator[str]:
    """Both 4-bit CPU kernels on any host: `model.cpu_4bit_kernel=<this>`.

    Where the CPU has no AVX512-BF16, `fused` runs with the kernel replaced by `reference_fused_gemv`,
    so the repacking, the train/eval switches and the odd-shape handling are exercised everywhere. Its
    own MonkeyPatch: a test's `monkeypatch.undo()` must not take the emulation away mid-test.
    """
    import bitsandbytes.functional as bnb_functional

    import qlora_llm.cpu4bit as cpu4bit

    with pytest.MonkeyPatch.context() as mp:
        if request.param == "fused" and not cpu4bit.fused_kernel_available():
            mp.setattr(cpu4bit, "fused_kernel_available", lambda: True)
            mp.setattr(bnb_functional, "gemv_4bit", reference_fused_gemv)
        yield request.param


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> Path:
    """A model cache holding the real SmolLM2-135M-Instruct, converted from the packaged GGUF once."""
    from qlora_llm.model import convert_builtin

    cache = tmp_path_factory.mktemp("qlora-cache")
    convert_builtin("smollm2-135m-instruct", cache)
    return cache


WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


def tiny_overrides(model, data, out, *extra, steps: int, batch: int, every: int) -> list[str]:
    """A short run of the tiny model on `tiny_data`: `every` steps an evaluation and a checkpoint."""
    return [
        f"model.name={model}",
        "model.device=cpu",
        f"data.train_file={data / 'train.jsonl'}",
        f"data.eval_file={data / 'eval.jsonl'}",
        "data.max_seq_length=64",
        f"train.output_dir={out}",
        f"train.max_steps={steps}",
        f"train.batch_size={batch}",
        "train.gradient_accumulation_steps=1",
        f"train.eval_steps={every}",
        f"train.save_steps={every}",
        "train.logging_steps=1",
        "train.learning_rate=1e-2",
        "train.warmup_ratio=0",
        "train.early_stopping_patience=0",
        *extra,
    ]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Short, learnable examples: name the word after a given word (28 train, 4 eval)."""
    folder = tmp_path_factory.mktemp("data")
    rows = [
        {"instruction": f"What comes after {w}?", "input": "", "output": f"{WORDS[(i + 1) % 8]} {i % 3}"}
        for i, w in enumerate(WORDS * 4)
    ]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:28]))
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[28:]))
    return folder


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory) -> Path:
    """Preference pairs on tiny_data's task: the right next word chosen, a wrong one rejected (28 + 4)."""
    folder = tmp_path_factory.mktemp("pairs")
    rows = [
        {
            "prompt": f"What comes after {w}?",
            "chosen": f"{WORDS[(i + 1) % 8]} {i % 3}",
            "rejected": f"{w} {i % 3}",
        }
        for i, w in enumerate(WORDS * 4)
    ]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:28]))
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[28:]))
    return folder


@pytest.fixture(scope="session")
def tiny_run(tiny_mistral, tmp_path_factory) -> Path:
    """A 3-step LoRA run of the tiny Mistral (non-zero adapter, dropout off), with eval data and one benchmark prompt."""
    from qlora_llm.config import load_config
    from qlora_llm.train import train

    folder = tmp_path_factory.mktemp("tiny-run")
    rows = [
        {"instruction": f"What comes after {w}?", "input": "", "output": f"{v} comes after {w}."}
        for w, v in zip("abcdefgh", "bcdefghi", strict=True)
    ] * 3
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:20]))
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[20:]))
    (folder / "bench.json").write_text(
        json.dumps(
            {"prompts": [{"id": "next", "set": "tiny", "prompt": "What comes after a?", "keywords": ["b"]}]}
        )
    )
    cfg = load_config(
        None,
        [
            f"model.name={tiny_mistral}",
            "model.device=cpu",
            f"data.train_file={folder / 'train.jsonl'}",
            f"data.eval_file={folder / 'eval.jsonl'}",
            "data.max_seq_length=64",
            f"train.output_dir={folder / 'run'}",
            "train.max_steps=3",
            "train.batch_size=4",
            "train.eval_steps=3",
            "train.save_steps=3",
            "train.learning_rate=5e-2",
            "train.warmup_ratio=0",
            "lora.dropout=0",
            f"eval.benchmark_prompts={folder / 'bench.json'}",
            "eval.max_new_tokens=4",
            "eval.speed_runs=2",
            # No general benchmarks: lm-eval's tasks cost ~10 s per evaluation of this run (0.7 s without);
            # the tests of them opt in (test_benchmarks.SMALL, test_sweep).
            "eval.general_tasks=[]",
            "eval.general_generative=[]",
        ],
    )
    return train(cfg).run_dir


@pytest.fixture(scope="session")
def smollm2_run(smollm2_cache, tmp_path_factory) -> Path:
    """configs/smollm2-cpu.yaml on the real model (NF4 QLoRA), 2 steps on 8 short ACLSum papers, via the CLI.

    Trained once and shared by the slow evaluate and merge tests, which only read it (and write eval/ and
    merged/ inside it).
    """
    from qlora_llm.cli import main

    folder = tmp_path_factory.mktemp("smollm2-run")
    rows = [json.loads(x) for x in (ROOT / "data" / "aclsum" / "train.jsonl").read_text().splitlines()]
    short = [r for r in rows if len(r["input"]) < 700][:10]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short[:8]))
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short[8:]))
    run = folder / "run"
    overrides = [
        f"model.cache_dir={smollm2_cache}",
        f"data.train_file={folder / 'train.jsonl'}",
        f"data.eval_file={folder / 'eval.jsonl'}",
        f"train.output_dir={run}",
        "train.max_steps=2",
        "train.eval_steps=2",
        "train.save_steps=2",
        "train.batch_size=2",
    ]
    assert main(["train", str(ROOT / "configs" / "smollm2-cpu.yaml"), *overrides]) == 0
    return run


# Training helpers the training test files share (test_train, test_trainer, test_checkpoint, test_monitor,
# test_data, test_cpu4bit): a short run of the tiny model, a perturbed trainer, a run in a child process.

ONE_STEP = ("train.max_steps=1", "train.save_steps=1", "train.eval_steps=1")


def tiny_cfg(tiny_mistral, tiny_data, out, *extra):
    """`tiny_overrides` loaded: 6 steps of 4 examples, an evaluation and a checkpoint every 3."""
    from qlora_llm.config import load_config

    return load_config(None, tiny_overrides(tiny_mistral, tiny_data, out, *extra, steps=6, batch=4, every=3))


def patch_trainer(monkeypatch, mixin: type) -> None:
    """Make train() use `mixin` layered over the real trainer class, to observe or perturb one run."""
    import qlora_llm.trainer as qtrainer

    real = qtrainer.trainer_class
    monkeypatch.setattr(qtrainer, "trainer_class", lambda *a: type(mixin.__name__, (mixin, real(*a)), {}))


def no_partial_files(out: Path) -> None:
    """An interrupted run's folder holds only complete checkpoints: nothing staged or half written."""
    from qlora_llm.checkpoint import complete_checkpoints

    hidden = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert not hidden, hidden  # no staging folder, no temporary adapter
    assert {p.name for p in out.glob("checkpoint-*")} == {p.name for p in complete_checkpoints(out)}


@pytest.fixture(scope="session")
def straight_9(tiny_mistral, tiny_data, tmp_path_factory) -> Path:
    """An uninterrupted 9-step run (checkpoints every 3): what every interrupted run must end equal to."""
    from qlora_llm.train import train

    out = tmp_path_factory.mktemp("straight") / "run"
    train(tiny_cfg(tiny_mistral, tiny_data, out, "train.max_steps=9"))
    return out


def resume_ends_as_straight(tiny_mistral, tiny_data, out: Path, straight: Path) -> None:
    """`--resume auto` finishes the 9-step run, with the adapter the uninterrupted run ended with."""
    from qlora_llm.train import train

    result = train(tiny_cfg(tiny_mistral, tiny_data, out, "train.max_steps=9"), resume="auto")
    assert (result.stopped, result.global_step) == ("completed", 9)
    assert_same_final(out, straight)


def assert_same_final(a: Path, b: Path) -> None:
    """Two runs ended with the same final adapter (to 1e-6)."""
    import torch

    x, y = lora_state(a / "final_adapter"), lora_state(b / "final_adapter")
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=0, atol=1e-6)


TRAIN_SCRIPT = textwrap.dedent("""
    import logging, os, sys, time, torch
    from qlora_llm.config import load_config
    logging.basicConfig(level=logging.INFO)
    from qlora_llm.train import train
    mode, overrides = sys.argv[1], sys.argv[2:]

    def count_writes(die_at):
        # Every write of checkpoint-6's save (files, renames), counted; the die_at-th one is a kill -9.
        import builtins, signal, peft.peft_model as pm
        seen = []
        def event(what, path):
            if "checkpoint-6" in str(path):
                seen.append(f"{what} {path}")
                if len(seen) == die_at:
                    os.kill(os.getpid(), signal.SIGKILL)
        def hook(real, kind, pos=0, writes_only=False):
            def wrapped(*a, **k):
                mode_arg = a[1] if len(a) > 1 else k.get("mode", "r")
                if not writes_only or any(c in str(mode_arg) for c in "wax+"):
                    event(kind, a[pos])
                return real(*a, **k)
            return wrapped
        torch.save = hook(torch.save, "torch.save", pos=1)
        pm.safe_save_file = hook(pm.safe_save_file, "safetensors", pos=1)
        builtins.open = hook(builtins.open, "open", writes_only=True)
        os.replace = hook(os.replace, "replace", pos=1)
        os.rename = hook(os.rename, "rename", pos=1)
        return seen

    if mode.startswith("die-at-writes-"):
        # Kill -9 at write 1, 2, ..., N of checkpoint-6's save, each in a child forked from here after the
        # imports (most of a fresh process's time), two at a time, each into OUT/k<k>/run with its log
        # beside it: prints "EXIT k returncode" per child.
        import trl, peft, transformers  # what train() imports when it runs: imported once, here
        root, running = load_config(None, overrides).train.output_dir, {}
        def reap():
            pid, status = os.wait()
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            print(f"EXIT {running.pop(pid)} {code}", flush=True)
        for k in range(1, int(mode.rsplit("-", 1)[1]) + 1):
            if len(running) == 2:
                reap()
            out = os.path.join(root, f"k{k}", "run")
            os.makedirs(os.path.dirname(out))
            sys.stdout.flush(); sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                log = os.open(os.path.join(os.path.dirname(out), "log.txt"), os.O_WRONLY | os.O_CREAT, 0o644)
                os.dup2(log, 1); os.dup2(log, 2)
                code = 1  # an exception in the child must not return into this loop
                try:
                    torch.set_num_threads(1)  # two children on two cores: one thread each, no OpenMP spinning
                    count_writes(k)
                    code = train(load_config(None, [*overrides, f"train.output_dir={out}"]), resume="auto").exit_code
                finally:
                    sys.stdout.flush(); sys.stderr.flush()
                    os._exit(code)
            running[pid] = k
        while running:
            reap()
        sys.exit(0)
    cfg = load_config(None, overrides)
    if mode == "hang-on-save-6":
        real_save = torch.save
        def slow_save(obj, f, *a, **k):
            if "checkpoint-6" in str(f):
                open(overrides[0].split("=", 1)[1] + ".saving", "w").close()
                time.sleep(600)
            return real_save(obj, f, *a, **k)
        torch.save = slow_save
    seen = count_writes(0) if mode == "count-save-6" else []
    result = train(cfg, resume="auto")
    if mode == "count-save-6":
        print("".join(f"EVENT {e}\\n" for e in seen))
    sys.exit(result.exit_code)
""")


def run_train_script(tmp_path, mode, cfg_args) -> subprocess.Popen:
    """`train(cfg, resume="auto")` in a child process (to kill it), perturbed as TRAIN_SCRIPT's `mode` says."""
    script = tmp_path / "run_train.py"
    script.write_text(TRAIN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen(
        [sys.executable, str(script), mode, *cfg_args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def train_args(tiny_mistral, tiny_data, out, *extra) -> list[str]:
    """The overrides of a 3-step-checkpoint run of the tiny model, for a command line or TRAIN_SCRIPT."""
    # marker path first: the child script derives its ".saving" flag from it
    return [
        f"train.output_dir={out}",
        f"model.name={tiny_mistral}",
        "model.device=cpu",
        f"data.train_file={tiny_data / 'train.jsonl'}",
        f"data.eval_file={tiny_data / 'eval.jsonl'}",
        "data.max_seq_length=64",
        "train.batch_size=4",
        "train.gradient_accumulation_steps=1",
        "train.eval_steps=3",
        "train.save_steps=3",
        "train.logging_steps=1",
        "train.learning_rate=1e-2",
        "train.early_stopping_patience=0",
        *extra,
    ]
