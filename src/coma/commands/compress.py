"""``coma compress``: stage 1, compression pre-training with the attention bottleneck."""

from __future__ import annotations

import argparse

from coma.commands.training_args import add_stage_arguments, run_stage_command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, "compress")


def run(args: argparse.Namespace) -> int:
    return run_stage_command("compress", args)
