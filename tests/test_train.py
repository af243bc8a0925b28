"""Training: real NF4 QLoRA on CPU with a tiny Mistral; right labels, exact resume, no lost checkpoints."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import WORDS, lora_state, tiny_overrides

from qlora_llm.checkpoint import CHECKPOINT_FILES, complete_checkpoints
from qlora_llm.config import load_config
from qlora_llm.data import tokenize_examples
from qlora_llm.errors import TrainError
from qlora_llm.train import train

ROOT = Path(__file__).resolve().parents[1]
ONE_STEP = ("train.max_steps=1", "train.save_steps=1", "train.eval_steps=1")


def tiny_cfg(tiny_mistral, tiny_data, out, *extra):
    return load_config(None, tiny_overrides(tiny_mistral, tiny_data, out, *extra, steps=6, batch=4, every=3))


def patch_trainer(monkeypatch, mixin: type) -> None:
    """Make train() use `mixin` layered over the real trainer class, to observe or perturb one run."""
    import qlora_llm.trainer as qtrainer

    real = qtrainer.trainer_class
    monkeypatch.setattr(qtrainer, "trainer_class", lambda *a: type(mixin.__name__, (mixin, real(*a)), {}))


def test_token_ids_one_bos_and_completion_mask(mistral_tokenizer):
    records = [
        {"instruction": "Hi", "input": "", "output": "Hello there."},
        {"instruction": "A longer question here", "input": "with input", "output": "Ok."},
    ]
    rows, dropped = tokenize_examples(records, mistral_tokenizer, "mistral", 64)
    assert dropped == 0
    for row, record in zip(rows, records, strict=True):
        ids = row["input_ids"]
        assert ids[0] == 1 and ids.count(1) == 1 and ids[-1] == 2  # one BOS, ends on EOS
        answer = [i for i, m in zip(ids, row["completion_mask"], strict=True) if m]
        assert mistral_tokenizer.decode(answer) == f"{record['output']}</s>"


def test_collated_batch_labels_completion_and_eos_never_padding(
    tiny_mistral, tiny_data, tmp_path, monkeypatch
):
    """The first real batch the trainer feeds the model: which positions carry labels."""
    seen = {}

    class Spy:
        def train(self, *a, **k):
            seen["batch"] = next(iter(self.get_train_dataloader()))
            seen["pad"] = self.processing_class.pad_token_id
            return super().train(*a, **k)

    patch_trainer(monkeypatch, Spy)
    train(
        tiny_cfg(
            tiny_mistral,
            tiny_data,
            tmp_path / "run",
            *ONE_STEP,
            "train.group_by_length=false",
        )
    )
    from qlora_llm.model import load_tokenizer

    batch, tok = seen["batch"], load_tokenizer(str(tiny_mistral))
    assert batch["input_ids"].shape[0] == 4
    for ids, labels, mask in zip(
        batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"].tolist(), strict=True
    ):
        n = sum(mask)
        assert ids[0] == 1 and ids[:n].count(1) == 1 and ids[n - 1] == 2
        learned = [t for t in labels if t != -100]
        text = tok.decode(learned)
        assert text.endswith("</s>") and labels[n - 1] == 2  # EOS is learned
        assert text.removesuffix("</s>").split()[0] in WORDS  # exactly the answer, no prompt token
        first = labels.index(learned[0])
        assert tok.decode(ids[:first]).endswith("[/INST]")
        assert all(x == -100 for x in labels[n:]) and all(x == seen["pad"] for x in ids[n:])


def test_pad_equal_to_eos_keeps_eos_label():
    """SmolLM2's pad token is its EOS: padding is masked by position, so the real EOS keeps its label."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = [
        {"input_ids": [5, 6, 7, 2], "labels": [-100, 6, 7, 2]},
        {"input_ids": [5, 8, 2], "labels": [-100, 8, 2]},
    ]
    batch = DataCollatorForLanguageModeling(pad_token_id=2)(rows)
    assert batch["labels"].tolist() == [[-100, 6, 7, 2], [-100, 8, 2, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_overlong_examples_are_dropped_not_cut(mistral_tokenizer):
    rows, dropped = tokenize_examples(
        [{"instruction": "x " * 100, "input": "", "output": "y"}], mistral_tokenizer, "mistral", 32
    )
    assert rows == [] and dropped == 1


def test_qlora_trains_on_cpu_loss_falls_lora_changes_base_frozen(tiny_mistral, tiny_data, tmp_path):
    from safetensors.torch import load_file

    cfg = tiny_cfg(
        tiny_mistral,
        tiny_data,
        tmp_path / "run",
        "train.max_steps=12",
        "train.save_steps=6",
        "train.eval_steps=6",
    )
    result = train(cfg)
    run = tmp_path / "run"
    assert result.stopped == "completed" and result.global_step == 12 and result.exit_code == 0
    s = result.summary
    assert s["train_loss_last"] < s["train_loss_first"]
    assert s["eval_loss_best"] < s["eval_loss_first"]

    lora = lora_state(run / "final_adapter")
    assert len(lora) == 2 * 7 * 2  # A and B for 7 projections in 2 layers
    assert all(t.dtype == torch.float32 for t in lora.values())
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in lora.items())  # B starts at 0
    base = load_file(str(Path(tiny_mistral) / "model.safetensors"))
    assert base["model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0  # the base file is untouched
    assert {p.name for p in run.iterdir()} == {
        "config.yaml",
        "manifest.json",
        "metrics.jsonl",
        "loss.png",
        "summary.json",
        "final_adapter",
        "checkpoint-6",
        "checkpoint-12",
        "README.md",
    }
    assert set(CHECKPOINT_FILES) <= {p.name for p in (run / "checkpoint-6").iterdir()}
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["tokens"] == {"bos_id": 1, "eos_id": 2, "pad_id": 0, "eos": "</s>"}
    assert manifest["template"]["example"] == "<s>[INST] What comes after alpha? [/INST] beta 0</s>"
    assert manifest["identity"]["lora_r"] == 16 and len(manifest["data"]) == 4
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 13))
    assert all(m["tokens_per_s"] > 0 and m["memory_bytes"] > 0 for m in metrics if "loss" in m)
    assert [m["step"] for m in metrics if "eval_loss" in m] == [0, 6, 12]
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_trainable_weights_are_fp32_on_cpu_despite_trl_cast(tiny_mistral, tiny_data, tmp_path, monkeypatch):

    seen = {}

    class Spy:
        def train(self, *a, **k):
            seen["dtypes"] = {p.dtype for p in self.model.parameters() if p.requires_grad}
            seen["base"] = {
                type(m).__name__ for m in self.model.modules() if "Linear4bit" in type(m).__name__
            }
            return super().train(*a, **k)

    patch_trainer(monkeypatch, Spy)
    train(
        tiny_cfg(
            tiny_mistral,
            tiny_data,
            tmp_path / "run",
            *ONE_STEP,
        )
    )
    assert seen["dtypes"] == {torch.float32}
    assert seen["base"] == {"Linear4bit"}  # it really is QLoRA on a 4-bit base


