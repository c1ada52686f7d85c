"""``coma match``: stage 2, contrastive matching with GradCache and cross-rank negatives."""

from __future__ import annotations

import argparse

from coma.commands.training_args import add_stage_arguments, run_stage_command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, "match")


def run(args: argparse.Namespace) -> int:
    return run_stage_command("match", args)
