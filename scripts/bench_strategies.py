"""DDP against FSDP2 step time on this CPU: 2 gloo processes under ``torchrun``, both stages, LoRA and full.

Builds a random ``small`` qwen2_vl model and the tiny synthetic world in a temp folder, then runs ``coma compress`` and
``coma match`` (GradCache, chunks of 8) for ``--steps`` steps under ``--strategy ddp`` and ``--strategy fsdp``, each
in a fresh ``torchrun`` (2 processes, one thread each). Reported: the median step time after two warm-up steps (from
the ``samples_per_s`` the loop logs). CPU figures
say what sharding costs in collectives at this size, not what it saves on GPUs (README, "Memory per GPU").

``--fsdp-sync-memory`` measures instead what deferring FSDP's gradient sync holds: a stack of 8 linear layers of
4096 x 4096 (134 M fp32 parameters, each layer a unit) sharded by coma's ``parallelize`` over 2 gloo processes runs 4
forward/backward micro-batches (the first 3 under ``no_sync``), once with the sync deferred to the last backward
(coma's default) and once reduce-scattering after each (``--train.fsdp-defer-gradient-sync false``); reported: each
rank's peak RSS growth over the micro-batches.

    .venv/bin/python scripts/bench_strategies.py [--steps 8] [--fsdp-sync-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from coma.backbones.tiny import init_model
from coma.data.synth import generate_world
from coma.train.parallel import parallelize

GLOBAL_BATCH = 16


def stage_args(stage: str, model: Path, world: Path, out: Path, steps: int) -> list[str]:
    common = ["--model", str(model), "--image-root", str(world / "images"), "--out", str(out), "--num-tokens", "8",
              "--train.global-batch-size", str(GLOBAL_BATCH), "--train.max-steps", str(steps),
              "--train.save-every", str(steps), "--train.show-progress", "false"]  # fmt: skip
    if stage == "compress":
        return ["compress", *common, "--data", str(world / "stage1" / "conversations.jsonl"),
                "--train.micro-batch-size", "8", "--max-length", "256"]  # fmt: skip
    return ["match", *common, "--data", str(world / "train"), "--block-size", "8", "--query-chunk-size", "8",
            "--target-chunk-size", "8"]  # fmt: skip


def run(command: list[str], out: Path) -> float:
    """Median seconds per step after two warm-up steps."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = [GLOBAL_BATCH / record["samples_per_s"] for record in records[2:]]
    return statistics.median(seconds)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def sync_memory_rank(rank: int, defer: bool, port: int, results: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    layers = nn.ModuleList(nn.Linear(4096, 4096) for _ in range(8))
    parallel = parallelize(nn.Sequential(*layers), strategy="fsdp", world_size=2, device=torch.device("cpu"),
                           compute_dtype=torch.float32, shard_units=lambda: list(layers), defer_sharded_sync=defer)  # fmt: skip
    before = peak_rss_gib()
    inputs = torch.randn(4, 4096)
    for micro_batch in range(4):
        with parallel.no_sync() if micro_batch < 3 else torch.enable_grad():
            parallel.model(inputs).sum().backward()
    results.put((rank, peak_rss_gib() - before))
    dist.destroy_process_group()


def fsdp_sync_memory() -> None:
    context = mp.get_context("spawn")
    print("| FSDP gradient sync | rank 0 peak RSS growth (GB) | rank 1 |")
    print("|---|---:|---:|")
    for defer, port in ((True, 29601), (False, 29602)):
        results = context.Queue()
        processes = [
            context.Process(target=sync_memory_rank, args=(rank, defer, port, results)) for rank in (0, 1)
        ]
        for process in processes:
            process.start()
        growth = dict(results.get(timeout=600) for _ in processes)
        for process in processes:
            process.join()
        print(f"| {'deferred to the last backward' if defer else 'after every backward'} | {growth[0]:.2f} | "
              f"{growth[1]:.2f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument(
        "--fsdp-sync-memory", action="store_true", help="FSDP's deferred vs per-backward sync memory"
    )
    args = parser.parse_args()
    if args.fsdp_sync_memory:
        fsdp_sync_memory()
        return
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        model = init_model(root / "model", family="qwen2_vl", size="small", seed=0)
        world = root / "world"
        generate_world(world, seed=0, size="tiny")
        print(f"small qwen2_vl, 2 processes (gloo, 1 thread each), global batch {GLOBAL_BATCH}, median of steps "
              f"3-{args.steps}\n")  # fmt: skip
        print("| stage | trained | DDP s/step | FSDP s/step | FSDP / DDP |")
        print("|---|---|---:|---:|---:|")
        port = 29611
        for stage in ("compress", "match"):
            for trained, extra in (("LoRA/DoRA", []), ("full", ["--full"])):
                times = {}
                for strategy in ("ddp", "fsdp"):
                    out = root / f"{stage}-{strategy}-{trained[:4]}"
                    port += 1
                    command = [torchrun, "--nproc_per_node=2", f"--master_port={port}", "-m", "coma.cli",
                               *stage_args(stage, model, world, out, args.steps), *extra, "--strategy", strategy]  # fmt: skip
                    times[strategy] = run(command, out)
                print(f"| {stage} | {trained} | {times['ddp']:.3f} | {times['fsdp']:.3f} | "
                      f"{times['fsdp'] / times['ddp']:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