def test_resume_gives_the_same_weights_as_straight_training(tiny_mistral, tiny_data, tmp_path, monkeypatch):
    """20 steps straight, and 10 + SIGTERM + resume + 10: bit-identical LoRA weights (dropout on)."""
    extra = [
        "train.max_steps=20",
        "train.save_steps=10",
        "train.eval_steps=10",
        "lora.dropout=0.1",
        "train.warmup_ratio=0.2",
    ]
    train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "straight", *extra))

    class Interrupted:
        def training_step(self, *a, **k):
            if self.state.global_step == 9:  # during step 10, as a user's SIGTERM would
                os.kill(os.getpid(), signal.SIGTERM)
            return super().training_step(*a, **k)

    patch_trainer(monkeypatch, Interrupted)
    first = train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "split", *extra))
    assert (first.stopped, first.global_step, first.exit_code) == ("SIGTERM", 10, 143)
    monkeypatch.undo()
    with pytest.raises(TrainError, match="already has checkpoints .* --resume auto"):
        train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "split", *extra))
    second = train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "split", *extra), resume="auto")
    assert (second.stopped, second.global_step) == ("completed", 20)
    a = lora_state(tmp_path / "straight" / "checkpoint-20")
    b = lora_state(tmp_path / "split" / "checkpoint-20")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    c = lora_state(tmp_path / "straight" / "checkpoint-10")
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the comparison is not between untrained weights


def test_checkpoint_of_another_lora_shape_is_refused(tiny_mistral, tiny_data, tmp_path):
    train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", "train.max_steps=3"))
    with pytest.raises(
        TrainError, match=r"cannot be resumed with this config \(lora_r: checkpoint 16, config 8"
    ):
        train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", "lora.r=8"), resume="auto")


