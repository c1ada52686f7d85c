"""``coma merge``: fold a training run's adapter and compression rows into a plain model folder."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a training output folder or one of its checkpoints")
    parser.add_argument("--out", required=True, help="folder for the merged model")


def run(args: argparse.Namespace) -> int:
    from coma.train.run import merge_checkpoint

    out = merge_checkpoint(args.model, args.out)
    print(f"merged model written to {out}")
    return 0
