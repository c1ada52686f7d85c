"""``coma export``: add sentence-transformers files to a model folder, or prepare it for ``vllm serve``."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from coma.serving.export import FORMATS

    parser.add_argument("--model", required=True, help="a merged coma model folder (coma merge writes one)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument(
        "--out", default=None, help="write into a copy of the folder here (default: add the files in place)"
    )
    parser.add_argument(
        "--query-prompt",
        default=None,
        help="sentence-transformers: the instruction encode_query puts before queries (default: none)",
    )


def run(args: argparse.Namespace) -> int:
    from coma.serving.export import export_model

    result = export_model(args.model, args.format, args.out, args.query_prompt)
    print(f"{result.format} export in {result.folder}: wrote {', '.join(result.files)}")
    for line in result.instructions:
        print(f"  {line}")
    return 0
