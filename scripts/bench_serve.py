"""Requests/s and p50/p99 latency of ``coma serve`` with batching on and off, side by side (tiny model, loopback).

Builds a tiny random model and serves it with ``coma serve`` (its own process, on 127.0.0.1) three times: batching
on as by default (whatever queued while the worker was busy, up to ``--max-batch-size`` items), on with a wait for
more (``--max-wait-ms``), and off (``--no-batching``: every request a forward of its own). Each is driven by C concurrent clients
(httpx, keep-alive, in this process) sending ``--requests`` one-item ``/v1/embeddings`` requests per level: distinct
texts, or image conversations (a 112×112 PNG data URL and a line of text). The clients share the machine's cores
with the server: compare the rows, not the absolute figures. "mean batch" is items per forward, from the counts
``GET /health`` reports.

    .venv/bin/python scripts/bench_serve.py [--concurrency 1,16,64] [--requests 512] [--kind text,image]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from coma.backbones.tiny import init_model  # noqa: E402

NAME = "bench"
HOST = "127.0.0.1"
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


async def post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> tuple[int, bytes]:
    """One keep-alive ``POST /v1/embeddings`` over an open connection: ``(status, body)``.

    A bare HTTP/1.1 client: httpx's async pool costs more CPU per request than the server does at 64 connections,
    and the clients share the machine with the server.
    """
    head = f"POST /v1/embeddings HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
    writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    status_line, *header_lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in header_lines if line)
    return int(status_line.split()[1]), await reader.readexactly(int(headers["content-length"]))


async def drive(url: str, bodies: list[bytes], concurrency: int) -> tuple[float, list[float]]:
    """Send every body with ``concurrency`` clients, one connection each; ``(seconds, latencies)``."""
    latencies: list[float] = []
    pending = iter(bodies)
    port = int(url.rsplit(":", 1)[1])

    async def one_client() -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            for body in pending:
                start = time.perf_counter()
                status, reply = await post(reader, writer, body)
                latencies.append(time.perf_counter() - start)
                if status != 200:
                    raise RuntimeError(f"the server answered {status}: {reply[:300]!r}")
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def coma_serve(model_dir: Path, flags: list[str], timeout: float = 120.0) -> Iterator[str]:
    """``coma serve`` in a subprocess, as a user starts it; yields its URL once ``/health`` answers."""
    port = free_port()
    command = [sys.executable, "-m", "coma.cli", "serve", "--model", str(model_dir), "--port", str(port),
               "--served-model-name", NAME, "--device", "cpu", "--log-level", "warning", *flags]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"coma serve exited with {server.returncode}: {' '.join(command)}")
            try:
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"coma serve did not answer on {url} within {timeout:.0f} s")
            time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(30)


def measure(model_dir: Path, kind: str, levels: list[int], n: int, flags: list[str]) -> list[dict]:
    rows = []
    with coma_serve(model_dir, flags) as url:
        asyncio.run(drive(url, request_bodies(kind, WARMUP_REQUESTS, seed=1), 4))
        for level in levels:
            before = httpx.get(f"{url}/health").json()
            seconds, latencies = asyncio.run(drive(url, request_bodies(kind, n), level))
            after = httpx.get(f"{url}/health").json()
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
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="of the second batching server")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    kinds = args.kind.split(",")
    if not set(kinds) <= {"text", "image"}:
        parser.error(f"--kind takes text and/or image, got {args.kind!r}")
    size = ["--max-batch-size", str(args.max_batch_size)]
    servers = {
        f"batching on (max {args.max_batch_size}, 0 ms wait: the default)": [*size],
        f"batching on (max {args.max_batch_size}, {args.max_wait_ms:g} ms wait)": [
            *size,
            "--max-wait-ms",
            str(args.max_wait_ms),
        ],
        "batching off (--no-batching)": ["--no-batching"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = init_model(Path(tmp) / "tiny", family="qwen2_vl", size="tiny", seed=0)
        print(f"tiny qwen2_vl on {os.cpu_count()} CPUs, {args.requests} one-item requests per level")
        for kind in kinds:
            rows = {
                name: measure(model_dir, kind, levels, args.requests, flags)
                for name, flags in servers.items()
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