def test_a_sequence_length_beyond_the_models_context_is_refused_before_loading(
    tiny_mistral, tiny_data, tmp_path, monkeypatch
):
    import qlora_llm.model

    monkeypatch.setattr(qlora_llm.model, "load_tokenizer", lambda *a, **k: pytest.fail("loaded first"))
    with pytest.raises(TrainError) as err:
        train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", "data.max_seq_length=5000"))
    assert str(err.value) == (
        f"data.max_seq_length=5000 is beyond the context of {tiny_mistral} (1024 tokens, its "
        "max_position_embeddings): set data.max_seq_length=1024 or less."
    )


def test_a_checkpoint_damaged_after_its_save_is_refused_and_the_previous_one_offered(
    tiny_mistral, tiny_data, tmp_path
):
    out = tmp_path / "run"
    train(tiny_cfg(tiny_mistral, tiny_data, out))  # checkpoints at steps 3 and 6
    sums = json.loads((out / "checkpoint-6" / "checksums.json").read_text())
    assert {"adapter_model.safetensors", "optimizer.pt", "rng_state.pth", "manifest.json"} <= sums.keys()
    weights = out / "checkpoint-6" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit pattern in a tensor: still loads, silently wrong
    weights.write_bytes(bytes(data))
    more = ("train.max_steps=9",)
    with pytest.raises(TrainError) as err:
        train(tiny_cfg(tiny_mistral, tiny_data, out, *more), resume="auto")
    assert str(err.value) == (
        f"{out / 'checkpoint-6'} is damaged: adapter_model.safetensors changed or vanished after it was "
        "saved (the checksums in checksums.json do not match); it was not resumed. Delete it and resume "
        f"from the previous one with --resume {out / 'checkpoint-3'}."
    )
    result = train(tiny_cfg(tiny_mistral, tiny_data, out, *more), resume=str(out / "checkpoint-3"))
    assert result.global_step == 9 and complete_checkpoints(out)[-1].name == "checkpoint-9"


def test_non_finite_loss_stops_with_step_and_keeps_last_checkpoint(
    tiny_mistral, tiny_data, tmp_path, monkeypatch
):

    class Poisoned:
        def compute_loss(self, model, inputs, *a, **k):
            loss = super().compute_loss(model, inputs, *a, **k)
            if self.state.global_step >= 4:
                return loss * float("nan")
            return loss

    patch_trainer(monkeypatch, Poisoned)
    with pytest.raises(
        TrainError, match=r"loss became nan at step 5; the last good checkpoint is .*checkpoint-3"
    ):
        train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", "train.max_steps=8"))
    ckpt = lora_state(tmp_path / "run" / "checkpoint-3")
    assert all(torch.isfinite(t).all() for t in ckpt.values())


def _no_partial_files(out: Path) -> None:
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert not hidden, hidden  # no staging folder, no temporary adapter
    assert {p.name for p in out.glob("checkpoint-*")} == {p.name for p in complete_checkpoints(out)}


