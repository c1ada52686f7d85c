"""The ``coma`` command line: one sub-command per stage.

Each sub-command lives in ``coma.commands.<name>`` and exposes ``add_arguments(parser)`` and ``run(args)``;
modules are imported lazily so ``coma --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "init-model": (
        "init_model",
        "build a random VLM (tiny, or a real checkpoint's shape at reduced depth) and save it",
    ),
    "encode": ("encode", "encode a JSONL file of {text, image} inputs to a .npy matrix"),
    "generate": ("generate", "stage-1 conversations from a teacher VLM (OpenAI-compatible server)"),
    "compress": ("compress", "stage 1: compression pre-training"),
    "merge": ("merge", "merge a LoRA/DoRA adapter and the compression rows into a plain model folder"),
    "match": ("match", "stage 2: contrastive matching"),
    "eval": ("evaluate", "MMEB-style evaluation"),
    "check": ("check", "pre-flight check of the data of compress, match or eval"),
    "export": ("export", "add sentence-transformers files to a model folder, or write a folder for vLLM"),
    "index": ("index", "embed a collection into a faiss index"),
    "search": ("search", "query a faiss index built by coma index"),
    "serve": ("serve", "an OpenAI-compatible HTTP embedding (and search) server"),
    "synth": ("synth", "write the synthetic multimodal world"),
    "demo": ("demo", "the end-to-end CPU demo"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coma", description="Compression-then-Matching multimodal embeddings"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv else None
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            module = importlib.import_module(f"coma.commands.{module_name}")
            module.add_arguments(sub)
            sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        result = args._run(args)
    # ImportError: a missing extra.
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as error:
        print(f"coma {args.command}: error: {error}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
