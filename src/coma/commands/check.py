"""``coma check {compress,match,eval} [that command's flags] [--images]``: the pre-flight check of a data set.

Every row is parsed and every image path resolved (what ``compress`` / ``match`` / ``eval`` also do before they
start); with ``--images`` every image is decoded in worker processes. Prints a per-subset table and exits non-zero
naming the first 20 problems by file, row and field. No model weights are loaded: only the processor, for token
counts at the recipe's pixel bounds.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TARGETS = ("compress", "match", "eval")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from coma.commands import evaluate
    from coma.commands.training_args import add_stage_arguments

    targets = parser.add_subparsers(dest="target", metavar="{compress,match,eval}", required=True)
    for target in TARGETS:
        sub = targets.add_parser(target, help=f"check the data of `coma {target}` (takes its flags)")
        if target == "eval":
            evaluate.add_arguments(sub)
        else:
            add_stage_arguments(sub, target)
        sub.add_argument("--images", action="store_true", help="also decode every image (worker processes)")
        sub.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                         help="processes that decode images (default: every core)")  # fmt: skip


def _processor(model: str, min_pixels: int | None, max_pixels: int | None) -> tuple[Any, Any, int] | None:
    """(processor, adapter, T) for token counts, or None when the model's processor cannot be had offline."""
    from coma.backbones import adapter_for, read_model_type, resolve_model_source
    from coma.config import ComaConfig
    from coma.embedder import apply_pixel_bounds

    try:
        source, hub_kwargs = resolve_model_source(model)
        adapter = adapter_for(read_model_type(source))
        processor = adapter.load_processor(source, **hub_kwargs)
    except (OSError, ValueError) as error:
        print(f"check: no token statistics ({error})")
        return None
    saved = ComaConfig.load(source) if Path(source).is_dir() else None
    config = saved or ComaConfig()
    bounds = ComaConfig(
        min_pixels=min_pixels or config.min_pixels, max_pixels=max_pixels or config.max_pixels
    )
    apply_pixel_bounds(processor, bounds)
    return processor, adapter, config.num_tokens


@dataclass
class Checked:
    """What one command's reader found: inputs by subset, the image root, the bad rows, the placeholder fixes."""

    groups: dict[str, Any]
    image_root: str | None
    problems: Any
    fixes: Any


def _match_groups(config: Any) -> Checked:
    from coma.data.check import InputGroup
    from coma.train.stage2_data import NEGATIVE_FIELDS, QUERY_FIELDS, TARGET_FIELDS, PairDataset, pair_inputs

    image_root = config.image_root or config.data
    dataset = PairDataset.from_config(config.data, subsets=config.subsets, weights=config.weights,
                                      caps=config.caps, split=config.split, image_root=image_root,
                                      skip_bad=True, show_progress=True)  # fmt: skip
    for line in dataset.report.lines():
        print(f"check: {line}")
    groups = {}
    for name, pairs in dataset.pairs.items():
        group = InputGroup(rows=dataset.report.rows_read[name])
        for pair in pairs:
            group.text_only_rows += not pair.qry_image_path
            sides = zip((QUERY_FIELDS, TARGET_FIELDS, NEGATIVE_FIELDS), pair_inputs(pair), strict=True)
            group.inputs += [(item.text, item.image or "", pair.source, pair.row, fields[1])
                             for fields, item in sides if item is not None]  # fmt: skip
        groups[name] = group
    return Checked(groups, image_root, dataset.report.problems, dataset.report.placeholder_fixes)