@pytest.fixture(scope="module")
def straight_9(tiny_mistral, tiny_data, tmp_path_factory) -> Path:
    """An uninterrupted 9-step run (checkpoints every 3): what every interrupted run must end equal to."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(tiny_cfg(tiny_mistral, tiny_data, out, "train.max_steps=9"))
    return out


def _resume_ends_as_straight(tiny_mistral, tiny_data, out: Path, straight: Path) -> None:
    """`--resume auto` finishes the 9-step run, with the adapter the uninterrupted run ended with."""
    result = train(tiny_cfg(tiny_mistral, tiny_data, out, "train.max_steps=9"), resume="auto")
    assert (result.stopped, result.global_step) == ("completed", 9)
    _assert_same_final(out, straight)


def _assert_same_final(a: Path, b: Path) -> None:
    x, y = lora_state(a / "final_adapter"), lora_state(b / "final_adapter")
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=0, atol=1e-6)


def test_a_full_disk_during_a_save_keeps_the_last_checkpoint_and_resumes_exactly(
    tiny_mistral, tiny_data, tmp_path, monkeypatch, straight_9
):
    import errno

    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if "checkpoint-6" in str(f) and str(f).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    with pytest.raises(TrainError) as err:
        train(tiny_cfg(tiny_mistral, tiny_data, out, "train.max_steps=9"))
    message = str(err.value)
    assert message.startswith("writing checkpoint-6 failed at step 6: [Errno 28] No space left on device")
    assert message.endswith(
        f"nothing partial was kept; the last good checkpoint is {out / 'checkpoint-3'}. Free some space "
        "(or fix the cause) and continue with --resume auto."
    )
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-3"]
    assert not (out / "final_adapter").exists()
    _no_partial_files(out)
    monkeypatch.undo()  # space freed
    _resume_ends_as_straight(tiny_mistral, tiny_data, out, straight_9)


def test_a_full_disk_during_the_final_adapter_write_leaves_no_part_of_it(
    tiny_mistral, tiny_data, tmp_path, monkeypatch, straight_9
):
    import errno

    import peft.peft_model as pm

    real = pm.safe_save_file

    def full_disk(tensors, filename, *a, **k):
        if ".final_adapter." in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(pm, "safe_save_file", full_disk)
    out = tmp_path / "run"
    with pytest.raises(TrainError, match=r"^writing final_adapter failed at step 9: \[Errno 28\] No space"):
        train(tiny_cfg(tiny_mistral, tiny_data, out, "train.max_steps=9"))
    assert not (out / "final_adapter").exists()
    _no_partial_files(out)
    monkeypatch.undo()
    _resume_ends_as_straight(tiny_mistral, tiny_data, out, straight_9)


def test_sigterm_during_an_evaluation_stops_after_it_and_resumes_exactly(
    tiny_mistral, tiny_data, tmp_path, monkeypatch, straight_9
):
    class TermDuringEval:
        def evaluate(self, *a, **k):
            if self.state.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().evaluate(*a, **k)

    patch_trainer(monkeypatch, TermDuringEval)
    out = tmp_path / "run"
    first = train(tiny_cfg(tiny_mistral, tiny_data, out, "train.max_steps=9"))
    assert first.stopped == "SIGTERM" and first.exit_code == 143 and first.global_step in (3, 4)
    assert first.final_adapter is None and not (out / "final_adapter").exists()
    _no_partial_files(out)
    monkeypatch.undo()
    _resume_ends_as_straight(tiny_mistral, tiny_data, out, straight_9)


def test_sigterm_during_the_final_adapter_write_lets_it_finish(
    tiny_mistral, tiny_data, tmp_path, monkeypatch, straight_9
):
    import peft

    real = peft.PeftModel.save_pretrained

    def term_then_save(self, directory, *a, **k):
        if ".final_adapter." in str(directory):
            os.kill(os.getpid(), signal.SIGTERM)  # as a user's stop arrives mid-write
        return real(self, directory, *a, **k)

    monkeypatch.setattr(peft.PeftModel, "save_pretrained", term_then_save)
    out = tmp_path / "run"
    result = train(tiny_cfg(tiny_mistral, tiny_data, out, "train.max_steps=9"))
    assert (result.stopped, result.exit_code, result.global_step) == ("SIGTERM", 143, 9)
    assert result.final_adapter == out / "final_adapter"
    _no_partial_files(out)
    _assert_same_final(out, straight_9)


SCRIPT = textwrap.dedent("""
    import logging, sys, time, torch
    from qlora_llm.config import load_config
    logging.basicConfig(level=logging.INFO)
    from qlora_llm.train import train
    cfg = load_config(None, sys.argv[2:])
    mode = sys.argv[1]
    if mode == "hang-on-save-6":
        real_save = torch.save
        def slow_save(obj, f, *a, **k):
            if "checkpoint-6" in str(f):
                open(sys.argv[2].split("=", 1)[1] + ".saving", "w").close()
                time.sleep(600)
            return real_save(obj, f, *a, **k)
        torch.save = slow_save
    if mode.startswith(("count-save-6", "die-at-write-")):
        # Every write of checkpoint-6's save (files, renames), counted; the N-th one is a kill -9.
        import builtins, os, signal, peft.peft_model as pm
        die_at = int(mode.rsplit("-", 1)[1]) if mode.startswith("die-at-write-") else 0
        seen = []
        def event(what, path):
            if "checkpoint-6" in str(path):
                seen.append(f"{what} {path}")
                if len(seen) == die_at:
                    os.kill(os.getpid(), signal.SIGKILL)
        def hook(name, real, kind, pos=0, writes_only=False):
            def wrapped(*a, **k):
                mode_arg = a[1] if len(a) > 1 else k.get("mode", "r")
                if not writes_only or any(c in str(mode_arg) for c in "wax+"):
                    event(kind, a[pos])
                return real(*a, **k)
            return wrapped
        torch.save = hook("save", torch.save, "torch.save", pos=1)
        pm.safe_save_file = hook("safe_save_file", pm.safe_save_file, "safetensors", pos=1)
        builtins.open = hook("open", builtins.open, "open", writes_only=True)
        os.replace = hook("replace", os.replace, "replace", pos=1)
        os.rename = hook("rename", os.rename, "rename", pos=1)
    result = train(cfg, resume="auto")
    if mode == "count-save-6":
        print("".join(f"EVENT {e}\\n" for e in seen))
    sys.exit(result.exit_code)
