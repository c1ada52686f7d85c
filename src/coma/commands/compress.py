"""``coma compress``: stage 1, compression pre-training with the attention bottleneck."""

from __future__ import annotations

import argparse

from coma.commands.training_args import add_training_arguments, stage_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from coma.train.compress import CompressConfig

    add_training_arguments(parser, CompressConfig)


def run(args: argparse.Namespace) -> int:
    from coma.train.compress import CompressConfig
    from coma.train.run import run_stage

    summary = run_stage("compress", stage_config(CompressConfig, args), resume=args.resume)
    print(
        f"compress: done in {summary['seconds']:.1f} s, final loss {summary['final_loss']:.4f} -> {summary['output']}"
    )
    return 0
