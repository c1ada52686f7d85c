"""``coma search``: the rows of a ``coma index`` folder nearest to a text, an image, or both, best first.

The model is the one the index records (``--model`` if it moved), loaded with the index's dtype, pooling and pixel
bounds and checked against the recorded fingerprint: a query from another model would rank noise.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from coma.serving.index import SearchHit

TEXT_WIDTH = 60
ID_WIDTH = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="index folder written by coma index")
    parser.add_argument("--text", default=None, help="query text")
    parser.add_argument("--image", default=None, help="query image file (with --text: one text+image query)")
    parser.add_argument("--k", type=int, default=10, help="how many results (default 10)")
    parser.add_argument("--instruction", default=None, help="instruction put before the query's text")
    parser.add_argument("--model", default=None, help="model folder (default: the one the index records)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per result")


def shorten(text: str, width: int) -> str:
    """One line of at most ``width`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_hits(hits: list[SearchHit]) -> str:
    """A ranked table: rank, score (4 decimals), id, then the row's text (shortened) and image."""
    id_width = min(ID_WIDTH, max([len("id"), *(len(hit.id) for hit in hits)]))
    lines = [f"{'rank':>4}  {'score':>7}  {'id':<{id_width}}  text / image"]
    for hit in hits:
        item = " ".join(
            part for part in (shorten(hit.text, TEXT_WIDTH), f"[{hit.image}]" if hit.image else "") if part
        )
        lines.append(f"{hit.rank:>4}  {hit.score:>7.4f}  {shorten(hit.id, id_width):<{id_width}}  {item}")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from coma.embedder import EncodeInput
    from coma.serving.index import Index, import_faiss

    import_faiss()  # before the model loads: a missing faiss is said at once
    if not args.text and args.image is None:
        raise ValueError("pass --text, --image or both")
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    if args.image is not None and not Path(args.image).is_file():
        raise FileNotFoundError(f"image not found: {args.image}")
    index = Index.load(args.index)
    embedder = index.load_embedder(args.model, device=args.device)
    query = EncodeInput(args.text or "", args.image)
    hits = index.search_inputs(embedder, [query], args.k, instruction=args.instruction)[0]
    if args.json:
        print("".join(json.dumps(asdict(hit), ensure_ascii=False) + "\n" for hit in hits), end="")
    else:
        print(format_hits(hits), end="")
    return 0
