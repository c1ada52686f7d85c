"""Run a test function in several gloo processes on the CPU and collect what each rank returns."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_distributed(fn: Callable[..., Any], world_size: int, workdir: Path, *args: Any) -> list[Any]:
    """Call `fn(rank, world_size, *args)` in `world_size` spawned processes; return their results by rank.

    `fn` must be a module-level function (spawn pickles it by name). Rendezvous goes through a file in
    `workdir`, which avoids picking a free TCP port; results come back through `torch.save` files.
    """
    init_file = workdir / "dist_init"
    if init_file.exists():
        raise FileExistsError(f"{init_file} is left over from an earlier run; use a fresh workdir")
    mp.spawn(_worker, args=(fn, world_size, workdir, args), nprocs=world_size, join=True)
    return [torch.load(workdir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def _worker(rank: int, fn: Callable[..., Any], world_size: int, workdir: Path, args: tuple[Any, ...]) -> None:
    # Two cores are shared by every process on the box; more threads only add contention.
    torch.set_num_threads(1)
    init_method = (workdir / "dist_init").resolve().as_uri()
    # A short collective timeout turns a rank mismatch into an error instead of a 30-minute hang.
    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=timeout
    )
    try:
        result = fn(rank, world_size, *args)
        # No rank tears its connections down while another still has a collective in flight: under load that
        # ended a rank with "terminate called without an active exception" (SIGABRT) in gloo's I/O thread.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, workdir / f"rank{rank}.pt")
