"""``coma encode``: embed a JSONL file of ``{"text", "image"}`` lines into a ``.npy`` matrix."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from coma.embedder import EncodeInput


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="coma model folder, or a VLM folder / hub id")
    parser.add_argument(
        "--input",
        required=True,
        help='JSONL file, one {"text": ..., "image": ...} per line (an "id" key is allowed and ignored), or a folder of '
        "images (searched recursively)",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output .npy file (N × D float32, L2-normalised); for a folder, OUT.paths.txt lists the rows' images",
    )
    parser.add_argument("--instruction", default=None, help="instruction put before every input's text")
    add_batching_arguments(parser)
    parser.add_argument("--pooling", default=None, help="override the model's pooling")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-progress", action="store_true")


def add_batching_arguments(parser: argparse.ArgumentParser) -> None:
    """``--batch-size``, ``--max-batch-tokens`` and ``--num-workers``, shared by ``coma encode`` and ``coma eval``."""
    from coma.data.batching import DEFAULT_MAX_BATCH_TOKENS

    parser.add_argument("--batch-size", type=int, default=32, help="rows per batch at most (default: 32)")
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=DEFAULT_MAX_BATCH_TOKENS,
        help="padded tokens (rows × longest sequence, visual tokens included) per batch at most; inputs are grouped "
        f"by length under it, an input longer than it goes alone; 0: rows only (default: {DEFAULT_MAX_BATCH_TOKENS})",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="processes that decode images and run the processor ahead of the model; 0: in the main process "
        "(default: on a GPU the CPUs per local rank less one, at most 8; on CPU 0, as the model uses every core)",
    )


def batching_options(args: argparse.Namespace) -> dict:
    """``Embedder.encode`` / ``evaluate`` keywords from :func:`add_batching_arguments`'s flags."""
    import torch

    from coma.data.pipeline import resolve_num_workers

    if args.max_batch_tokens < 0:
        raise ValueError(f"--max-batch-tokens must be >= 0, got {args.max_batch_tokens}")
    workers = args.num_workers
    on_cpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")
    if workers is None and on_cpu:
        # The model's threads already use every core: a worker competes with them (scripts/bench_eval.py measured
        # 1.6x fewer items/s with one on 2 cores).
        workers = 0
    return {
        "batch_size": args.batch_size,
        "max_batch_tokens": args.max_batch_tokens or None,
        "num_workers": resolve_num_workers(workers),
    }


def read_encode_inputs(path: Path, placeholder: str = "<|image_1|>") -> list:
    """Read the JSONL input; image paths are relative to the file's folder.

    A text-only line whose text holds the image placeholder loses it (counted and reported once).
    """
    return [item for _, _, item in iter_encode_lines(path, placeholder)]


def iter_encode_lines(path: Path, placeholder: str) -> Iterator[tuple[int, Any, EncodeInput]]:
    """``(line number, the line's "id" or None, input)`` for each line of a JSONL input (see ``read_encode_inputs``)."""
    from coma.data.formats import PlaceholderFixes
    from coma.embedder import EncodeInput, as_encode_input
    from coma.io import iter_jsonl

    fixes = PlaceholderFixes(placeholder)
    for line_number, row in iter_jsonl(path):
        id_ = row.pop("id", None)
        try:
            item = as_encode_input(row)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}:{line_number}: {error}") from None
        if item.image is not None and not isinstance(item.image, str):
            raise ValueError(f"{path}:{line_number}: field 'image' must be a path string")
        text = fixes.fix(item.text, item.image is not None, path.name, "inputs")
        yield line_number, id_, EncodeInput(text, str(path.parent / item.image) if item.image else None)
    for line in fixes.lines():
        print(line)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from coma.data.images import list_image_files
    from coma.embedder import Embedder, EncodeInput
    from coma.io import atomic_open

    path = Path(args.input)
    options = batching_options(args)
    embedder = Embedder.from_pretrained(args.model, pooling=args.pooling, device=args.device)
    images = None
    if path.is_dir():
        images = list_image_files(path)
        if not images:
            raise FileNotFoundError(f"{path}: no image files in the folder")
        items = [EncodeInput(image=str(image)) for image in images]
    elif path.is_file():
        items = read_encode_inputs(path, embedder.config.image_placeholder)
    else:
        raise FileNotFoundError(f"input file not found: {path}")
    embeddings = embedder.encode(
        items, instruction=args.instruction, show_progress=not args.no_progress, **options
    )
    with atomic_open(args.out, "wb") as handle:
        np.save(handle, embeddings)
    if images is not None:
        with atomic_open(f"{args.out}.paths.txt") as handle:
            handle.write("".join(f"{image.relative_to(path)}\n" for image in images))
    print(f"encoded {len(items)} inputs -> {args.out} {embeddings.shape}")
    return 0
