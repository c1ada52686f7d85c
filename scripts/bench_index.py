"""Benchmark the index kinds of ``coma index`` on synthetic embeddings: build time, recall@10 against flat,
queries/s and size.

The vectors stand in for a collection's embeddings: L2-normalised points around random cluster centres (a point
has cosine ~0.7 with its centre at the default spread, ~0.5 with another point of its cluster, ~0 across
clusters). Queries are noisy copies of random data points, so each has one clear nearest row and the rest of its
top 10 comes from a crowd of near-ties in its cluster, which is what approximate indexes get wrong. Recall@10 is
the share of flat's (exact) top 10 that a kind returns, "top-1 = flat's" how often its best row is flat's;
queries/s is measured with all queries in one call and with one query per call (the first ``--single``).
Prints a markdown table.

    .venv/bin/python scripts/bench_index.py [--n 100000] [--dim 2048] [--queries 1000] [--clusters 1000]
        [--spread 1.0] [--query-noise 0.5] [--single 200] [--kinds flat,hnsw,ivfpq] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from coma.serving.index import FAISS_FILE, KINDS, Index, SearchHit, import_faiss

CHUNK = 10_000


def around(centres: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors at Gaussian offsets of norm ~``spread`` from unit-norm ``centres`` (one per row)."""
    noise = rng.standard_normal(centres.shape, dtype=np.float32) * np.float32(
        spread / np.sqrt(centres.shape[1])
    )
    points = centres + noise
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def synthetic(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """``(data, queries)``: ``args.n`` clustered unit vectors and ``args.queries`` noisy copies of random ones."""
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    data = np.empty((args.n, args.dim), dtype=np.float32)
    for start in range(0, args.n, CHUNK):
        labels = rng.integers(args.clusters, size=min(CHUNK, args.n - start))
        data[start : start + len(labels)] = around(centres[labels], args.spread, rng)
    sources = rng.choice(args.n, size=args.queries, replace=args.queries > args.n)
    return data, around(data[sources], args.query_noise, rng)


def recall_at_10(found: list[list[SearchHit]], truth: list[list[SearchHit]]) -> float:
    return float(
        np.mean(
            [len({h.id for h in a} & {h.id for h in b}) / len(b) for a, b in zip(found, truth, strict=True)]
        )
    )


def top1_agreement(found: list[list[SearchHit]], truth: list[list[SearchHit]]) -> float:
    """How often a kind's best row is flat's (each query has one clear nearest row by construction)."""
    return float(np.mean([a[0].id == b[0].id for a, b in zip(found, truth, strict=True)]))


def measure(kind: str, data: np.ndarray, queries: np.ndarray, single: int) -> dict:
    """Build one index and time its searches; ``hits`` are its top 10 of every query."""
    started = time.perf_counter()
    index = Index.from_embeddings(data, kind=kind)
    build = time.perf_counter() - started
    started = time.perf_counter()
    hits = index.search(queries, 10)
    batch = len(queries) / (time.perf_counter() - started)
    started = time.perf_counter()
    for query in queries[:single]:
        index.search(query[None], 10)
    one = min(single, len(queries)) / (time.perf_counter() - started)
    with tempfile.TemporaryDirectory(prefix="coma-bench-index-") as folder:
        size = (index.save(folder) / FAISS_FILE).stat().st_size
    return {"kind": kind, "params": index.params, "build": build, "batch": batch, "one": one, "bytes": size,
            "hits": hits}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="indexed vectors")
    parser.add_argument("--dim", type=int, default=2048, help="dimension (Qwen2.5-VL-3B's hidden size)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=1.0, help="offset norm of a point from its centre")
    parser.add_argument("--query-noise", type=float, default=0.5, help="offset norm of a query from its row")
    parser.add_argument("--single", type=int, default=200, help="queries timed one per call")
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help="comma-separated; flat always runs (the truth)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    kinds = ["flat", *(kind for kind in args.kinds.split(",") if kind and kind != "flat")]
    faiss = import_faiss()
    started = time.perf_counter()
    data, queries = synthetic(args)
    print(f"data: {args.n:,} × {args.dim} float32 in {args.clusters} clusters, {args.queries} queries "
          f"({time.perf_counter() - started:.1f} s); faiss {faiss.__version__}, {faiss.omp_get_max_threads()} "
          "threads", flush=True)  # fmt: skip
    results = []
    for kind in kinds:
        results.append(measure(kind, data, queries, args.single))
        print(f"{kind}: built in {results[-1]['build']:.1f} s", flush=True)
    truth = results[0]["hits"]
    print()
    print(
        "| kind | params | build s | recall@10 vs flat | top-1 = flat's | queries/s (batch) | queries/s (one at a time) | index MB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for result in results:
        params = ", ".join(f"{key}={value}" for key, value in result["params"].items()) or "exact"
        print(
            f"| {result['kind']} | {params} | {result['build']:.1f} | {recall_at_10(result['hits'], truth):.3f} "
            f"| {top1_agreement(result['hits'], truth):.3f} "
            f"| {result['batch']:,.0f} | {result['one']:,.0f} | {result['bytes'] / 2**20:,.0f} |"
        )


if __name__ == "__main__":
    main()
