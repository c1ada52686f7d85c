"""Requests/s and p50/p99 latency of ``coma serve`` with batching on and off, side by side (tiny model, loopback).

Builds a tiny random model and serves it in-process on 127.0.0.1 three times: batching on (up to ``--max-batch-size``
items within ``--max-wait-ms``), on without waiting (whatever is queued when the worker is free), and off (every
request a forward of its own). Each is driven by C concurrent clients (httpx, keep-alive) sending ``--requests``
one-item ``/v1/embeddings`` requests per level: distinct texts, or image conversations (a 112×112 PNG data URL and a
line of text). The clients run in the server's process, so on a small machine they take CPU from it: compare the
rows, not the absolute figures.

    .venv/bin/python scripts/bench_serve.py [--concurrency 1,16,64] [--requests 512] [--kind text,image]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from coma.backbones.tiny import init_model  # noqa: E402
from coma.embedder import Embedder  # noqa: E402
from coma.serving.server import create_app, serve_in_thread  # noqa: E402

NAME = "bench"
WARMUP_REQUESTS = 16


def request_bodies(kind: str, n: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct one-item request bodies, JSON-encoded once so the clients spend no time on it."""
    if kind == "text":
        return [json.dumps({"model": NAME, "input": f"query {i}: what is in picture {i % 97}?"}).encode()
                for i in range(n)]  # fmt: skip
    rng = np.random.default_rng(seed)
    urls = []
    for _ in range(16):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(buffer, "PNG")
        urls.append(f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}")
    bodies = []
    for i in range(n):
        content = [{"type": "image_url", "image_url": {"url": urls[i % len(urls)]}},
                   {"type": "text", "text": f"picture {i}"}]  # fmt: skip
        bodies.append(
            json.dumps({"model": NAME, "messages": [{"role": "user", "content": content}]}).encode()
        )
    return bodies


async def drive(url: str, bodies: list[bytes], concurrency: int) -> tuple[float, list[float]]:
    """Send every body with ``concurrency`` clients; ``(seconds, latencies)``."""
    latencies: list[float] = []
    pending = iter(bodies)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=120.0, limits=limits) as client:

        async def one_client() -> None:
            for body in pending:
                start = time.perf_counter()
                reply = await client.post("/v1/embeddings", content=body, headers=headers)
                latencies.append(time.perf_counter() - start)
                if reply.status_code != 200:
                    raise RuntimeError(f"the server answered {reply.status_code}: {reply.text[:300]}")

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        return time.perf_counter() - start, latencies


def measure(
    embedder: Embedder, kind: str, levels: list[int], n: int, max_batch_size: int, max_wait_ms: float
) -> list[dict]:
    app = create_app(embedder, served_model_name=NAME, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)
    batcher = app.state.service.batcher
    rows = []
    with serve_in_thread(app) as url:
        asyncio.run(drive(url, request_bodies(kind, WARMUP_REQUESTS, seed=1), 4))
        for level in levels:
            before = batcher.stats
            seconds, latencies = asyncio.run(drive(url, request_bodies(kind, n), level))
            after = batcher.stats
            forwards = after["forwards"] - before["forwards"]
            p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
            rows.append({"rps": n / seconds, "p50": p50, "p99": p99,
                         "batch": (after["items"] - before["items"]) / max(forwards, 1)})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,16,64", help="client counts, comma-separated")
    parser.add_argument("--requests", type=int, default=512, help="requests per concurrency level")
    parser.add_argument("--kind", default="text,image", help="text, image, or both (comma-separated)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="of the batching server")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="of the batching server")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    kinds = args.kind.split(",")
    if not set(kinds) <= {"text", "image"}:
        parser.error(f"--kind takes text and/or image, got {args.kind!r}")
    servers = {
        f"batching on (max {args.max_batch_size}, {args.max_wait_ms:g} ms)": (
            args.max_batch_size,
            args.max_wait_ms,
        ),
        f"batching on (max {args.max_batch_size}, 0 ms)": (args.max_batch_size, 0.0),
        "batching off (max 1)": (1, 0.0),
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = init_model(Path(tmp) / "tiny", family="qwen2_vl", size="tiny", seed=0)
        embedder = Embedder.from_pretrained(model_dir, device="cpu")
        print(f"tiny qwen2_vl on {os.cpu_count()} CPUs, {args.requests} one-item requests per level")
        for kind in kinds:
            rows = {
                name: measure(embedder, kind, levels, args.requests, *config)
                for name, config in servers.items()
            }
            print(f"\n{kind} requests\n")
            print("| clients | server | requests/s | p50 ms | p99 ms | mean batch |")
            print("|---:|---|---:|---:|---:|---:|")
            for i, level in enumerate(levels):
                for name, results in rows.items():
                    r = results[i]
                    print(
                        f"| {level} | {name} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['batch']:.1f} |"
                    )


if __name__ == "__main__":
    main()
