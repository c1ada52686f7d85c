"""Benchmark the evaluation harness on a tiny random model and a synthetic MMEB-format benchmark.

The fixture has MMEB's duplication pattern: classification and VQA candidates come from label/answer sets shared
by every query, retrieval candidates from a shared pool of images and captions, and the same images appear in
several datasets. Prints inputs before/after de-duplication (encode calls saved), encoding items/s, total
seconds, and the time of a second run that finds every embedding in the cache.

    .venv/bin/python scripts/bench_eval.py [--queries 48] [--candidates 16] [--batch-size 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from coma.backbones.tiny import init_model  # noqa: E402
from coma.embedder import Embedder  # noqa: E402
from coma.eval.runner import evaluate  # noqa: E402

IMAGE_TEXT = "<|image_1|>\nRepresent the given image."
COLOURS = [
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "cyan",
    "white",
    "black",
    "grey",
    "pink",
    "brown",
]
SHAPES = ["circle", "square", "triangle", "diamond", "cross", "star", "ring", "heart"]


def write_images(root: Path, count: int, rng: np.random.Generator) -> list[str]:
    (root / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        width, height = (int(rng.choice([56, 84, 112])) for _ in range(2))
        pixels = (rng.random((height, width, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(root / "images" / f"{index}.png")
        paths.append(f"images/{index}.png")
    return paths


def ranked(positive: str, pool: list[str], count: int, rng: np.random.Generator) -> list[str]:
    """The positive first, then ``count - 1`` distinct others drawn from the pool."""
    others = [item for item in pool if item != positive]
    return [positive, *rng.choice(others, size=count - 1, replace=False).tolist()]


def row(qry_text: str, qry_img_path: str, tgt_text: list[str], tgt_img_path: list[str] | None = None) -> dict:
    """One MMEB-eval row; text candidates get empty image paths."""
    return {
        "qry_text": qry_text,
        "qry_img_path": qry_img_path,
        "tgt_text": tgt_text,
        "tgt_img_path": tgt_img_path if tgt_img_path is not None else [""] * len(tgt_text),
    }


def build_benchmark(root: Path, queries: int, candidates: int, seed: int = 0) -> None:
    """Six MMEB-named datasets (hub schema, parquet) over one shared image pool."""
    rng = np.random.default_rng(seed)
    images = write_images(root, max(queries, candidates) + 8, rng)
    # Label, answer and caption pools shared by every query of a dataset, as in MMEB.
    labels = [f"a photo of a {colour} {shape}" for colour in COLOURS for shape in SHAPES]
    answers = COLOURS + SHAPES + [str(number) for number in range(10)]
    captions = [f"A {c} {s} next to a {t}." for c in COLOURS for s in SHAPES for t in SHAPES if s != t]
    captions = [captions[i] for i in rng.permutation(len(captions))[: len(images)]]
    if candidates > len(answers):
        raise SystemExit(f"--candidates must be at most {len(answers)}")

    def classification(instruction: str) -> list[dict]:
        return [
            row(
                f"<|image_1|>\n{instruction}",
                images[i],
                ranked(labels[i % len(labels)], labels, candidates, rng),
            )
            for i in range(queries)
        ]

    datasets = {
        "ImageNet-1K": classification("Represent the given image for classification."),
        "VOC2007": classification("Identify the object shown in the image."),
        "OK-VQA": [
            row(
                f"<|image_1|>\nRepresent the given image with the following question: What is shown {i % 7}?",
                images[i],
                ranked(answers[i % len(answers)], answers, candidates, rng),
            )
            for i in range(queries)
        ],
        "MSCOCO_i2t": [
            row(
                "<|image_1|>\nFind an image caption describing the given everyday image.",
                images[i],
                ranked(captions[i % len(captions)], captions, candidates, rng),
            )
            for i in range(queries)
        ],
        "MSCOCO_t2i": [
            row(
                f"Find me an everyday image that matches the given caption: {captions[i % len(captions)]}",
                "",
                [IMAGE_TEXT] * candidates,
                ranked(images[i % len(captions)], images, candidates, rng),
            )
            for i in range(queries)
        ],
        "NIGHTS": [
            row(
                "<|image_1|>\nFind a day-to-day image that looks similar to the provided image.",
                images[i],
                [IMAGE_TEXT] * candidates,
                ranked(images[(i + 1) % len(images)], images, candidates, rng),
            )
            for i in range(queries)
        ],
    }
    for name, rows in datasets.items():
        (root / name).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), root / name / "test-00000-of-00001.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=48, help="queries per dataset")
    parser.add_argument("--candidates", type=int, default=16, help="candidates per query")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="coma-bench-eval-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        model_dir = init_model(tmp / "model", family="qwen2_vl", size="tiny", seed=0)
        build_benchmark(tmp / "data", args.queries, args.candidates)
        print(f"setup (tiny model + fixture): {time.perf_counter() - started:.1f} s")
        embedder = Embedder.from_pretrained(model_dir, device=args.device)
        runs = []
        for label in ("cold cache", "warm cache"):
            started = time.perf_counter()
            scores = evaluate(
                embedder,
                tmp / "data",
                tmp / "data",
                tmp / "out",
                batch_size=args.batch_size,
                show_progress=False,
            )
            runs.append((label, time.perf_counter() - started, scores["settings"]))
        cold = runs[0][2]
        saved = cold["n_inputs"] - cold["n_unique_inputs"]
        rate = cold["n_encoded"] / cold["encode_seconds"]
        print(f"datasets: {len(scores['datasets'])} (missing from MMEB: {len(scores['missing'])})")
        print(
            f"inputs: {cold['n_inputs']} before de-duplication, {cold['n_unique_inputs']} distinct "
            f"-> {saved} encode calls saved ({100 * saved / cold['n_inputs']:.1f} %, "
            f"{cold['n_inputs'] / cold['n_unique_inputs']:.1f}x fewer)"
        )
        print(
            f"encoding: {cold['n_encoded']} inputs in {cold['encode_seconds']:.2f} s = {rate:.1f} items/s "
            f"(batch {args.batch_size}, {args.device}, {scores['settings']['dtype']}, torch threads {torch.get_num_threads()}); "
            f"without de-duplication ~{cold['n_inputs'] / rate:.1f} s"
        )
        for label, seconds, settings in runs:
            print(
                f"{label}: {seconds:.2f} s total, {settings['n_encoded']} encoded, {settings['n_cached']} cached"
            )
        print(
            f"overall P@1 strict {100 * scores['overall']['p@1']:.1f} / ties {100 * scores['overall']['p@1_ties']:.1f}"
        )


if __name__ == "__main__":
    main()
