"""``coma eval``: evaluate a model on MMEB (or a ``benchmark.yaml`` benchmark), or compare two score files.

Under ``torchrun`` every rank encodes a share of the inputs into the shared cache and rank 0 scores and reports.
"""

from __future__ import annotations

import argparse
import os

from coma.commands.encode import add_batching_arguments, batching_options
from coma.eval.registry import FORMAT_RULES

DTYPES = ("float32", "bfloat16", "float16")
FORMAT_RULE_NAMES = tuple(FORMAT_RULES)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="coma model folder (or a VLM folder / hub id)")
    parser.add_argument(
        "--data", help="benchmark folder: one sub-folder per dataset, optional benchmark.yaml"
    )
    parser.add_argument(
        "--image-root", default=None, help="folder the image paths are relative to (default: --data)"
    )
    parser.add_argument("--out", help="output folder for scores.json, scores.md, scores.png (and the cache)")
    parser.add_argument(
        "--datasets", default=None, help="comma-separated dataset names (default: all present)"
    )
    add_batching_arguments(parser)
    parser.add_argument("--cache-dir", default=None, help="embedding cache folder (default: OUT/cache)")
    parser.add_argument(
        "--limit", type=int, default=None, help="evaluate only the first N queries of each dataset"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None, help="default: bfloat16 on cuda, float32 on cpu"
    )
    parser.add_argument("--pooling", default=None, help="override the model's pooling")
    parser.add_argument(
        "--format-rule",
        choices=FORMAT_RULE_NAMES,
        default=None,
        help="how instruction, image token and text are joined (default: mmeb-v1 for MMEB-eval rows, "
        "mmeb-v2-instruct for MMEB_Test_Instruct rows; a benchmark.yaml may name its own)",
    )
    parser.add_argument(
        "--min-pixels", type=int, default=None, help="image pixel bounds (default: the model's saved bounds)"
    )
    parser.add_argument("--max-pixels", type=int, default=None)
    parser.add_argument(
        "--attn-implementation",
        default="auto",
        help="language model: auto (flash_attention_2 when installed on GPU, else sdpa), sdpa, eager, "
        "flash_attention_2",
    )
    parser.add_argument(
        "--vision-attn-implementation",
        default="auto",
        help="vision tower: auto (flash_attention_2 when installed on GPU, else packed_sdpa), packed_sdpa, sdpa, "
        "eager, flash_attention_2",
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out (and count in scores.json) queries whose row or images are bad instead of stopping",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("A_SCORES", "B_SCORES"),
        default=None,
        help="print two scores.json side by side with deltas (B - A) and exit; needs no model",
    )


def _init_distributed(device: str | None) -> tuple[str | None, bool]:
    """Join the process group when started by ``torchrun``; returns the device to use and whether we joined."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device, False
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return device, True


def run(args: argparse.Namespace) -> int:
    from coma.eval.report import compare_labels, compare_table, load_scores

    if args.compare:
        path_a, path_b = args.compare
        label_a, label_b = compare_labels(path_a, path_b)
        print(compare_table(load_scores(path_a), load_scores(path_b), label_a, label_b), end="")
        return 0
    absent = [
        flag
        for flag, value in (("--model", args.model), ("--data", args.data), ("--out", args.out))
        if not value
    ]
    if absent:
        raise ValueError(f"{', '.join(absent)} required (only --compare runs without a model)")

    import torch
    import torch.distributed as dist

    from coma.config import ComaConfig
    from coma.embedder import Embedder
    from coma.eval.report import markdown_report
    from coma.eval.runner import evaluate, prepare_benchmark

    options = batching_options(args)
    device, joined = _init_distributed(args.device)
    image_root = args.image_root if args.image_root is not None else args.data
    datasets = [name.strip() for name in args.datasets.split(",") if name.strip()] if args.datasets else None
    try:
        # Every row is read and checked before the model loads: a bad row fails in seconds.
        saved = ComaConfig.load(args.model) if os.path.isdir(args.model) else None
        prepared = prepare_benchmark(args.data, image_root, datasets, (saved or ComaConfig()).image_placeholder,
                                     limit=args.limit, skip_bad=args.skip_bad,
                                     show_progress=not args.no_progress, format_rule=args.format_rule)  # fmt: skip
        embedder = Embedder.from_pretrained(
            args.model,
            pooling=args.pooling,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
            device=device,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
            attn_implementation=args.attn_implementation,
            vision_attn_implementation=args.vision_attn_implementation,
        )
        scores = evaluate(
            embedder,
            args.data,
            image_root,
            args.out,
            datasets=datasets,
            cache_dir=args.cache_dir,
            show_progress=not args.no_progress,
            limit=args.limit,
            model_path=args.model,
            skip_bad=args.skip_bad,
            prepared=prepared,
            **options,
        )
    finally:
        if joined:
            dist.destroy_process_group()
    # torchrun sets RANK; only rank 0 wrote the reports.
    if int(os.environ.get("RANK", "0")) == 0:
        print(markdown_report(scores), end="")
        print(f"wrote {os.path.join(args.out, 'scores.json')}, scores.md, scores.png")
    return 0
