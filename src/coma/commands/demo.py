"""``coma demo``: the whole pipeline on a laptop CPU, comparing CoMa against matching-only baselines; ``--study``
runs the data-efficiency curve over matching budgets and seeds."""

from __future__ import annotations

import argparse


def _budgets(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step counts, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="output folder, caches the world and stage 0 (default: "
                        "runs/demo, or runs/study with --study)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a ~1-minute smoke run (small world, few steps)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="repeat with N seeds and report mean ± std (default 1; 3 with --study)")  # fmt: skip
    parser.add_argument("--study", action="store_true",
                        help="the data-efficiency curve: arms (a), (b), (c) at every --budgets over --seeds, "
                        "written to study.json / study.md / study.png")  # fmt: skip
    parser.add_argument("--budgets", type=_budgets, default=None,
                        help="matching steps of the study's points (default 50,100,200,400,800)")  # fmt: skip
    parser.add_argument("--num-tokens", type=int, default=None, help="compression tokens T")
    parser.add_argument(
        "--stage1-mask-mode",
        choices=("bottleneck", "none"),
        default=None,
        help="stage 1's attention: answers see the image only through the compression tokens (default), or also "
        "directly (ablation)",
    )
    parser.add_argument("--stage1-supervise", choices=("answers", "dialogue"), default=None,
                        help="stage 1's loss on the answers only (default) or on questions and answers")  # fmt: skip
    parser.add_argument("--stage1-turns", choices=("multi", "single"), default=None,
                        help="stage-1 conversations as the teacher wrote them (default), or each turn alone")  # fmt: skip
    parser.add_argument("--stage1-data", choices=("qa", "caption"), default=None,
                        help="stage-1 data: the teacher's questions and answers (default), or one caption per "
                        "image")  # fmt: skip
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
    from coma.demo.study import DEFAULT_BUDGETS, DEFAULT_SEEDS, run_study

    if args.budgets is not None and not args.study:
        raise ValueError("--budgets is a setting of --study")
    if args.study and args.stage2_steps is not None:
        raise ValueError("--study sets the matching steps with --budgets, not --stage2-steps")
    out = args.out or ("runs/study" if args.study else "runs/demo")
    seeds = args.seeds if args.seeds is not None else (DEFAULT_SEEDS if args.study else 1)
    if seeds < 1:
        raise ValueError("--seeds must be at least 1")
    config = DemoConfig(out=out, seeds=seeds, show_progress=not args.no_progress)
    if args.quick:
        config = quick_config(config)
    overrides = {
        "num_tokens": args.num_tokens,
        "stage1_mask_mode": args.stage1_mask_mode,
        "stage1_supervise": args.stage1_supervise,
        "stage1_turns": args.stage1_turns,
        "stage1_data": args.stage1_data,
        "stage2_steps": args.stage2_steps,
        "workers": args.workers,
    }
    config = replace(config, **{key: value for key, value in overrides.items() if value is not None})
    if config.workers < 1:
        raise ValueError("--workers must be at least 1")
    if args.study:
        run_study(config, args.budgets or list(DEFAULT_BUDGETS))
    else:
        run_demo(config)
    return 0
