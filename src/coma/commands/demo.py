"""``coma demo``: the whole pipeline on a laptop CPU, comparing CoMa against matching-only baselines."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (caches the world and stage 0)")
    parser.add_argument("--quick", action="store_true", help="a ~1-minute smoke run (small world, few steps)")
    parser.add_argument("--seeds", type=int, default=1, help="repeat with N seeds and report mean ± std")
    parser.add_argument("--num-tokens", type=int, default=None, help="compression tokens T")
    parser.add_argument(
        "--stage1-mask-mode",
        choices=("bottleneck", "none"),
        default=None,
        help="stage 1's attention: answers see the image only through the compression tokens (default), or also "
        "directly (ablation)",
    )
    parser.add_argument("--stage2-steps", type=int, default=None, help="matching steps of arms (a) and (b)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes running the arms side by side (default 2; 1 = in-process)",
    )
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from coma.demo import DemoConfig, quick_config, run_demo

    config = DemoConfig(out=args.out, seeds=args.seeds, show_progress=not args.no_progress)
    if args.quick:
        config = quick_config(config)
    if args.num_tokens is not None:
        config = replace(config, num_tokens=args.num_tokens)
    if args.stage1_mask_mode is not None:
        config = replace(config, stage1_mask_mode=args.stage1_mask_mode)
    if args.stage2_steps is not None:
        config = replace(config, stage2_steps=args.stage2_steps)
    if args.workers is not None:
        if args.workers < 1:
            raise ValueError("--workers must be at least 1")
        config = replace(config, workers=args.workers)
    run_demo(config)
    return 0
