"""Training on many processes: `qlora-llm train --nproc 2` on CPU (gloo) with the tiny Mistral.

The multi-process tests run the real CLI in a subprocess, which starts 2 workers through
torch.distributed.run on a free port; each takes ~15 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import free_port, lora_state, own_tmpdir_env, read_metrics, tiny_overrides

from qlora_llm.checkpoint import complete_checkpoints, write_checksums
from qlora_llm.config import ConfigError, load_config
from qlora_llm.distributed import Launch, exit_code_of, launcher_args
from qlora_llm.errors import TrainError
from qlora_llm.train import train

ROOT = Path(__file__).resolve().parents[1]


def overrides(tiny_mistral, tiny_data, out, *extra) -> list[str]:
    return tiny_overrides(tiny_mistral, tiny_data, out, *extra, steps=8, batch=2, every=4)


def cli(tmp_path: Path, args: list[str], nproc: int = 2) -> subprocess.Popen:
    """`qlora-llm train` with `nproc` processes, as a user would start it, with a temporary directory of
    its own (`finish` checks the run left nothing there)."""
    (tmp_path / "empty.yaml").write_text("{}\n")
    tmp = tmp_path / "tmp"
    env = own_tmpdir_env(tmp) | {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "qlora_llm.cli", "train", str(tmp_path / "empty.yaml"), *args]
        + ["--nproc", str(nproc), "--master-port", str(free_port())],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc.tmp_dir = tmp  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, code: int = 0) -> str:
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == code, log[-4000:]
    left = sorted(p.name for p in proc.tmp_dir.iterdir())  # type: ignore[attr-defined]
    assert not left, f"left in the temporary directory: {left}"  # torchrun's torchelastic_* included
    return log


# --------------------------------------------------------------------------------------------------
# Fast: the pieces, without starting processes


def test_launcher_gets_every_multi_node_flag():
    args = launcher_args(Launch(4, 2, 1, "10.0.0.1", 29600), ["train", "c.yaml", "lora.r=8"], "/tmp/logs")
    assert args == [
        "--log-dir=/tmp/logs",
        "--nproc-per-node=4",
        "--nnodes=2",
        "--node-rank=1",
        "--master-addr=10.0.0.1",
        "--master-port=29600",
        "--shutdown-timeout=300",
        "-m",
        "qlora_llm.cli",
        "train",
        "c.yaml",
        "lora.r=8",
    ]
    from torch.distributed.run import parse_args

    # torchrun reads it as its grace period before SIGKILL (its own default, 30 s, killed a saving run).
    assert parse_args(args).shutdown_timeout == 300


def test_a_signal_after_the_ranks_agreed_waits_for_the_next_step_boundary(tmp_path, monkeypatch):
    """The likely race behind a CI failure: rank 0's SIGTERM handler running just after the step's
    all-reduce made rank 0 save and stop while rank 1, told "go on", waited in its next step until
    torchrun killed both. Here the handler runs right after the collective of a 1-process gloo group."""
    import torch.distributed as dist

    from qlora_llm.monitor import make_monitor

    requests: list[str] = []
    real = dist.all_reduce

    def then_signal(tensor, *a, **k):
        out = real(tensor, *a, **k)
        if not requests:
            requests.append("SIGTERM")  # what monitor.stop_on_signals' handler does
        return out

    monkeypatch.setattr(dist, "all_reduce", then_signal)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        monitor = make_monitor(tmp_path, "cpu", requests, world_size=2)
        args, state = SimpleNamespace(device="cpu"), SimpleNamespace(global_step=3)
        first, second = SimpleNamespace(), SimpleNamespace()
        monitor.on_step_end(args, state, first)
        monitor.on_step_end(args, state, second)
    finally:
        dist.destroy_process_group()
    assert requests == ["SIGTERM"] and not hasattr(first, "should_training_stop")
    assert second.should_save and second.should_training_stop and monitor.stopped_by_signal


def test_exit_code_is_the_first_failure_as_a_shell_reports_it():
    def failure(code, at):
        return SimpleNamespace(exitcode=code, timestamp=at)

    assert exit_code_of({0: failure(143, 2), 1: failure(143, 1)}) == 143
    assert exit_code_of({0: failure(-15, 2), 1: failure(1, 1)}) == 1  # rank 1 crashed, rank 0 was stopped
    assert exit_code_of({0: failure(-9, 1)}) == 137


def test_cli_relaunches_itself_without_nproc(tmp_path, monkeypatch):
    import qlora_llm.distributed as distributed
    from qlora_llm.cli import main

    seen = {}
    monkeypatch.setattr(
        distributed, "launch", lambda launch, args: seen.update(launch=launch, args=args) or 143
    )
    for var in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "c.yaml").write_text("{}\n")
    argv = ["train", str(tmp_path / "c.yaml"), "lora.r=8", "--nproc", "2", "--resume", "auto"]
    argv += ["--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "29601"]
    assert main(argv) == 143  # the workers' exit code is the command's
    assert seen["launch"] == Launch(2, 2, 1, "10.0.0.1", 29601)
    assert seen["args"] == ["train", str(tmp_path / "c.yaml"), "lora.r=8", "--resume", "auto"]


def test_cli_rejects_impossible_process_layout(tmp_path, capsys):
    from qlora_llm.cli import main

    (tmp_path / "c.yaml").write_text("{}\n")
    assert main(["train", str(tmp_path / "c.yaml"), "--nproc", "0"]) == 2
    assert "need --nproc >= 1" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "c.yaml"), "--nnodes", "2", "--node-rank", "2"]) == 2


def test_distributed_key_is_validated():
    assert load_config(None).train.distributed == "ddp"
    assert load_config(None, ["train.distributed=fsdp"]).train.distributed == "fsdp"
    with pytest.raises(ConfigError, match=r"train.distributed: Input should be 'ddp' or 'fsdp'"):
        load_config(None, ["train.distributed=zero3"])


def test_fsdp_trainer_settings():
    from trl import SFTConfig

    from qlora_llm.train import fsdp_settings

    args = SFTConfig(output_dir="unused", use_cpu=True, bf16=False, **fsdp_settings(quantized=True))
    assert args.fsdp  # full_shard auto_wrap
    c = args.fsdp_config
    assert (c["version"], c["use_orig_params"], c["state_dict_type"]) == (1, True, "FULL_STATE_DICT")
    assert c["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert c["cpu_ram_efficient_loading"] is False  # transformers loads a quantized base on every rank
    assert SFTConfig(
        output_dir="unused", use_cpu=True, bf16=False, **fsdp_settings(quantized=False)
    ).fsdp_config["cpu_ram_efficient_loading"]


def test_4bit_weights_stored_in_the_compute_dtype_for_fsdp(tiny_mistral):
    from bitsandbytes.nn import Linear4bit

    from qlora_llm.model import load_base_model

    cfg = load_config(None, [f"model.name={tiny_mistral}", "model.device=cpu"])
    model = load_base_model(cfg.model, "cpu", dtype=torch.float32, quant_storage=torch.float32)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14
    for layer in layers:
        # The same packed bytes, read as fp32: FSDP flattens and shards them with the other weights.
        assert layer.weight.dtype == torch.float32
        assert layer.weight.numel() * 4 == layer.in_features * layer.out_features // 2


def test_plan_per_gpu_for_ddp_and_fsdp():
    from qlora_llm.plan import plan

    cfg = load_config(ROOT / "configs" / "mistral-7b-8gb.yaml", ["model.device=cuda"])
    one = plan(cfg, device_memory_bytes=8 * 2**30).estimate
    ddp = plan(cfg, device_memory_bytes=8 * 2**30, processes=4).estimate
    fsdp_cfg = load_config(
        ROOT / "configs" / "mistral-7b-8gb.yaml", ["model.device=cuda", "train.distributed=fsdp"]
    )
    fsdp = plan(fsdp_cfg, device_memory_bytes=8 * 2**30, processes=4).estimate
    # DDP: the whole model on every GPU, plus a bucket copy of the gradients; activations per device batch.
    assert (ddp.base_weights, ddp.optimizer_states, ddp.activations) == (
        one.base_weights,
        one.optimizer_states,
        one.activations,
    )
    assert ddp.lora_gradients == 2 * one.lora_gradients
    # FSDP: weights, gradients and optimizer states divided by the GPUs; one layer gathered at a time.
    for key in ("base_weights", "lora_weights", "lora_gradients", "optimizer_states"):
        assert getattr(fsdp, key) == pytest.approx(getattr(one, key) / 4, abs=1)
    assert fsdp.activations == one.activations and fsdp.transient > one.transient
    assert fsdp.peak < ddp.peak


def test_plan_cli_nproc(capsys):
    from qlora_llm.cli import main

    config = str(ROOT / "configs" / "mistral-7b-8gb.yaml")
    main(["plan", config, "model.device=cuda", "train.distributed=fsdp", "--memory", "8", "--nproc", "2"])
    out = capsys.readouterr().out
    assert "2 processes, fsdp: memory per cuda device" in out and "FSDP: 1/2 per GPU" in out


def test_resume_with_another_process_count_is_refused(tiny_mistral, tiny_data, tmp_path):
    one_step = ("train.max_steps=1", "train.save_steps=1", "train.eval_steps=1")
    cfg = load_config(None, overrides(tiny_mistral, tiny_data, tmp_path / "run", *one_step))
    train(cfg)
    manifest = tmp_path / "run" / "checkpoint-1" / "manifest.json"
    data = json.loads(manifest.read_text())
    assert data["processes"] == 1
    manifest.write_text(json.dumps({**data, "processes": 2}))  # as a 2-process run writes it
    write_checksums(manifest.parent)  # (an edit after the save would be refused as damage first)
    with pytest.raises(
        TrainError, match=r"written by 2 training process\(es\) and this run has 1: .* --nproc 2"
    ):
        train(cfg, resume="auto")


# --------------------------------------------------------------------------------------------------
# Slow: real processes


def _max_differences(a: Path, b: Path) -> tuple[float, float]:
    """The largest difference between two runs' logged train losses and between their final adapters."""
    la, lb = ([r["loss"] for r in read_metrics(run) if "loss" in r] for run in (a, b))
    assert len(la) == len(lb), (la, lb)
    x, y = lora_state(a / "final_adapter"), lora_state(b / "final_adapter")
    assert x.keys() == y.keys()
    loss = max(abs(p - q) for p, q in zip(la, lb, strict=True))
    return loss, max((x[k] - y[k]).abs().max().item() for k in x)


