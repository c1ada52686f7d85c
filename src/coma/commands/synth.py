"""``coma synth``: write the synthetic multimodal world (images, conversations, MMEB-train/eval folders)."""

from __future__ import annotations

import argparse
import time

from coma.data.synth.render import DEFAULT_IMAGE_SIZE
from coma.data.synth.tasks import PRESETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", required=True, help="output folder (created; an earlier world there is replaced)"
    )
    parser.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    parser.add_argument(
        "--size", choices=sorted(PRESETS), default="default", help="size preset (default: default)"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=DEFAULT_IMAGE_SIZE,
        help=f"image side in pixels (default {DEFAULT_IMAGE_SIZE})",
    )


def run(args: argparse.Namespace) -> int:
    from coma.data.synth.writer import generate_world

    start = time.perf_counter()
    world = generate_world(args.out, seed=args.seed, size=args.size, image_size=args.image_size)
    seconds = time.perf_counter() - start
    files = world["files"]
    train_rows = sum(n for name, n in files.items() if name.startswith("train/"))
    eval_queries = sum(n for name, n in files.items() if name.startswith("eval/"))
    print(
        f"coma synth: wrote {args.out} (seed {world['seed']}, size {world['size']}, {world['image_size']} px)"
    )
    print(
        f"  images            {world['images']['total']:>6}  ({', '.join(f'{k} {v}' for k, v in world['images'].items() if k != 'total')})"
    )
    print(f"  stage-0 records   {files['stage0/conversations.jsonl']:>6}")
    print(f"  stage-1 records   {files['stage1/conversations.jsonl']:>6}")
    print(f"  train pairs       {train_rows:>6}  in {len(world['train_subsets'])} subsets")
    print(f"  eval queries      {eval_queries:>6}  in {len(world['eval_datasets'])} datasets")
    print(f"  held-out pairs    {', '.join(world['held_out_labels'])}")
    print(f"  wall time         {seconds:.1f} s")
    return 0
