"""``coma generate``: stage-1 conversations from a teacher VLM behind an OpenAI-compatible server."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--teacher-url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1"
    )
    parser.add_argument("--teacher-model", required=True, help="the served model name")
    parser.add_argument(
        "--out", required=True, help="output JSONL (LLaVA conversations; appended, resumable)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--mmeb-train", help="MMEB-train root: sample images as the paper did")
    source.add_argument("--images", help="a folder of images, or a file with one image path per line")
    parser.add_argument(
        "--image-root", default=None, help="root of the --images paths (default: that folder / file's)"
    )
    parser.add_argument("--subsets", default=None, help="with --mmeb-train: a,b,c (default: the paper's 12)")
    parser.add_argument("--per-subset", type=int, default=30_000, help="with --mmeb-train: images per subset")
    parser.add_argument(
        "--mode", choices=("qa", "caption"), default="qa", help="caption: the paper's ablation data"
    )
    parser.add_argument("--questions", default="3-5", help="questions per image: N or LOW-HIGH")
    parser.add_argument("--concurrency", type=int, default=64, help="images in flight at once")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--max-retries", type=int, default=5, help="per request, and per malformed reply")
    parser.add_argument("--retry-backoff", type=float, default=0.5, help="first backoff in seconds (doubles)")
    parser.add_argument(
        "--retry-rejects", action="store_true", help="try the images in OUT.rejects.jsonl again"
    )
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument(
        "--max-pixels", type=int, default=802_816, help="images are scaled down to this before sending"
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--api-key", default=None, help="bearer token (default: none; vLLM needs none)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("httpx") is None:
        raise ValueError("coma generate needs httpx: pip install 'coma[generate]'")
    from coma.data.generate import (
        GenerateConfig,
        TeacherError,
        generate,
        listed_images,
        mmeb_train_images,
        parse_question_range,
    )

    if args.mmeb_train:
        subsets = [name.strip() for name in args.subsets.split(",") if name.strip()] if args.subsets else None
        images = mmeb_train_images(args.mmeb_train, subsets, args.per_subset, args.seed)
        image_root = args.mmeb_train
    else:
        images, image_root = listed_images(args.images, args.image_root)
    if not images:
        raise ValueError("no images to generate for")
    config = GenerateConfig(
        teacher_url=args.teacher_url, teacher_model=args.teacher_model, out=args.out, mode=args.mode,
        questions=parse_question_range(args.questions), concurrency=args.concurrency, timeout=args.timeout,
        max_retries=args.max_retries, retry_backoff=args.retry_backoff, temperature=args.temperature,
        max_tokens=args.max_tokens, seed=args.seed, api_key=args.api_key, retry_rejects=args.retry_rejects,
        max_pixels=args.max_pixels, show_progress=not args.no_progress,
        extra={"source": {"mmeb_train": args.mmeb_train, "images": args.images, "subsets": args.subsets,
                          "per_subset": args.per_subset}},
    )  # fmt: skip
    try:
        summary = generate(config, images, image_root)
    except TeacherError as error:
        raise ValueError(f"the teacher refused the request: {error}") from None
    print(json.dumps(summary))
    print(f"generate: {summary['done_this_run']} record(s) appended to {args.out}, "
          f"{summary['rejected_this_run']} rejected this run (see the .rejects.jsonl); meta in the .meta.json")  # fmt: skip
    return 0
