"""``coma serve``: an OpenAI-compatible HTTP embedding server (and search, with ``--index``) on FastAPI + uvicorn.

Concurrent requests share forwards: the items queued while the previous forward ran, plus those arriving within
``--max-wait-ms`` of the oldest one (default 0: none are waited for), at most ``--max-batch-size``, run as one batch. With ``--index`` the model is loaded as the index was built (dtype, pooling,
pixel bounds) and checked against the index's recorded fingerprint, as ``coma search`` does.
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import sys
from pathlib import Path

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
HOST = "127.0.0.1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Limits default to None here so that --help imports neither the server nor torch; create_app has the defaults.
    parser.add_argument(
        "--model",
        default=None,
        help="coma model folder, or a VLM folder / hub id (default with --index: its model)",
    )
    parser.add_argument(
        "--index", default=None, help="index folder written by coma index: enables /v1/search"
    )
    parser.add_argument(
        "--host", default=HOST, help=f"address to listen on (default {HOST}: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients send (default: the model folder's name)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--max-batch-size", type=int, default=32, help="items per shared forward (1: no batching)"
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=0.0,
        help="how long a queued item waits for others to join its batch (default 0: under load, batches fill with "
        "what queued during the previous forward; on this CPU a 5 ms wait added latency and no throughput)",
    )
    parser.add_argument("--no-batching", action="store_true", help="every item is a forward of its own")
    parser.add_argument(
        "--max-image-bytes", type=int, default=None, help="largest image payload, decoded (default: 20 MiB)"
    )
    parser.add_argument(
        "--max-body-bytes", type=int, default=None, help="largest request body (default: 64 MiB)"
    )
    parser.add_argument(
        "--max-input-tokens",
        type=int,
        default=None,
        help="most text tokens per input (default: the context length)",
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")


def served_name(model: str) -> str:
    """The default served name: a folder's name, or a hub id as given."""
    path = Path(model)
    return path.resolve().name if path.is_dir() else model


def run(args: argparse.Namespace) -> int:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"coma serve needs {' and '.join(missing)}: pip install 'coma[serve]'")
    limits = {"max_image_bytes": args.max_image_bytes, "max_body_bytes": args.max_body_bytes}
    limits = {key: value for key, value in limits.items() if value is not None}
    for flag, value, low in (
        ("--max-batch-size", args.max_batch_size, 1),
        ("--max-wait-ms", args.max_wait_ms, 0),
        ("--max-image-bytes", args.max_image_bytes, 1),
        ("--max-body-bytes", args.max_body_bytes, 1),
        ("--max-input-tokens", args.max_input_tokens, 1),
    ):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be at least {low}, got {value}")
    if args.model is None and args.index is None:
        raise ValueError("pass --model (or --index, whose recorded model is then served)")

    import uvicorn

    from coma.embedder import Embedder
    from coma.serving.server import create_app

    index = None
    if args.index is not None:
        from coma.serving.index import Index

        index = Index.load(args.index)
        embedder = index.load_embedder(args.model, device=args.device, check=index.fingerprint is not None)
    else:
        embedder = Embedder.from_pretrained(args.model, device=args.device)
    name = args.served_model_name or served_name(args.model or index.model)
    app = create_app(
        embedder,
        served_model_name=name,
        index=index,
        max_batch_size=1 if args.no_batching else args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_input_tokens=args.max_input_tokens,
        **limits,
    )
    if not _is_loopback(args.host):
        print(f"coma serve: warning: listening on {args.host} without authentication", file=sys.stderr)
    search = " (and /v1/search)" if index is not None else ""
    print(f"coma serve: {name} on http://{args.host}:{args.port}/v1{search}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
