"""Training on many processes: starting them through PyTorch's own launcher, and the few collective steps
train.py needs that the Trainer does not take.

    qlora-llm train CONFIG --nproc 2                    # 2 data-parallel processes on this machine
    qlora-llm train CONFIG --nproc 8 --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500

`launch` runs `qlora-llm train ...` as N processes with `torch.distributed.run` (what `torchrun` runs);
each process is a normal `train(cfg)` whose Trainer finds the rank in the environment the launcher sets
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT) and joins one process group: gloo on CPU, nccl on CUDA
with each process on its own GPU. The launcher stops every process when one fails or when it is
signalled itself; `launch` turns the outcome into one exit code.

Why not `accelerate launch`: with `--cpu --num_processes 2` it starts one process, so a CPU test of the
multi-process path would not be one; torch.distributed.run starts N everywhere.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Launch:
    """Where the processes of one run go: `nproc` per node on `nnodes` nodes; rank 0's node is the master."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    # How long a stop (SIGTERM, Ctrl-C) may take before the launcher kills the workers: each finishes
    # the step or evaluation in flight, then saves a checkpoint. torchrun's own 30 s killed a 2-process
    # CPU run before it saved; a large model's step and save take longer than that on any hardware.
    stop_timeout_s: int = 300

    @property
    def processes(self) -> int:
        return self.nproc * self.nnodes


def launcher_args(launch: Launch, cli_args: list[str], log_dir: str) -> list[str]:
    """torch.distributed.run's command line that runs `qlora-llm <cli_args>` in every process.

    `log_dir` holds the launcher's per-worker error files; without one it makes a `torchelastic_*`
    folder in the temporary directory and never removes it (one more with every run).
    """
    return [
        f"--log-dir={log_dir}",
        f"--nproc-per-node={launch.nproc}",
        f"--nnodes={launch.nnodes}",
        f"--node-rank={launch.node_rank}",
        f"--master-addr={launch.master_addr}",
        f"--master-port={launch.master_port}",
        f"--shutdown-timeout={launch.stop_timeout_s}",
        "-m",
        "qlora_llm.cli",
        *cli_args,
    ]


def exit_code_of(failures: dict[int, Any]) -> int:
    """One exit code for failed workers: the first to fail (the root cause), as a shell would report it.

    A worker stopped by SIGTERM saves and exits 143 itself; one killed by a signal has a negative code.
    """
    first = min(failures.values(), key=lambda f: f.timestamp)
    code = int(first.exitcode)
    return 128 - code if code < 0 else code


def launch(launch: Launch, cli_args: list[str]) -> int:
    """Run `qlora-llm <cli_args>` as `launch.nproc` processes on this node; 0 when all succeed.

    SIGTERM or Ctrl-C to this process reaches every worker through the launcher (each saves a
    checkpoint at the next step boundary, agreed on by all ranks, and exits); the exit code is then
    128 + the signal, as for a one-process run.
    """
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    with tempfile.TemporaryDirectory(prefix="qlora-llm-torchrun-") as logs:
        args = launcher_args(launch, cli_args, logs)
        log.info(
            "launching %d processes on node %d of %d: torchrun %s",
            launch.nproc,
            launch.node_rank,
            launch.nnodes,
            " ".join(args[1:]),  # not the temporary log folder: gone when the run ends
        )
        try:
            run(parse_args(args))
        except ChildFailedError as err:
            return exit_code_of(err.failures)
        except SignalException as err:
            return 128 + int(signal.Signals(err.sigval))
    return 0


def agree_on_stop(requested: list[str], device: Any) -> bool:
    """Whether every rank stops at this step boundary: a signal seen by any rank is taken by all.

    The launcher signals each worker separately, so ranks can see SIGTERM in different steps; one that
    saved and stopped while another went on would leave the other waiting in its next all-reduce. The
    answer is the collective's, never `requested` read again after it: a signal handled after this
    rank's flag was taken is in `requested` but not in the others' answer, and waits for the next
    boundary (read afresh, it could stop one rank alone: the likely cause of a CI run where torchrun
    killed both ranks 30 s after the signal, before any save).
    """
    import torch
    import torch.distributed as dist

    mine = int(signal.Signals[requested[0]]) if requested else 0
    flag = torch.tensor([mine], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    agreed = int(flag.item())
    if agreed and not requested:
        requested.append(signal.Signals(agreed).name)
    return bool(agreed)
