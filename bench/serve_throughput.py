"""Serving throughput: one client at a time vs 8 concurrent clients, over HTTP, on the real SmolLM2.

Starts the real server (uvicorn, loopback) on the fine-tuned run if `make demo` made one (merged folder
first, then the run), else on the bundled base model, and sends the same requests twice: one after the
other, then from 8 clients at once. Prints requests/s, generated tokens/s and latency p50/p90 for both,
and the ratio. Numbers, not a test: nothing here is asserted.

    python bench/serve_throughput.py [--requests 16] [--clients 8] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from qlora_llm.config import load_config
from qlora_llm.server.app import create_app

TOPICS = [
    "a lighthouse",
    "the ocean",
    "a robot",
    "autumn",
    "a city at night",
    "mountains",
    "a library",
    "rain",
]


def pick_target() -> tuple[str, list[str]]:
    for folder in (Path("runs/smollm2-aclsum/merged"), Path("runs/smollm2-aclsum")):
        if folder.exists():
            return str(folder), []
    return "smollm2-135m-instruct", ["model.template=auto"]


def start_server(target: str, overrides: list[str]) -> str:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    own = Path(target) / "config.yaml"
    cfg = load_config(own if own.is_file() else None, ["model.device=cpu", "serve.max_queue=64", *overrides])
    server = uvicorn.Server(
        uvicorn.Config(create_app(cfg, target), host="127.0.0.1", port=port, log_level="warning")
    )
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return url
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def one(url: str, i: int, max_tokens: int) -> tuple[float, int]:
    body = {
        "messages": [{"role": "user", "content": f"Write a short poem about {TOPICS[i % len(TOPICS)]}."}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    start = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - start, r.json()["usage"]["completion_tokens"]


def run(url: str, clients: int, requests: int, max_tokens: int) -> dict[str, float]:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: one(url, i, max_tokens), range(requests)))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {
        "clients": clients,
        "requests": requests,
        "wall_s": wall,
        "req_per_s": requests / wall,
        "tok_per_s": tokens / wall,
        "tokens": tokens,
        "p50_s": statistics.median(latencies),
        "p90_s": latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    target, overrides = pick_target()
    url = start_server(target, overrides)
    one(url, 0, 4)  # warm-up
    rows = [
        run(url, 1, args.requests, args.max_tokens),
        run(url, args.clients, args.requests, args.max_tokens),
    ]
    print(f"\nserving {target} on CPU, {args.requests} chat requests of up to {args.max_tokens} tokens each")
    print(
        f"{'clients':>7} {'wall s':>8} {'req/s':>7} {'gen tok/s':>10} {'tokens':>7} {'p50 s':>7} {'p90 s':>7}"
    )
    for r in rows:
        print(
            f"{r['clients']:>7} {r['wall_s']:>8.1f} {r['req_per_s']:>7.2f} {r['tok_per_s']:>10.1f} "
            f"{r['tokens']:>7} {r['p50_s']:>7.2f} {r['p90_s']:>7.2f}"
        )
    print(
        f"throughput ratio ({args.clients} clients vs 1): x{rows[1]['tok_per_s'] / rows[0]['tok_per_s']:.2f}"
    )


if __name__ == "__main__":
    main()
