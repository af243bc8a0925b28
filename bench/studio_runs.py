"""The studio's runs page over many runs: render time, and the studio process's memory with no model loaded.

Writes N synthetic run folders (default 200) into a temp folder as `qlora-llm train` leaves them: the
resolved config.yaml, a metrics.jsonl with one training row per step (loss, lr, grad_norm, tokens_per_s,
memory_bytes) and an eval row every 10 steps, two checkpoint folders and summary.json. Then:
1. builds the studio app in this process (`create_app`, no worker) and times GET / through TestClient:
   the median of --gets requests after one warm-up, in ms;
2. starts the real `qlora-llm studio` on them as a subprocess, GETs / over HTTP --gets times (median ms)
   and reads that process's RSS and peak RSS (VmHWM) with psutil: the studio with no model loaded;
3. holds a run page's event stream open (what the page's chart reads) and appends --rows rows to that
   run's metrics.jsonl, as training logs them: the time from each append to its row arriving, in ms.
The issue's targets: < 300 ms for 200 runs, < 300 MB RSS, a logged step on the run page within 2 s.
Numbers, never asserted.

    python bench/studio_runs.py [--runs 200] [--steps 200] [--gets 15]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import yaml
from fastapi.testclient import TestClient

from qlora_llm.config import Config
from qlora_llm.studio.app import create_app


def write_run(folder: Path, steps: int, seed: int) -> None:
    """One run folder as a finished `qlora-llm train` leaves it."""
    folder.mkdir(parents=True)
    cfg = Config().model_dump(mode="json")
    cfg["model"]["name"] = "smollm2-135m-instruct"
    cfg["data"]["train_file"] = "data/aclsum/train.jsonl"
    cfg["train"]["max_steps"] = steps
    cfg["train"]["learning_rate"] = 1e-4 * (1 + seed % 5)
    cfg["train"]["output_dir"] = str(folder)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    rows = []
    for step in range(1, steps + 1):
        loss = 3.0 / (1 + step / 50) + 0.01 * (seed % 7)
        rows.append(
            {
                "step": step,
                "epoch": round(step / steps, 4),
                "loss": round(loss, 4),
                "lr": 1e-4,
                "grad_norm": 0.8,
                "tokens_per_s": 850.0 + step % 40,
                "memory_bytes": 700_000_000 + step * 1000,
            }
        )
        if step % 10 == 0:
            rows.append({"step": step, "epoch": round(step / steps, 4), "eval_loss": round(loss + 0.1, 4)})
            rows[-1]["memory_bytes"] = 700_000_000 + step * 1000
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for step in (steps // 2, steps):
        (folder / f"checkpoint-{step}").mkdir()
    (folder / "summary.json").write_text(json.dumps({"steps": steps, "final_loss": rows[-2]["loss"]}))


def median_ms(get, n: int) -> float:
    get()  # warm-up
    times = []
    for _ in range(n):
        start = time.perf_counter()
        get()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def event_latency_ms(url: str, folder: Path, rows: int) -> list[float]:
    """Per appended metrics row: ms from the append to the row on the run page's event stream."""
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    step = json.loads(lines[-1])["step"]
    delays = []
    with httpx.stream("GET", f"{url}runs/{folder.name}/events", timeout=30) as events:
        lines_in = events.iter_lines()

        def next_step() -> int:  # the next metrics row's step (other events: status, jobs, reset)
            for line in lines_in:
                if line.startswith('data: {"step"'):
                    return json.loads(line.removeprefix("data: "))["step"]
            raise SystemExit("the event stream ended")

        for _ in lines:  # the rows already logged come first
            next_step()
        for i in range(1, rows + 1):
            time.sleep(0.3)  # appends at random phases of the stream's polling
            row = {"step": step + i, "loss": 1.0, "time": time.time()}
            start = time.perf_counter()
            with open(folder / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            while next_step() != row["step"]:
                pass
            delays.append((time.perf_counter() - start) * 1000)
    return delays


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200, help="synthetic run folders")
    ap.add_argument("--steps", type=int, default=200, help="logged training steps per run")
    ap.add_argument("--gets", type=int, default=15, help="timed GETs of the runs page")
    ap.add_argument("--rows", type=int, default=10, help="rows appended while a run page's events stream")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="studio-bench-") as tmp:
        runs = Path(tmp) / "runs"
        for i in range(args.runs):
            write_run(runs / f"run-{i:03d}", args.steps, i)
        size = sum(p.stat().st_size for p in runs.rglob("metrics.jsonl"))
        print(f"{args.runs} runs, {args.steps} steps each, metrics.jsonl {size / 2**20:.1f} MiB in all")

        with TestClient(create_app(runs, start_worker=False)) as client:
            page = client.get("/").text
            assert page.count("<a href='/runs/run-") == args.runs, "the page must list every run"
            in_process = median_ms(lambda: client.get("/"), args.gets)
        print(f"runs page, in process (TestClient): median {in_process:.0f} ms over {args.gets} GETs")

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        studio = subprocess.Popen(
            [sys.executable, "-m", "qlora_llm.cli", "studio", "--runs", str(runs), "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}/"
            deadline = time.monotonic() + 60
            while True:
                try:
                    httpx.get(url + "login", timeout=2)
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline or studio.poll() is not None:
                        raise SystemExit("the studio did not start") from None
                    time.sleep(0.2)
            idle = psutil.Process(studio.pid).memory_info().rss
            over_http = median_ms(lambda: httpx.get(url, timeout=30).raise_for_status(), args.gets)
            rss = psutil.Process(studio.pid).memory_info().rss
            delays = event_latency_ms(url, runs / "run-000", args.rows)
            status = Path(f"/proc/{studio.pid}/status")
            peak = next(
                (int(x.split()[1]) * 1024 for x in status.read_text().splitlines() if x.startswith("VmHWM:")),
                None,
            )
        finally:
            studio.terminate()
            studio.wait(timeout=30)
        print(f"runs page, real studio over HTTP: median {over_http:.0f} ms over {args.gets} GETs")
        print(
            f"studio process RSS (no model loaded): {idle / 2**20:.0f} MiB started, {rss / 2**20:.0f} MiB "
            f"after the GETs" + (f", peak {peak / 2**20:.0f} MiB" if peak else "")
        )
        print(
            f"a logged row on the run page's event stream: median {statistics.median(delays):.0f} ms, "
            f"max {max(delays):.0f} ms over {len(delays)} rows"
        )


if __name__ == "__main__":
    main()
