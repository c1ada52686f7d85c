"""Throughput of ``coma generate`` against the scripted teacher on loopback, at several concurrency levels.

Writes a small synthetic world (its stage-1 conversations are the teacher's script), then runs the generator once
per concurrency level into a fresh file and prints images/s, requests/s and completion tokens/s side by side. The
scripted teacher answers in well under a millisecond, so the figures measure the client (image re-encoding, HTTP,
bookkeeping) and the loopback server, not a VLM; ``--teacher-delay`` adds a fixed latency per request to show how
concurrency hides it.

    .venv/bin/python scripts/bench_generate.py [--concurrency 1,16,64] [--world-size small] [--teacher-delay 0]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from coma.data.formats import read_conversations  # noqa: E402
from coma.data.generate import GenerateConfig, generate  # noqa: E402
from coma.data.synth import generate_world  # noqa: E402
from coma.data.teacher_server import Faults, ScriptedTeacher  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--world-size", default="small", choices=("tiny", "small", "default"))
    parser.add_argument(
        "--teacher-delay", type=float, default=0.0, help="seconds added to every teacher reply"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        generate_world(world, seed=0, size=args.world_size)
        script = {
            c.image: list(c.turns) for c in read_conversations(world / "stage1" / "conversations.jsonl")
        }
        faults = Faults(slow_rate=1.0, slow_seconds=args.teacher_delay) if args.teacher_delay else None
        print(f"{len(script)} images, {sum(len(t) for t in script.values()) + len(script)} requests per run, "
              f"teacher delay {args.teacher_delay} s")  # fmt: skip
        print("| concurrency | images/s | requests/s | tokens/s | seconds |")
        print("|---:|---:|---:|---:|---:|")
        with ScriptedTeacher(script, world / "images", model="bench", faults=faults) as url:
            for level in (int(x) for x in args.concurrency.split(",")):
                config = GenerateConfig(teacher_url=url, teacher_model="bench", out=str(Path(tmp) / f"c{level}.jsonl"),
                                        concurrency=level, show_progress=False)  # fmt: skip
                s = generate(config, list(script), world / "images")
                tokens = s["completion_tokens"] / s["seconds"]
                print(
                    f"| {level} | {s['images_per_s']:.1f} | {s['requests_per_s']:.1f} | {tokens:.0f} | {s['seconds']:.2f} |"
                )


if __name__ == "__main__":
    main()