def _eval_groups(args: argparse.Namespace) -> Checked:
    from coma.data.check import InputGroup
    from coma.eval.runner import benchmark_notes, collect_inputs, find_benchmark

    image_root = args.image_root if args.image_root is not None else args.data
    wanted = [name.strip() for name in args.datasets.split(",") if name.strip()] if args.datasets else None
    benchmark = find_benchmark(args.data, wanted)
    collected = collect_inputs(benchmark, args.data, image_root, limit=args.limit, skip_bad=True,
                               format_rule=args.format_rule)  # fmt: skip
    for line in benchmark_notes(benchmark, collected):
        print(f"check: {line}")
    problems = collected.problems
    groups = {spec.folder: InputGroup(rows=problems.by_dataset[spec.folder]) for spec in benchmark.datasets}
    for dataset in collected.datasets:
        group = groups[dataset.spec.folder]
        group.rows += len(dataset.queries)
        for query, candidates, (source, row) in zip(
            dataset.queries, dataset.candidates, dataset.rows, strict=True
        ):
            item = collected.inputs[query]
            group.text_only_rows += not item.image
            group.inputs.append((item.text, item.image, source, row, "qry_img_path"))
            for j, candidate in enumerate(candidates):
                item = collected.inputs[candidate]
                group.inputs.append((item.text, item.image, source, row, f"tgt_img_path[{j}]"))
    return Checked(groups, image_root, problems, collected.placeholder_fixes)


def _compress_groups(config: Any) -> Checked:
    from coma.config import ComaConfig
    from coma.data.check import InputGroup
    from coma.data.formats import PlaceholderFixes, ProblemLog
    from coma.train.compress import read_sources
    from coma.train.stage1_data import ANSWER_CLOSE, QUESTION_CLOSE, TEXT_COMPRESS_PROMPT, USER_OPEN

    problems = ProblemLog()
    sources = read_sources(config.data, config.image_root, problems)
    groups = {}
    for path, conversations in zip(config.data, sources.values(), strict=True):
        name = Path(path).name
        group = InputGroup(rows=len(conversations) + problems.by_dataset[name])
        for conv in conversations:
            group.text_only_rows += not conv.image
            dialogue = "".join(f"{USER_OPEN}{q}{QUESTION_CLOSE}{a}{ANSWER_CLOSE}" for q, a in conv.turns)
            head = ComaConfig.compress_prompt if conv.image else TEXT_COMPRESS_PROMPT
            group.inputs.append((head + dialogue, conv.image, conv.source, conv.row, "image"))
        groups[name] = group
    return Checked(groups, config.image_root, problems, PlaceholderFixes(ComaConfig.image_placeholder))


def run(args: argparse.Namespace) -> int:
    from coma.data.check import stats_table, summarize
    from coma.recipes import config_from_args

    if args.target == "eval":
        if not args.data:
            raise ValueError("coma check eval needs --data")
        model, min_pixels, max_pixels = args.model, None, None
        checked = _eval_groups(args)
    else:
        from coma.train.run import stage_classes

        config_class, _ = stage_classes(args.target)
        own = {"target", "images", "workers", "resume"}
        flags = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in own})
        config = config_from_args(config_class, flags, config_file=args.config)
        if not config.data:
            raise ValueError(f"coma check {args.target} needs --data")
        model, min_pixels, max_pixels = config.model, config.min_pixels, config.max_pixels
        checked = _match_groups(config) if args.target == "match" else _compress_groups(config)
    problems = checked.problems
    info = _processor(model, min_pixels, max_pixels) if model else None
    visual = text = None
    extra_tokens = 0
    if info is not None:
        processor, adapter, num_tokens = info
        tokenizer = processor.tokenizer

        def visual(width: int, height: int) -> int:
            return adapter.visual_tokens(processor, width, height)

        placeholder = checked.fixes.placeholder
        # The image block's own tokens, less the one pad token that the visual tokens replace.
        block = len(tokenizer(adapter.image_block, add_special_tokens=False)["input_ids"]) - 1

        def text(items: list[tuple[str, bool]]) -> list[int]:
            texts = [value.replace(placeholder, "") for value, _ in items]
            counts = (
                [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
            )
            return [n + (block if has_image else 0) for n, (_, has_image) in zip(counts, items, strict=True)]

        extra_tokens = num_tokens
    stats = summarize(checked.groups, problems, checked.fixes, checked.image_root, open_all=args.images,
                      workers=args.workers, visual_tokens=visual, text_tokens=text,
                      extra_tokens=extra_tokens)  # fmt: skip
    print(
        stats_table(
            stats, "dataset" if args.target == "eval" else "subset" if args.target == "match" else "file"
        )
    )
    if not args.images:
        print("(images not opened: --images decodes every one and fills the corrupt and token columns)")
    if problems:
        print(problems.summary(str(args.data if args.target == "eval" else config.data)))
        return 1
    print("check: no problems found")
    return 0
