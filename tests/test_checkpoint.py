"""Checkpoints (src/qlora_llm/checkpoint.py): exact resume, refused mismatches and damage, no partial saves."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    lora_state,
    no_partial_files,
    patch_trainer,
    read_metrics,
    resume_ends_as_straight,
    run_train_script,
    tiny_cfg,
    train_args,
)

from qlora_llm.checkpoint import complete_checkpoints
from qlora_llm.errors import TrainError
from qlora_llm.train import train


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
    # The run's token count (the studio's x-axis by tokens) continues across the resume, as the step does.
    straight, split = (read_metrics(tmp_path / name) for name in ("straight", "split"))
    assert straight[-1]["tokens"] == split[-1]["tokens"] > 0
    assert [r["tokens"] for r in split if r["step"] == 20] == [
        r["tokens"] for r in straight if r["step"] == 20
    ]


def test_checkpoint_of_another_lora_shape_is_refused(tiny_mistral, tiny_data, tmp_path):
    train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", "train.max_steps=3"))
    with pytest.raises(
        TrainError, match=r"cannot be resumed with this config \(lora_r: checkpoint 16, config 8"
    ):
        train(tiny_cfg(tiny_mistral, tiny_data, tmp_path / "run", "lora.r=8"), resume="auto")


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
    no_partial_files(out)
    monkeypatch.undo()  # space freed
    resume_ends_as_straight(tiny_mistral, tiny_data, out, straight_9)


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
    no_partial_files(out)
    monkeypatch.undo()
    resume_ends_as_straight(tiny_mistral, tiny_data, out, straight_9)


@pytest.mark.slow
def test_kill_9_at_every_stage_of_a_save_leaves_only_complete_checkpoints(tiny_mistral, tiny_data, tmp_path):
    """A save is many writes (15 here: adapter, tokenizer files, training args, optimizer, scheduler, RNG,
    trainer state, config, manifest, checksums, the final rename): kill -9 at each of them in turn;
    every time only complete checkpoints carry a real name, and the run resumes and finishes."""
    count = run_train_script(
        tmp_path, "count-save-6", train_args(tiny_mistral, tiny_data, tmp_path / "count", "train.max_steps=6")
    )
    log = count.communicate(timeout=300)[0]
    assert count.returncode == 0, log[-3000:]
    events = re.findall(r"^EVENT (\S+) (.+)$", log, flags=re.M)
    names = [Path(path).name for _, path in events]
    assert {"adapter_model.safetensors", "optimizer.pt", "rng_state.pth", "trainer_state.json"} <= set(names)
    assert names[-3:] == ["manifest.json", "checksums.json", "checkpoint-6"], names  # the rename is last

    kills = run_train_script(
        tmp_path,
        f"die-at-writes-{len(events)}",
        train_args(tiny_mistral, tiny_data, tmp_path / "kills", "train.max_steps=6"),
    )
    log = kills.communicate(timeout=600)[0]
    assert kills.returncode == 0, log[-3000:]
    exits = dict(re.findall(r"^EXIT (\d+) (-?\d+)$", log, flags=re.M))
    assert sorted(map(int, exits)) == list(range(1, len(events) + 1)), log[-3000:]
    for k in range(1, len(events) + 1):
        out = tmp_path / "kills" / f"k{k}" / "run"
        assert exits[str(k)] == "-9", (k, events[k - 1], (out.parent / "log.txt").read_text()[-2000:])
        names = sorted(p.name for p in out.glob("checkpoint-*"))
        complete = [p.name for p in complete_checkpoints(out)]
        assert names == complete and complete[0] == "checkpoint-3", (k, names)
        assert not (out / "final_adapter").exists()
    args = train_args(tiny_mistral, tiny_data, out, "train.max_steps=9")
    finish = run_train_script(tmp_path, "normal", args)
    log = finish.communicate(timeout=300)[0]
    assert finish.returncode == 0 and "resume from " in log, log[-3000:]
    assert [p.name for p in complete_checkpoints(out)][-1] == "checkpoint-9"
    assert not any(p.name.startswith(".staging") for p in out.iterdir())


@pytest.mark.slow
def test_kill_9_mid_save_then_resume_from_newest_complete(tiny_mistral, tiny_data, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_mistral, tiny_data, out, "train.max_steps=9")
    proc = run_train_script(tmp_path, "hang-on-save-6", args)
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

    proc = run_train_script(tmp_path, "normal", args)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    assert "resume from " + str(out / "checkpoint-3") in log
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-3", "checkpoint-6", "checkpoint-9"]
    assert not any(p.name.startswith(".staging") for p in out.iterdir())