""")


def _run_script(tmp_path, mode, cfg_args):
    script = tmp_path / "run_train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen(
        [sys.executable, str(script), mode, *cfg_args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _args(tiny_mistral, tiny_data, out, *extra):
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


@pytest.mark.slow
def test_kill_9_at_every_stage_of_a_save_leaves_only_complete_checkpoints(tiny_mistral, tiny_data, tmp_path):
    """A save is many writes (15 here: adapter, tokenizer files, training args, optimizer, scheduler, RNG,
    trainer state, config, manifest, checksums, the final rename): kill -9 at each of them in turn;
    every time only complete checkpoints carry a real name, and the run resumes and finishes."""
    count = _run_script(
        tmp_path, "count-save-6", _args(tiny_mistral, tiny_data, tmp_path / "count", "train.max_steps=6")
    )
    log = count.communicate(timeout=300)[0]
    assert count.returncode == 0, log[-3000:]
    events = re.findall(r"^EVENT (\S+) (.+)$", log, flags=re.M)
    names = [Path(path).name for _, path in events]
    assert {"adapter_model.safetensors", "optimizer.pt", "rng_state.pth", "trainer_state.json"} <= set(names)
    assert names[-3:] == ["manifest.json", "checksums.json", "checkpoint-6"], names  # the rename is last
    out = tmp_path / "run"
    args = _args(tiny_mistral, tiny_data, out, "train.max_steps=6")
    for k in range(1, len(events) + 1):
        shutil.rmtree(out, ignore_errors=True)
        proc = _run_script(tmp_path, f"die-at-write-{k}", args)
        log = proc.communicate(timeout=300)[0]
        assert proc.returncode == -9, (k, events[k - 1], log[-2000:])
        names = sorted(p.name for p in out.glob("checkpoint-*"))
        complete = [p.name for p in complete_checkpoints(out)]
        assert names == complete and complete[0] == "checkpoint-3", (k, names)
        assert not (out / "final_adapter").exists()
    finish = _run_script(tmp_path, "normal", [*args[:-1], "train.max_steps=9"])
    log = finish.communicate(timeout=300)[0]
    assert finish.returncode == 0 and "resume from " in log, log[-3000:]
    assert [p.name for p in complete_checkpoints(out)][-1] == "checkpoint-9"
    assert not any(p.name.startswith(".staging") for p in out.iterdir())


@pytest.mark.slow
def test_kill_9_mid_save_then_resume_from_newest_complete(tiny_mistral, tiny_data, tmp_path):
    out = tmp_path / "run"
    args = _args(tiny_mistral, tiny_data, out, "train.max_steps=9")
    proc = _run_script(tmp_path, "hang-on-save-6", args)
    marker = Path(str(out) + ".saving")
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), proc.communicate()[0][-3000:]
    proc.kill()  # kill -9 while checkpoint-6 is half written
    proc.wait()
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-3"]
    assert not (out / "checkpoint-6").exists()  # the partial one never got its real name
    assert any(p.name.startswith(".staging-checkpoint-6") for p in out.iterdir())

    proc = _run_script(tmp_path, "normal", args)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    assert "resume from " + str(out / "checkpoint-3") in log
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-3", "checkpoint-6", "checkpoint-9"]
    assert not any(p.name.startswith(".staging") for p in out.iterdir())


@pytest.mark.slow
def test_sigterm_saves_at_step_boundary_and_exits_143(tiny_mistral, tiny_data, tmp_path):
    out = tmp_path / "run"
    proc = _run_script(
        tmp_path,
        "normal",
        _args(
            tiny_mistral,
            tiny_data,
            out,
            "train.max_steps=500",
            "train.save_steps=300",
            "train.eval_steps=300",
        ),
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=240)[0]
    assert proc.returncode == 143, log[-3000:]
    saved = complete_checkpoints(out)
    assert len(saved) == 1 and 3 <= int(saved[0].name.split("-")[1]) < 300
    assert not (out / "final_adapter").exists()


def test_plain_lora_without_quantization(tiny_mistral, tiny_data, tmp_path):
    result = train(
        tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", "model.quantization=none", "train.max_steps=3")
    )
    assert result.summary["train_loss_last"] < result.summary["train_loss_first"]


def test_wrong_explicit_target_modules_is_an_error(tiny_mistral, tiny_data, tmp_path):
    with pytest.raises(
        TrainError, match=r"lora.target_modules \['c_attn'\] are not all in MistralForCausalLM"
    ):
        train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", "lora.target_modules=[c_attn]"))


def test_cuda_requested_without_gpu_is_an_error(tiny_mistral, tiny_data, tmp_path):
    from qlora_llm.model import DeviceError

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceError, match="model.device=cuda but no CUDA GPU is visible"):
        train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", "model.device=cuda"))


def test_packed_and_padded_batches_give_the_same_loss(tiny_mistral, tiny_data, tmp_path, monkeypatch):
    """Padding-free packing must not let examples attend to each other: same examples, same loss."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    seen = {}

    class Spy:
        def train(self, *a, **k):
            rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in self.train_dataset][:4]
            self.model.eval()  # no dropout: the two passes must see the same function
            with torch.no_grad():
                for name, padding_free in (("padded", False), ("packed", True)):
                    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)(rows)
                    seen[name] = float(self.compute_loss(self.model, batch))
                    seen[f"{name}_shape"] = tuple(batch["input_ids"].shape)
            self.model.train()
            return super().train(*a, **k)

    patch_trainer(monkeypatch, Spy)
    train(
        tiny_cfg(
            tiny_mistral,
            tiny_data,
            tmp_path / "run",
            *ONE_STEP,
        )
    )
    assert seen["packed_shape"][0] == 1 and seen["padded_shape"][0] == 4
    assert seen["packed"] == pytest.approx(seen["padded"], rel=1e-5)


