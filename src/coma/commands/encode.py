"""``coma encode``: embed a JSONL file of ``{"text", "image"}`` lines into a ``.npy`` matrix."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="coma model folder, or a VLM folder / hub id")
    parser.add_argument("--input", required=True, help='JSONL file, one {"text": ..., "image": ...} per line')
    parser.add_argument("--out", required=True, help="output .npy file (N × D float32, L2-normalised)")
    parser.add_argument("--instruction", default=None, help="instruction put before every input's text")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pooling", default=None, help="override the model's pooling")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-progress", action="store_true")


def read_encode_inputs(path: Path) -> list:
    """Read the JSONL input; image paths are relative to the file's folder."""
    from coma.embedder import EncodeInput, as_encode_input
    from coma.io import iter_jsonl

    items = []
    for line_number, row in iter_jsonl(path):
        try:
            item = as_encode_input(row)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}:{line_number}: {error}") from None
        if item.image is not None and not isinstance(item.image, str):
            raise ValueError(f"{path}:{line_number}: field 'image' must be a path string")
        items.append(EncodeInput(item.text, str(path.parent / item.image) if item.image else None))
    return items


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from coma.embedder import Embedder
    from coma.io import atomic_open

    path = Path(args.input)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    items = read_encode_inputs(path)
    embedder = Embedder.from_pretrained(args.model, pooling=args.pooling, device=args.device)
    embeddings = embedder.encode(
        items, instruction=args.instruction, batch_size=args.batch_size, show_progress=not args.no_progress
    )
    with atomic_open(args.out, "wb") as handle:
        np.save(handle, embeddings)
    print(f"encoded {len(items)} inputs -> {args.out} {embeddings.shape}")
    return 0
