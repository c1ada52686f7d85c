"""What ``coma compress`` and ``coma match`` share: a recipe file, resume, and one flag per config field."""

from __future__ import annotations

import argparse

from coma.recipes import add_config_arguments, config_from_args


def add_stage_arguments(parser: argparse.ArgumentParser, stage: str) -> None:
    from coma.train.run import stage_classes

    config_class, _ = stage_classes(stage)
    parser.add_argument(
        "--config", default=None, help="YAML recipe (see configs/); flags override its fields"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--full", dest="lora.full_finetune", action="store_const", const=True, default=argparse.SUPPRESS,
                        help="train the whole language model instead of LoRA/DoRA")  # fmt: skip
    add_config_arguments(parser, config_class)


def run_stage_command(stage: str, args: argparse.Namespace) -> int:
    from coma.train.run import run_stage, stage_classes

    config_class, _ = stage_classes(stage)
    overrides = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "resume"})
    config = config_from_args(config_class, overrides, config_file=args.config)
    summary = run_stage(stage, config, resume=args.resume)
    if summary["rank"] == 0:
        print(f"{stage}: done in {summary['seconds']:.1f} s, final loss {summary['final_loss']:.4f} -> "
              f"{summary['output']}")  # fmt: skip
    return 0
