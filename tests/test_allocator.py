"""The model commands re-execute themselves under mimalloc (glibc's heap fragments under PyTorch)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_llm.allocator import ENV, mimalloc_library, preload_env

pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
    reason="cmeel-mimalloc is a dependency on Linux x86_64 only",
)
CLI = Path(sys.executable).parent / "qlora-llm"


def test_mimalloc_ships_with_the_package():
    lib = mimalloc_library()
    assert lib is not None and lib.name == "libmimalloc.so" and lib.is_file()


def test_preload_env_adds_mimalloc_once_and_keeps_a_users_preload():
    env = preload_env({"PATH": "/bin", "LD_PRELOAD": "/opt/libmine.so"})
    assert env is not None
    assert env["LD_PRELOAD"] == f"{mimalloc_library()} /opt/libmine.so"
    assert env[ENV] == "mimalloc" and env["PATH"] == "/bin"
    assert preload_env(env) is None  # the re-executed process does not re-execute again
    assert preload_env({ENV: "system"}) is None


def _run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in (ENV, "LD_PRELOAD")}
    return subprocess.run(
        [str(CLI), *args], capture_output=True, text=True, timeout=120, env={**clean, **env}
    )


def test_a_model_command_runs_under_mimalloc_and_still_reports_its_errors(tmp_path):
    run = _run_cli("evaluate", str(tmp_path / "missing"))
    assert "memory allocator: mimalloc" in run.stderr
    # The re-executed process kept stderr and returns the command's own exit status and message.
    assert run.returncode == 1 and "error:" in run.stderr and "missing" in run.stderr


def test_the_system_allocator_can_be_kept(tmp_path):
    run = _run_cli("evaluate", str(tmp_path / "missing"), **{ENV: "system"})
    assert "memory allocator: system" in run.stderr and run.returncode == 1
