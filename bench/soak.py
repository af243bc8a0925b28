"""Soak the real server: many requests from 16 concurrent clients, some streaming and hanging up
mid-answer, some malformed; report what held.

    python bench/soak.py TARGET [--requests 2000] [--clients 16] [--max-tokens 16]

Starts `qlora-llm serve TARGET` as its own process on a free loopback port (nothing else is ever
addressed), sends a fixed number of requests (60% plain /generate, 20% streams closed after their
first event, 20% malformed: cut-short JSON, bytes that are not JSON, wrong types, an out-of-range
max_new_tokens), then waits for the server's in-flight gauge to return to 0 and stops it with SIGTERM. Prints
requests by status, p50/p99 latency of the plain ones, the server's resident memory at start and
end (after a warm-up round of 2 x clients requests, which allocates the generation buffers once), and
whether every disconnected generation was cancelled (in-flight back to 0). Bounded in count
and time; a short run of it is a CI test (tests/test_soak.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

MALFORMED = [
    (b'{"prompt": "hi", ', "application/json"),  # cut short
    (json.dumps({"prompt": 5}).encode(), "application/json"),
    (json.dumps({"prompt": "hi", "max_new_tokens": 10**9}).encode(), "application/json"),
    (json.dumps({"prompt": "hi", "temperature": "hot"}).encode(), "application/json"),
    (b"\xff\xfe not json", "application/json"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def in_flight(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("qlora_llm_requests_in_flight "):
            return float(line.split()[1])
    raise RuntimeError("no in-flight gauge in /metrics")


def start_server(target: str, port: int, overrides: list[str]) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "qlora_llm.cli", "serve", target, "--port", str(port), *overrides],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.kill()
    raise RuntimeError("the server was not ready after 300 s")


async def one(client: httpx.AsyncClient, k: int, max_tokens: int) -> tuple[str, int, float]:
    start = time.perf_counter()
    kind = ("plain", "plain", "plain", "stream", "malformed")[k % 5]
    prompt = f"Say something about the number {k}."
    if kind == "plain":
        r = await client.post("/generate", json={"prompt": prompt, "max_new_tokens": max_tokens})
        return kind, r.status_code, time.perf_counter() - start
    if kind == "stream":  # read the first event, then hang up mid-answer
        body = {"prompt": prompt, "max_new_tokens": max_tokens * 8, "stream": True}
        async with client.stream("POST", "/generate", json=body) as r:
            async for _ in r.aiter_lines():
                break
            return kind, r.status_code, time.perf_counter() - start
    content, media = MALFORMED[k // 5 % len(MALFORMED)]
    r = await client.post("/generate", content=content, headers={"content-type": media})
    return kind, r.status_code, time.perf_counter() - start


async def soak(url: str, requests: int, clients: int, max_tokens: int) -> list[tuple[str, int, float]]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for k in range(requests):
        queue.put_nowait(k)
    results: list[tuple[str, int, float]] = []

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            while not queue.empty():
                results.append(await one(client, queue.get_nowait(), max_tokens))

    await asyncio.gather(*(worker() for _ in range(clients)))
    return results


def run(target: str, requests: int, clients: int, max_tokens: int, overrides: list[str]) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(target, port, overrides)
    try:
        loaded_rss = rss_bytes(server.pid)
        # A warm-up round first: the first batches allocate generation buffers once; growth after
        # that is what a leak would show.
        asyncio.run(soak(url, 2 * clients, clients, max_tokens))
        start_rss = rss_bytes(server.pid)
        began = time.perf_counter()
        results = asyncio.run(soak(url, requests, clients, max_tokens))
        seconds = time.perf_counter() - began
        deadline, gauge = time.time() + 30, in_flight(url)
        while gauge and time.time() < deadline:  # disconnected streams are cancelled at their next token
            time.sleep(0.1)
            gauge = in_flight(url)
        end_rss = rss_bytes(server.pid)
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
    plain = sorted(s for kind, status, s in results if kind == "plain" and status == 200)
    return {
        "requests": len(results),
        "clients": clients,
        "seconds": round(seconds, 1),
        "by_status": dict(sorted(Counter(str(status) for _, status, _ in results).items())),
        "by_kind": dict(Counter(kind for kind, _, _ in results)),
        "server_errors_5xx": sum(status >= 500 and status != 503 for _, status, _ in results),
        "latency_p50_s": round(statistics.median(plain), 3) if plain else None,
        "latency_p99_s": round(plain[min(len(plain) - 1, int(0.99 * len(plain)))], 3) if plain else None,
        "rss_loaded_mib": round(loaded_rss / 2**20, 1),
        "rss_start_mib": round(start_rss / 2**20, 1),
        "rss_end_mib": round(end_rss / 2**20, 1),
        "in_flight_after": gauge,
        "server_exit_code": exit_code,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="a run, adapter or merged folder, or a model name")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("overrides", nargs="*", default=["model.device=cpu"], metavar="key=value")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    report = run(args.target, args.requests, args.clients, args.max_tokens, args.overrides)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
