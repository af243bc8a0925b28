"""Which GPUs the studio schedules its jobs on, and how many GPUs a job asks for.

The studio learns its GPUs once, at start, without importing torch (the studio process stays small:
no model, no CUDA context): `qlora-llm studio --gpus 0,1` (or `--gpus none`) when given; else the
GPUs an explicit CUDA_VISIBLE_DEVICES names; else `nvidia-smi --query-gpu=index --format=csv,noheader`;
else none, and the CPU rule holds: one job at a time.

    detect_gpus(os.environ)     # ["0", "1"] on a machine with two GPUs; [] on a CPU machine
    parse_gpus("0,1")           # --gpus
    gpus_wanted(job.command)    # 1, or K for `train CONFIG --nproc K`
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Mapping, Sequence

from qlora_llm.errors import QloraError

log = logging.getLogger(__name__)

NVIDIA_SMI = ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"]


def parse_gpus(text: str) -> list[str]:
    """`--gpus`: `none` (schedule as on a CPU machine) or a comma list of distinct GPU ids (nvidia-smi's
    indices, or UUIDs: whatever CUDA_VISIBLE_DEVICES accepts)."""
    if text.strip().lower() == "none":
        return []
    ids = [item.strip() for item in text.split(",")]
    if not all(ids) or len(set(ids)) != len(ids):
        raise QloraError(f"--gpus {text!r}: give distinct GPU ids separated by commas (0,1), or none")
    return ids


def visible_devices(value: str) -> list[str]:
    """A CUDA_VISIBLE_DEVICES list as CUDA reads it: the ids up to the first invalid one (`-1` hides all)."""
    ids = []
    for item in value.split(","):
        item = item.strip()
        if not item or item.startswith("-"):
            break
        ids.append(item)
    return ids


def detect_gpus(env: Mapping[str, str]) -> list[str]:
    """The GPUs of this machine, learnt without torch. `env` is the studio's environment (its PATH finds
    nvidia-smi). An explicit CUDA_VISIBLE_DEVICES is asked first: nvidia-smi lists every GPU whatever it
    says, and a user who set it meant the studio to keep to those."""
    if "CUDA_VISIBLE_DEVICES" in env:
        gpus = visible_devices(env["CUDA_VISIBLE_DEVICES"])
        log.info("GPUs from CUDA_VISIBLE_DEVICES: %s", ", ".join(gpus) or "none")
        return gpus
    program = shutil.which(NVIDIA_SMI[0], path=env.get("PATH"))
    if program is None:
        log.info("no nvidia-smi and no CUDA_VISIBLE_DEVICES: no GPU, one job at a time")
        return []
    try:
        done = subprocess.run(
            [program, *NVIDIA_SMI[1:]],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            env=dict(env),
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("nvidia-smi could not be run (%s): no GPU, one job at a time", err)
        return []
    if done.returncode != 0:  # e.g. installed, but no driver loaded
        last = (done.stdout + done.stderr).strip().splitlines() or ["no output"]
        log.warning("nvidia-smi failed (%s): no GPU, one job at a time", last[-1])
        return []
    gpus = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    log.info("GPUs from nvidia-smi: %s", ", ".join(gpus) or "none")
    return gpus


def gpus_wanted(command: Sequence[str]) -> int:
    """How many GPUs a job's command asks for: `--nproc K` (one process per GPU) asks for K, else 1."""
    for i, arg in enumerate(command):
        if arg == "--nproc" and i + 1 < len(command):
            value = command[i + 1]
        elif arg.startswith("--nproc="):
            value = arg.partition("=")[2]
        else:
            continue
        return int(value) if value.isdigit() and int(value) > 0 else 1
    return 1


def too_many(wanted: int, gpus: Sequence[str]) -> str | None:
    """Why a job asking for `wanted` GPUs can never start on `gpus`, in one line; None when it can. On a
    CPU studio (no GPUs) every job can: it runs alone, `--nproc K` as K CPU processes."""
    if not gpus or wanted <= len(gpus):
        return None
    return (
        f"--nproc {wanted} asks for {wanted} GPUs; this studio has {len(gpus)} "
        f"({', '.join(gpus)}): ask for at most {len(gpus)}"
    )
