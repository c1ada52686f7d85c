"""``coma match``: stage 2, contrastive matching with GradCache and cross-rank negatives."""

from __future__ import annotations

import argparse

from coma.commands.training_args import add_training_arguments, stage_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from coma.train.match import MatchConfig

    add_training_arguments(parser, MatchConfig)


def run(args: argparse.Namespace) -> int:
    from coma.train.match import MatchConfig
    from coma.train.run import run_stage

    summary = run_stage("match", stage_config(MatchConfig, args), resume=args.resume)
    print(
        f"match: done in {summary['seconds']:.1f} s, final loss {summary['final_loss']:.4f} -> {summary['output']}"
    )
    return 0
