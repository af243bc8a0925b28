"""Checkpoints: what a complete one holds, its checksums, the checks before resuming, the final adapter.

A checkpoint is staged and renamed into place only when every rank has written its part (the trainer,
trainer.py, does the staging); here is what makes one resumable: all of CHECKPOINT_FILES, files that
still match the SHA-256 recorded at save time, the same base and LoRA shape as the config, and the same
number of processes as the run that wrote it.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from qlora_llm.atomic import atomic_dir, atomic_write_text
from qlora_llm.config import Config, save_config
from qlora_llm.errors import TrainError
from qlora_llm.fingerprint import sha256_file

log = logging.getLogger(__name__)


CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
CHECKSUMS = "checksums.json"
# What a checkpoint must hold to be resumed from; staged saving makes a partial one impossible, this
# also rejects folders written by other tools or older versions.
CHECKPOINT_FILES = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "trainer_state.json",
    "optimizer.pt",
    "scheduler.pt",
    "manifest.json",
)


class SaveFailed(TrainError):
    """A checkpoint or the final adapter could not be written (a full disk, a write error)."""

    def __init__(self, what: str, step: int, run_dir: Path, cause: BaseException):
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        free = shutil.disk_usage(run_dir).free / 2**20 if run_dir.exists() else float("nan")
        super().__init__(
            f"writing {what} failed at step {step}: {first} ({free:,.0f} MiB free on the disk of {run_dir}); "
            "nothing partial was kept"
        )


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders with every file resume needs, oldest step first."""
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and all((p / f).is_file() for f in CHECKPOINT_FILES):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def write_checksums(checkpoint: Path) -> None:
    """Record every file's SHA-256 in the checkpoint, so damage after the save is found at resume."""
    sums = {
        str(f.relative_to(checkpoint)): sha256_file(f)
        for f in sorted(checkpoint.rglob("*"))
        if f.is_file() and f.name != CHECKSUMS
    }
    atomic_write_text(checkpoint / CHECKSUMS, json.dumps(sums, indent=2) + "\n")


def verify_checksums(checkpoint: Path, earlier: list[Path]) -> None:
    """Refuse a checkpoint whose files changed after it was saved; name the newest earlier one instead."""
    listed = checkpoint / CHECKSUMS
    if not listed.is_file():
        log.warning("%s has no %s (saved by an older version): resuming it unchecked", checkpoint, CHECKSUMS)
        return
    sums = json.loads(listed.read_text())
    bad = [
        name
        for name, digest in sums.items()
        if not (checkpoint / name).is_file() or sha256_file(checkpoint / name) != digest
    ]
    if bad:
        offer = (
            f"resume from the previous one with --resume {earlier[-1]}"
            if earlier
            else "no earlier checkpoint is left; start over in a new train.output_dir"
        )
        raise TrainError(
            f"{checkpoint} is damaged: {', '.join(bad)} changed or vanished after it was saved (the "
            f"checksums in {CHECKSUMS} do not match); it was not resumed. Delete it and {offer}."
        )


def checkpoint_identity(cfg: Config) -> dict[str, Any]:
    """What a checkpoint must share with the config to be resumed: same base, same LoRA shape."""
    return {
        "base_model": cfg.model.name,
        "quantization": cfg.model.quantization,
        "lora_r": cfg.lora.r,
        "lora_alpha": cfg.lora.alpha,
        "template": cfg.model.template,
    }


def check_resumable(checkpoint: Path, cfg: Config, target_modules: list[str]) -> None:
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    want = {**checkpoint_identity(cfg), "target_modules": sorted(target_modules)}
    have = {k: manifest.get("identity", {}).get(k) for k in want}
    diff = [f"{k}: checkpoint {have[k]!r}, config {want[k]!r}" for k in want if have[k] != want[k]]
    if diff:
        raise TrainError(
            f"{checkpoint} cannot be resumed with this config ({'; '.join(diff)}). "
            "Use the same settings, or a new train.output_dir to start over."
        )


def check_processes(checkpoint: Path, processes: int) -> None:
    """A checkpoint resumes only with the number of processes that wrote it.

    Each process's share of the data order, and its saved RNG state, depend on that number: resuming
    with another would silently train on other batches than the interrupted run would have.
    """
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    have = manifest.get("processes", 1)  # checkpoints from before multi-process training: one
    if have != processes:
        raise TrainError(
            f"{checkpoint} was written by {have} training process(es) and this run has {processes}: "
            "the data order and saved RNG states differ with the number of processes. Resume with "
            f"--nproc {have} (in all, across nodes), or set a new train.output_dir to start over."
        )


def last_good(run_dir: Path) -> str:
    last = complete_checkpoints(run_dir)
    return f"; the last good checkpoint is {last[-1]}" if last else "; no checkpoint had been saved"


def write_final_adapter(
    trainer: Any, run_dir: Path, tokenizer: Any, cfg: Config, manifest: dict, main: bool
) -> Path:
    final = run_dir / "final_adapter"
    # Under FSDP each rank holds a shard: gathering the full state is a collective, rank 0 gets it.
    full_state = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if main:
        try:
            with atomic_dir(final, replace=True) as tmp:
                # A plain PEFT adapter folder, whatever wrapped the model for training.
                # Only the trained adapter: DPO's frozen reference copy ("ref") is not part of the result.
                trainer.accelerator.unwrap_model(trainer.model).save_pretrained(
                    tmp, state_dict=full_state, selected_adapters=["default"]
                )
                tokenizer.save_pretrained(tmp)
                save_config(cfg, tmp / "config.yaml")
                atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        except Exception as err:
            raise SaveFailed("final_adapter", trainer.state.global_step, run_dir, err) from err
    return final
