"""``coma index``: embed a JSONL file or an image folder into a faiss index folder (``coma search`` queries it).

Embeddings go through the eval cache (``INDEX_DIR/cache`` by default), so an interrupted run, a rebuild with
``--overwrite`` (another ``--kind``, say) or an ``--append`` of a grown file encodes only what the cache lacks.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from coma.serving.index import KIND_PARAMS, KINDS

if TYPE_CHECKING:
    from coma.embedder import Embedder
    from coma.serving.index import Index

# parameter -> its flag (coma.serving.index documents the parameters and their defaults).
PARAM_FLAGS = {name: f"--{name.replace('_', '-')}" for params in KIND_PARAMS.values() for name in params}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="coma model folder (default with --append: the index's)"
    )
    parser.add_argument(
        "--input",
        required=True,
        help='JSONL file, one {"text", "image", optional "id"} per line (image paths relative to the file), '
        "or a folder of images (searched recursively; the id is the path inside the folder)",
    )
    parser.add_argument("--out", required=True, help="index folder (index.faiss, rows.jsonl, index.json)")
    parser.add_argument("--kind", choices=KINDS, default=None, help="flat (exact, default), hnsw or ivfpq")
    for kind, params in KIND_PARAMS.items():
        for name, default in params.items():
            parser.add_argument(
                PARAM_FLAGS[name],
                type=int,
                default=None,
                help=f"{kind} parameter (default: {default or 'auto'})",
            )
    parser.add_argument("--instruction", default=None, help="instruction put before every input's text")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache-dir", default=None, help="embedding cache folder (default: OUT/cache)")
    parser.add_argument("--pooling", default=None, help="override the model's pooling")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="default: bf16 on cuda, fp32 on cpu",
    )
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="rebuild an index already in OUT")
    existing.add_argument("--append", action="store_true", help="add the inputs to the index in OUT")
    parser.add_argument("--no-progress", action="store_true")


def read_index_inputs(path: Path, placeholder: str = "<|image_1|>") -> tuple[list, list[str], list[str]]:
    """``(inputs, ids, sources)`` of a JSONL file or an image folder; ids are checked to be unique here.

    A JSONL line's id is its ``"id"`` (string or integer) or else its line number, its source ``FILE:LINE``; an
    image's id and source are its path inside the folder.
    """
    from coma.data.images import list_image_files
    from coma.embedder import EncodeInput

    if path.is_dir():
        images = list_image_files(path)
        if not images:
            raise FileNotFoundError(f"{path}: no image files in the folder")
        names = [image.relative_to(path).as_posix() for image in images]
        return [EncodeInput(image=str(image)) for image in images], names, list(names)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    items, ids, sources = _read_jsonl(path, placeholder)
    if not items:
        raise ValueError(f"{path}: no inputs (the file has no lines)")
    return items, ids, sources


def _read_jsonl(path: Path, placeholder: str) -> tuple[list, list[str], list[str]]:
    """``coma encode``'s inputs with each line's ``"id"`` (its line number when it has none) and source."""
    from coma.commands.encode import iter_encode_lines

    items, ids, sources = [], [], []
    first_line: dict[str, int] = {}
    for line_number, id_, item in iter_encode_lines(path, placeholder):
        id_ = line_number if id_ is None else id_
        if isinstance(id_, bool) or not isinstance(id_, (str, int)) or id_ == "":
            raise ValueError(f"{path}:{line_number}: field 'id' must be a non-empty string or an integer")
        id_ = str(id_)
        if id_ in first_line:
            raise ValueError(f"{path}:{line_number}: duplicate id {id_!r} (also on line {first_line[id_]})")
        first_line[id_] = line_number
        items.append(item)
        ids.append(id_)
        sources.append(f"{path.name}:{line_number}")
    return items, ids, sources


def run(args: argparse.Namespace) -> int:
    from coma.config import ComaConfig
    from coma.serving.index import META_FILE, Index, import_faiss, resolve_params

    import_faiss()  # before the model loads: a missing faiss is said at once
    started = time.perf_counter()
    out = Path(args.out)
    params = {name: getattr(args, name) for name in PARAM_FLAGS if getattr(args, name) is not None}
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not an index folder")
    exists = (out / META_FILE).is_file()
    if args.append and not exists:
        raise FileNotFoundError(f"{out / META_FILE} not found: --append adds to an index coma index wrote")
    if exists and not (args.overwrite or args.append):
        raise ValueError(
            f"{out} already holds an index; pass --overwrite to rebuild it or --append to add to it"
        )
    index = Index.load(out) if args.append else None
    if index is not None:
        fixed = [PARAM_FLAGS[name] for name in params]
        fixed += [flag for flag, value in (("--pooling", args.pooling), ("--dtype", args.dtype)) if value]
        if args.kind not in (None, index.kind):
            fixed.append("--kind")
        if fixed:
            raise ValueError(
                f"--append keeps the index's kind ({index.kind}), parameters and model settings; "
                f"leave out {', '.join(fixed)}"
            )
        model = args.model if args.model is not None else index.model
    elif args.model is None:
        raise ValueError("--model is required to build an index (--append can use the index's)")
    else:
        model = args.model
    saved = ComaConfig.load(model) if model is not None and os.path.isdir(model) else None
    # Inputs, ids and parameters are checked before the model loads: a bad line fails in seconds.
    # Absolute image paths keep the rows (and their cache keys) valid from any working directory.
    source = Path(os.path.abspath(args.input))
    items, ids, sources = read_index_inputs(source, (saved or ComaConfig()).image_placeholder)
    if index is None:
        resolve_params(args.kind or "flat", params, len(items))
    embedder = _load_model(model, index, args)
    options = {
        "ids": ids,
        "sources": sources,
        "cache_dir": args.cache_dir if args.cache_dir is not None else out / "cache",
        "instruction": args.instruction,
        "batch_size": args.batch_size,
        "show_progress": not args.no_progress,
    }
    if index is None:
        index = Index.build(embedder, items, kind=args.kind or "flat", **options, **params)
    else:
        index.add(embedder, items, **options)
    index.save(out)
    stats = index.encode_stats
    print(
        f"indexed {len(items)} rows -> {out} ({len(index)} rows, dim {index.dim}, {index.kind}) in "
        f"{time.perf_counter() - started:.1f} s; {stats.encoded} inputs encoded, {stats.cached} from the cache"
    )
    return 0


def _load_model(model: str | None, index: Index | None, args: argparse.Namespace) -> Embedder:
    """A new index's model as the flags say; an appended index's as it was built (``Index.add`` checks it)."""
    import torch

    from coma.embedder import Embedder

    if index is not None:
        return index.load_embedder(model, device=args.device, check=False)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return Embedder.from_pretrained(model, pooling=args.pooling, device=args.device, dtype=dtype)
