"""CLI flags shared by the training commands: a recipe file, resume, and one flag per config field."""

from __future__ import annotations

import argparse

from coma.recipes import add_config_arguments, config_from_args


def add_training_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    parser.add_argument(
        "--config", default=None, help="YAML recipe (see configs/); flags override its fields"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--full", dest="lora.full_finetune", action="store_const", const=True, default=argparse.SUPPRESS,
                        help="train the whole language model instead of LoRA/DoRA")  # fmt: skip
    add_config_arguments(parser, config_class)


def stage_config(config_class: type, args: argparse.Namespace):
    overrides = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("resume",)})
    return config_from_args(config_class, overrides, config_file=args.config)