def _train_in_process(cfg_overrides: list[str]):
    """One process, one thread, as each worker of the 2-process run is started (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(load_config(None, cfg_overrides))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_processes_train_as_one_with_the_same_global_batch(tiny_mistral, tiny_data, tmp_path):
    """2 processes x batch 2 do the arithmetic of 1 process x batch 2 x 2 accumulation steps, exactly;
    both train like 1 process x batch 4 up to what fp32 GEMMs of other shapes allow on this CPU.

    Why two references. A batch of 4 and two micro-batches of 2 run different GEMM shapes, and the CPU's
    kernels block and sum those differently (on one AVX512-BF16 host the adapters differed by 3.8e-6
    after 8 steps; on an AMX host the same comparison reached 2.1e-5): no fixed tolerance holds on every
    CPU. Accumulation runs the *same* shapes as each worker: every micro-batch gradient is the same
    tensor, and gloo's all-reduce of two ranks adds the same two tensors accumulation adds (a + b; the
    loss scalings are powers of two, exact), so that comparison is exact on any host. The spread between
    batch 4 and 2 x 2, measured here on this CPU, is then the bound for the 2-process run against batch 4.
    """
    same = ("lora.dropout=0",)  # dropout masks are drawn per process: the one thing that differs
    _train_in_process(overrides(tiny_mistral, tiny_data, tmp_path / "one", *same, "train.batch_size=4"))
    _train_in_process(
        overrides(tiny_mistral, tiny_data, tmp_path / "acc", *same, "train.gradient_accumulation_steps=2")
    )
    log = finish(cli(tmp_path, overrides(tiny_mistral, tiny_data, tmp_path / "two", *same)))

    assert log.count("global batch 4 = 2 per device x 2 processes x 1 accumulation steps") == 1
    assert log.count("INFO qlora_llm.train: LoRA r=16") == 1  # rank 1 logs nothing but errors
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    train_rows = [r for r in b if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))  # one row per step: rank 0's alone
    assert [r["step"] for r in b if "eval_loss" in r] == [0, 4, 8]
    losses = [r["loss"] for r in a if "loss" in r]
    assert losses[-1] < losses[0] - 0.3  # it learned: the comparison is not of untrained runs

    # The same arithmetic: exact.
    assert _max_differences(tmp_path / "acc", tmp_path / "two") == (0.0, 0.0)
    # Other GEMM shapes: within what this CPU's kernels give for batch 4 vs 2 x 2 (+ one fp32 ulp at
    # the losses' scale, so a host whose kernels happen to agree exactly does not demand exactness).
    spread_loss, spread_adapter = _max_differences(tmp_path / "one", tmp_path / "acc")
    diff_loss, diff_adapter = _max_differences(tmp_path / "one", tmp_path / "two")
    assert diff_loss <= spread_loss + 1e-6, (diff_loss, spread_loss)
    assert diff_adapter <= spread_adapter + 1e-7, (diff_adapter, spread_adapter)
    assert spread_loss < 1e-3 and spread_adapter < 1e-3  # kernel rounding, not a different training run

    run = tmp_path / "two"
    assert [p.name for p in complete_checkpoints(run)] == ["checkpoint-4", "checkpoint-8"]
    assert {p.name for p in (run / "checkpoint-8").iterdir()} >= {"rng_state_0.pth", "rng_state_1.pth"}
    assert not any(p.name.startswith(".") for p in run.iterdir())  # no staging or temporary left
    assert json.loads((run / "manifest.json").read_text())["processes"] == 2
    assert json.loads((run / "summary.json").read_text())["steps"] == 8

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_mistral), run / "final_adapter"
    )
    loaded = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert loaded and all(v.abs().sum() > 0 for v in loaded.values())


RESUME = ("train.max_steps=40", "train.save_steps=100", "train.eval_steps=100", "lora.dropout=0.1")


@pytest.fixture(scope="module")
def uninterrupted(tiny_mistral, tiny_data, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("uninterrupted")
    finish(cli(folder, overrides(tiny_mistral, tiny_data, folder / "run", *RESUME)))
    return folder / "run"


@pytest.fixture(scope="module")
def interrupted(tiny_mistral, tiny_data, tmp_path_factory) -> tuple[Path, str]:
    """The same 2-process run, SIGTERM to the command a few steps in."""
    folder = tmp_path_factory.mktemp("interrupted")
    run = folder / "run"
    proc = cli(folder, overrides(tiny_mistral, tiny_data, run, *RESUME))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    return run, finish(proc, 143)


@pytest.mark.slow
def test_sigterm_stops_every_rank_at_one_step_with_one_checkpoint(interrupted):
    run, _ = interrupted
    saved = complete_checkpoints(run)
    assert len(saved) == 1, list(run.iterdir())
    step = int(saved[0].name.split("-")[1])
    assert 2 <= step < 40
    assert {p.name for p in saved[0].iterdir()} >= {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt"}
    assert not any(p.name.startswith(".") for p in run.iterdir())
    assert not (run / "final_adapter").exists()
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, step + 1))


@pytest.mark.slow
def test_resumed_two_process_run_matches_the_uninterrupted_one(
    interrupted, uninterrupted, tiny_mistral, tiny_data, tmp_path
):
    run, _ = interrupted
    log = finish(cli(tmp_path, [*overrides(tiny_mistral, tiny_data, run, *RESUME), "--resume", "auto"]))
    assert "resume from " + str(complete_checkpoints(run)[0]) in log
    a, b = lora_state(uninterrupted / "final_adapter"), lora_state(run / "final_adapter")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    rows = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert rows == list(range(1, 41))  # no step twice, none missing

    with pytest.raises(TrainError, match=r"written by 2 training process\(es\) and this run has 1"):
        train(load_config(None, overrides(tiny_mistral, tiny_data, run, *RESUME)), resume="auto")


@pytest.mark.slow
def test_fsdp_on_cpu_is_refused_with_the_reason(tiny_mistral, tiny_data, tmp_path):
    proc = cli(tmp_path, overrides(tiny_mistral, tiny_data, tmp_path / "run", "train.distributed=fsdp"))
    log = finish(proc, 1)
    assert "train.distributed=fsdp needs GPUs" in log
    assert not (tmp_path / "run").exists()


def _worker_of_rank(launcher_pid: int, rank: int) -> int | None:
    """The pid of the worker process with RANK=rank among the command's children (Linux /proc)."""
    for task in Path(f"/proc/{launcher_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(child)
    return None


@pytest.mark.slow
def test_a_rank_killed_mid_run_stops_the_others_and_leaves_only_complete_checkpoints(
    tiny_mistral, tiny_data, tmp_path
):
    """kill -9 of rank 1 (a crash no handler sees): the launcher stops rank 0, the command fails, nothing
    partial sits under a real name, and `--resume auto` continues from the newest complete checkpoint."""
    run = tmp_path / "run"
    args = overrides(tiny_mistral, tiny_data, run, *RESUME, "train.save_steps=2")
    proc = cli(tmp_path, args)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not complete_checkpoints(run):
        time.sleep(0.05)
    time.sleep(0.5)  # into the next steps: the kill may land in a step or in a save
    victim = _worker_of_rank(proc.pid, 1)
    assert victim is not None, "no worker with RANK=1 among the command's children"
    os.kill(victim, signal.SIGKILL)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode not in (0, None), log[-3000:]
    saved = complete_checkpoints(run)  # a save cut short stays hidden (.staging-...), never a checkpoint-N
    assert saved and sorted(p.name for p in run.glob("checkpoint-*")) == sorted(p.name for p in saved)
    assert not (run / "final_adapter").exists()
    resumed = finish(cli(tmp_path, [*args, "--resume", "auto"]))
    assert re.search(rf"resume from \S*{saved[-1].name}\b", resumed), resumed[-3000:]
    assert (run / "final_adapter" / "adapter_model.safetensors").is_file()
    assert not any(p.name.startswith(".") for p in run.iterdir()), sorted(p.name for p in run.iterdir())