def test_gradient_accumulation_matches_the_big_batch(tiny_mistral, tiny_data, tmp_path):
    """4 micro-batches of 1 and one batch of 4: the same update (SGD, so the gradient scale shows)."""
    common = [
        *ONE_STEP,
        "lora.dropout=0",
        "train.optim=sgd",
        "train.learning_rate=1",
        "train.group_by_length=false",
        "train.max_grad_norm=1e9",
    ]
    train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "big", *common, "train.batch_size=4"))
    train(
        tiny_cfg(
            tiny_mistral,
            tiny_data,
            tmp_path / "acc",
            *common,
            "train.batch_size=1",
            "train.gradient_accumulation_steps=4",
        )
    )
    a = lora_state(tmp_path / "big" / "checkpoint-1")
    b = lora_state(tmp_path / "acc" / "checkpoint-1")
    moved = [k for k in a if k.endswith("lora_B.weight")]
    assert moved and all(a[k].abs().sum() > 0 for k in moved)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_real_smollm2_qlora_on_cpu_eval_loss_falls(smollm2_cache, tmp_path):
    """The bundled real model, 4-bit NF4 on CPU, a few steps on real ACLSum examples: eval loss falls."""
    rows = [json.loads(x) for x in (ROOT / "data" / "aclsum" / "train.jsonl").read_text().splitlines()]
    short = [r for r in rows if len(r["input"]) < 700][:24]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short[:20]))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short[20:24]))
    cfg = load_config(
        ROOT / "configs" / "smollm2-cpu.yaml",
        [
            f"model.cache_dir={smollm2_cache}",
            f"data.train_file={tmp_path / 'train.jsonl'}",
            f"data.eval_file={tmp_path / 'eval.jsonl'}",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=6",
            "train.eval_steps=6",
            "train.save_steps=6",
            "train.logging_steps=1",
            "train.batch_size=2",
            "train.learning_rate=1e-3",
            "train.warmup_ratio=0",
        ],
    )
    result = train(cfg)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.global_step == 6
    assert result.summary["train_loss_last"] < result.summary["train_loss_first"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["base_model"]["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert manifest["base_model"]["fingerprint"].startswith("builtin:smollm2-135m-instruct:")
    assert manifest["template"]["name"] == "auto" and manifest["tokens"]["eos"] == "<|im_end|>"
    assert [m["step"] for m in metrics if "eval_loss" in m] == [0, 6]
    assert result.summary["eval_loss_best"] < result.summary["eval_loss_first"]


def test_a_run_that_cannot_fit_is_refused_unless_forced(tiny_mistral, tiny_data, tmp_path, monkeypatch):
    import qlora_llm.plan as qplan

    monkeypatch.setattr(qplan, "_device_memory", lambda device: 256 * 2**20)  # a 256 MiB machine
    refused = r"estimated not to fit: peak \d+\.\d\d GiB \(in train\) > 0\.23 GiB usable .*--force"
    with pytest.raises(TrainError, match=refused):
        train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", "train.max_steps=1"))
    assert not (tmp_path / "run").exists()  # refused before anything was loaded or written
    result = train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", "train.max_steps=1"), force=True)
    assert result.global_step == 1


def test_the_plan_inside_train_sizes_batches_by_trains_own_rows(
    tiny_mistral, tiny_data, tmp_path, monkeypatch
):
    """train hands its tokenized rows to the plan: the data is read and tokenized once, same longest row."""
    import qlora_llm.plan as qplan

    cfg = tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", "train.max_steps=1")
    longest = max(n for n, _ in qplan.example_lengths(cfg) if n <= cfg.data.max_seq_length)
    reports = []
    real_plan = qplan.plan
    monkeypatch.setattr(qplan, "plan", lambda *a, **k: reports.append(real_plan(*a, **k)) or reports[-1])
    monkeypatch.setattr(qplan, "_tokenized", lambda *a: pytest.fail("the plan tokenized the data again"))
    assert train(cfg).global_step == 1
    assert [r.setup["seq_len"] for r in reports] == [longest]


@pytest.mark.parametrize("on", [True, False])
def test_activation_checkpointing_follows_the_setting(tiny_mistral, tiny_data, tmp_path, monkeypatch, on):
    seen = []

    class Observe:
        def training_step(self, model, *a, **k):
            seen.append(model.is_activation_checkpointing)
            return super().training_step(model, *a, **k)

    patch_trainer(monkeypatch, Observe)
    extra = ("train.max_steps=1", "train.save_steps=1", "train.eval_steps=1")
    train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", *extra, f"train.gradient_checkpointing={on}"))
    assert seen == [on]


def test_bf16_compute_on_cpu_keeps_lora_and_optimizer_state_in_fp32(
    tiny_mistral, tiny_data, tmp_path, monkeypatch
):
    """What `compute_dtype: auto` picks on a CPU with native bf16: bf16 matmuls, fp32 trainable state."""
    seen = {}

    class Observe:
        def training_step(self, model, *a, **k):
            loss = super().training_step(model, *a, **k)
            seen["lora"] = {p.dtype for p in model.parameters() if p.requires_grad}
            seen["autocast"] = torch.is_autocast_enabled("cpu") or self.args.bf16
            return loss

    patch_trainer(monkeypatch, Observe)
    cfg = tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", "model.compute_dtype=bfloat16")
    result = train(cfg)
    assert seen == {"lora": {torch.float32}, "autocast": True}
    assert result.summary["compute_dtype"] == "bfloat16"
    state = torch.load(tmp_path / "run" / "checkpoint-6" / "optimizer.pt", weights_only=False)["state"]
    assert {t.dtype for s in state.values() for t in s.values() if t.dim() > 0} == {torch.float32}
    assert result.summary["train_loss_last"] < result.summary["train_loss_first"]


def _layer_checkpointing(model) -> list[bool]:
    return [layer.gradient_checkpointing for layer in model.base_model.model.model.layers]


@pytest.mark.parametrize("room", ["plenty", "half", "none", "busy"])
def test_checkpointing_auto_takes_the_fewest_layers_that_fit(
    tiny_mistral, tiny_data, tmp_path, monkeypatch, caplog, room
):
    """auto: off when the run fits without it; layer 0 of 2 when only that fits; every layer otherwise.
    It is decided on the memory available now: busy has plenty in total but only half's room free."""
    import qlora_llm.plan as qplan

    cfg = tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", "train.max_steps=1", "train.save_steps=1")
    model_config, _ = qplan.load_model_config(str(tiny_mistral))
    setup = qplan._setup(cfg, "cpu", lengths=qplan.example_lengths(cfg))  # as train plans: its data's longest

    def whole_run(every: int) -> int:
        """The plan's budget: the stage its verdict is on (training), with this checkpointing."""
        s = setup | {"gradient_checkpointing": every > 0, "every_n_layers": max(every, 1)}
        stages = qplan.estimate_stages(model_config, cfg, s)
        return max(st.peak for st in stages if st.name in qplan.VERDICT_STAGES)

    peak = {every: whole_run(every) for every in (0, 2, 1)}  # off, layer 0 of 2, both layers
    assert peak[0] > max(peak[1], peak[2])  # (checkpointing the last of 2 layers saves nothing: n=2 < n=1)
    half = (peak[0] + peak[2]) // 2
    usable = {"plenty": peak[0] + 1, "half": half, "none": min(peak.values()) - 1, "busy": peak[0] + 1}[room]
    total = int(usable / qplan.FIT_MARGIN) + 1
    available = int(half / qplan.FIT_MARGIN) + 1 if room == "busy" else total
    monkeypatch.setattr(qplan, "_device_memory", lambda device: total)
    monkeypatch.setattr("qlora_llm.memory.available_bytes", lambda device: available)
    seen = []

    class Observe:
        def training_step(self, model, *a, **k):
            seen.append(_layer_checkpointing(model))
            return super().training_step(model, *a, **k)

    patch_trainer(monkeypatch, Observe)
    with caplog.at_level(logging.INFO, logger="qlora_llm.train"):
        result = train(cfg, force=room == "none")
    expected = {"plenty": [False, False], "half": [True, False], "none": [True, True], "busy": [True, False]}
    assert seen == [expected[room]]
    said = {
        "plenty": "auto: off (the run fits without it)",
        "half": "auto: on for 1 of 2 layers (every 2), the fewest that fit",
        "none": "auto: on for all 2 layers",
        "busy": "auto: on for 1 of 2 layers (every 2), the fewest that fit",
    }[room] + f", decided on {available / 2**30:.2f} GiB available now"
    assert result.summary["gradient_checkpointing"] == said
    assert f"gradient checkpointing {said}; planned peak " in caplog.text


@pytest.mark.parametrize("method", ["sft", "dpo", "orpo"])
def test_a_cli_training_log_has_no_third_party_warning(tiny_mistral, tiny_data, tiny_pairs, tmp_path, method):
    """What the terminal shows: our log lines, our progress bar and summary; no library warning or bar."""
    data = tiny_data if method == "sft" else tiny_pairs
    extra = ("train.max_steps=2", "train.eval_steps=1", f"train.method={method}")
    args = _args(tiny_mistral, data, tmp_path / "run", *extra)
    (tmp_path / "empty.yaml").write_text("{}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_llm.cli", "train", str(tmp_path / "empty.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "QLORA_LLM_ALLOCATOR": "system"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.replace("\r", "\n").splitlines() if x.strip()]
    ours = ("INFO qlora_llm", "WARNING qlora_llm", "training:")
    assert [x for x in lines if not x.startswith(ours)] == []
    assert any(x.startswith("INFO qlora_llm.cpu4bit: 4-bit CPU kernel: ") for x in lines)


@pytest.mark.slow
def test_the_demo_recipe_on_a_reduced_budget_lowers_the_answer_loss_clearly(smollm2_cache, tmp_path):
    """configs/smollm2-cpu.yaml as it is (learning rate, schedule, LoRA, batch), 12 steps instead of its
    full budget, on the bundled data: the eval loss on the answers falls by a clear margin."""
    rows = [json.loads(x) for x in (ROOT / "data" / "aclsum" / "eval.jsonl").read_text().splitlines()]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:12]))
    cfg = load_config(
        ROOT / "configs" / "smollm2-cpu.yaml",
        [
            f"model.cache_dir={smollm2_cache}",
            f"data.eval_file={tmp_path / 'eval.jsonl'}",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=12",
            "train.eval_steps=12",
            "train.save_steps=12",
            # The recipe checkpoints for memory; off trains the same weights (byte-identical), ~30 s sooner.
            "train.gradient_checkpointing=false",
        ],
    )
    result = train(cfg)
    first, last = result.summary["eval_loss_first"], result.summary["eval_loss_best"]
    assert first - last > 0.3, (first, last)
