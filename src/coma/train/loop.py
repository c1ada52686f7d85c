"""The training loop both stages share: optimizer, schedule, clipping, logging, checkpoints, exact resume, and DDP or
FSDP2 through `coma.train.parallel`.

A stage supplies a :class:`TrainingTask` (data + forward/backward for one global batch + how to finish); this module
owns everything else.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn
from tqdm.auto import tqdm

from coma.io import atomic_open, write_json
from coma.train.config import TrainSettings
from coma.train.parallel import Parallel, parallelize, resolve_strategy
from coma.train.trainable import load_trainable_state, trainable_state

CHECKPOINT_DIR = "checkpoints"
SHARDED_DIR = "sharded"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class StepResult:
    loss: float
    samples: int
    tokens: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class TrainingTask(Protocol):
    module: nn.Module
    total_steps: int

    def step(self, module: nn.Module, no_sync: Callable[[], AbstractContextManager]) -> StepResult:
        """Forward and backward over this rank's share of one global batch (gradients accumulate in .grad)."""

    def data_state(self) -> dict: ...

    def load_data_state(self, state: dict) -> None: ...

    def finish(self, out_dir: Path) -> Path:
        """Write the final model (rank 0 only)."""

    def finish_from_checkpoint(self, checkpoint: Path, out_dir: Path) -> Path:
        """Write the final model from a sharded checkpoint (rank 0 only, after a sharded run)."""

    def shard_units(self) -> list[nn.Module]:
        """The blocks FSDP shards one by one (decoder layers, vision blocks)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def distinct_count(keys: set, dist_info: DistInfo) -> int:
    """How many distinct keys all ranks hold together (each rank skips the bad rows of its own share, and a row
    drawn on two ranks counts once)."""
    if not dist_info.distributed:
        return len(keys)
    gathered: list[set | None] = [None] * dist_info.world_size
    dist.all_gather_object(gathered, keys)
    return len(set().union(*gathered))


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group that ``torchrun`` / ``accelerate launch`` describe in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if device is not None and device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unsupported device {device!r}")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        resolved = torch.device("cuda", local_rank)
    else:
        resolved = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 is ~5x slower than fp32 on CPUs without bf16 units.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def build_scheduler(optimizer: torch.optim.Optimizer, settings: TrainSettings, total_steps: int):
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    warmup = math.ceil(settings.warmup_ratio * total_steps)
    if settings.scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    factory = (
        get_cosine_schedule_with_warmup if settings.scheduler == "cosine" else get_linear_schedule_with_warmup
    )
    return factory(optimizer, warmup, total_steps)


def train(
    task: TrainingTask,
    settings: TrainSettings,
    out_dir: str | Path,
    *,
    dist_info: DistInfo,
    resume: bool = False,
    run_config: dict[str, Any] | None = None,
    description: str = "train",
) -> dict[str, Any]:
    """Run ``task`` for ``task.total_steps`` optimizer steps; returns a summary dict."""
    out_dir = Path(out_dir)
    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if run_config is not None:
            write_json(out_dir / "run_config.json", run_config)
    module = task.module
    strategy = resolve_strategy(settings.strategy)
    parallel = parallelize(
        module,
        strategy=strategy,
        world_size=dist_info.world_size,
        device=dist_info.device,
        compute_dtype=resolve_dtype(settings.dtype, dist_info.device),
        shard_units=task.shard_units,
        defer_sharded_sync=settings.fsdp_defer_gradient_sync,
    )
    # Dropout differs per rank. Only now: every rank must build identical weights (LoRA init, pooling heads) first.
    seed_everything(settings.seed + dist_info.rank)
    # After sharding: the optimizer must hold FSDP's sharded parameters.
    parameters = [parameter for parameter in module.parameters() if parameter.requires_grad]
    if not parameters:
        raise ValueError("nothing to train: no parameter requires grad")
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = build_scheduler(optimizer, settings, task.total_steps)

    start_step = 0
    if resume:
        checkpoint = latest_checkpoint(out_dir)
        if checkpoint is None:
            if dist_info.is_main:
                print(f"--resume: no checkpoint under {out_dir / CHECKPOINT_DIR}; starting from step 0")
        else:
            start_step = load_checkpoint(checkpoint, parallel, optimizer, scheduler, task, dist_info)
            if dist_info.is_main:
                print(f"resumed from {checkpoint} (step {start_step})")
    metrics = MetricsLog(out_dir / "metrics.jsonl", enabled=dist_info.is_main, keep_up_to=start_step)

    progress = tqdm(total=task.total_steps, initial=start_step, desc=description, unit="step",
                    disable=not (settings.show_progress and dist_info.is_main), dynamic_ncols=True)  # fmt: skip
    started = time.perf_counter()
    losses: list[float] = []
    tokens_seen = 0
    module.train()
    for step in range(start_step, task.total_steps):
        step_start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with parallel.autocast():
            result = task.step(parallel.model, parallel.no_sync)
        max_norm = settings.max_grad_norm if settings.max_grad_norm > 0 else float("inf")
        grad_norm = parallel.clip_grad_norm(parameters, max_norm)
        learning_rate = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        seconds = time.perf_counter() - step_start
        losses.append(result.loss)
        tokens_seen += result.tokens * dist_info.world_size
        record = {
            "step": step + 1,
            "loss": result.loss,
            "lr": learning_rate,
            "grad_norm": grad_norm,
            "samples_per_s": result.samples * dist_info.world_size / seconds,
            "tokens_per_s": result.tokens * dist_info.world_size / seconds,
            **result.extra,
        }
        if (step + 1) % settings.log_every == 0 or step + 1 == task.total_steps:
            metrics.write(record)
        progress.set_postfix(loss=f"{result.loss:.4f}", lr=f"{learning_rate:.2e}",
                             tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)  # fmt: skip
        progress.update(1)
        if (step + 1) % settings.save_every == 0 or step + 1 == task.total_steps:
            save_checkpoint(
                out_dir, step + 1, parallel, optimizer, scheduler, task, dist_info, settings.keep_checkpoints
            )
    progress.close()
    metrics.close()
    module.eval()
    final = None
    if parallel.sharded:
        # The merged model needs whole tensors: rank 0 folds the final (sharded) checkpoint into a fresh copy.
        dist_info.barrier()
        if dist_info.is_main:
            final = task.finish_from_checkpoint(latest_checkpoint(out_dir), out_dir)
    elif dist_info.is_main:
        final = task.finish(out_dir)
    dist_info.barrier()
    summary = {
        "steps": task.total_steps,
        "resumed_from": start_step,
        "seconds": time.perf_counter() - started,
        "final_loss": losses[-1] if losses else None,
        "tokens": tokens_seen,
        "output": str(final) if final else str(out_dir),
        "strategy": parallel.strategy,
    }
    if dist_info.is_main:
        write_json(out_dir / "train_summary.json", summary)
    return {**summary, "rank": dist_info.rank}


def scale_gradients(module: nn.Module, factor: float) -> None:
    """Multiply every accumulated gradient by ``factor`` (sharded gradients too: each rank scales its shard)."""
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.grad is not None:
                parameter.grad.mul_(factor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class MetricsLog:
    """Append-only JSONL metrics (plus TensorBoard when installed); on resume, later records are dropped."""

    def __init__(self, path: Path, enabled: bool, keep_up_to: int) -> None:
        self.enabled = enabled
        self.handle = None
        self.tensorboard = None
        if not enabled:
            return
        if path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= keep_up_to]  # fmt: skip
            with atomic_open(path, "w") as handle:
                handle.write("".join(line + "\n" for line in kept))
        self.handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the whole run
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:
            self.tensorboard = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": _to_lists(random.getstate()),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value


def _to_tuples(value: Any) -> Any:
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return out_dir / CHECKPOINT_DIR / f"step-{step:07d}"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (half-written ones keep a ``.partial`` suffix and are ignored)."""
    root = Path(out_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return max(steps)[1] if steps else None


def save_checkpoint(
    out_dir: Path,
    step: int,
    parallel: Parallel,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    task: TrainingTask,
    dist_info: DistInfo,
    keep: int,
) -> Path:
    """Write trainable weights, optimizer, scheduler, RNG and data position; visible only once complete.

    A sharded (FSDP) run writes weights and optimizer state with ``torch.distributed.checkpoint`` under
    ``sharded/``, every rank its own shards; otherwise rank 0 writes ``trainable.safetensors`` and ``optim.pt``.
    """
    final = checkpoint_dir(out_dir, step)
    partial = final.with_name(final.name + ".partial")
    if dist_info.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist_info.barrier()
    # Every rank has its own RNG stream (dropout); the data position is the same on every rank.
    torch.save(_rng_state(), partial / f"rng.rank{dist_info.rank}.pt")
    write_json(partial / f"data.rank{dist_info.rank}.json", task.data_state())
    if parallel.sharded:
        import torch.distributed.checkpoint as dcp

        dcp.save(_sharded_state(parallel.model, optimizer), checkpoint_id=str(partial / SHARDED_DIR))
    dist_info.barrier()
    if dist_info.is_main:
        if parallel.sharded:
            torch.save({"scheduler": scheduler.state_dict()}, partial / "optim.pt")
        else:
            with open(partial / "trainable.safetensors", "wb") as handle:
                handle.write(safetensors_bytes(trainable_state(task.module)))
            torch.save(
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                partial / "optim.pt",
            )
        write_json(
            partial / "trainer_state.json",
            {"step": step, "world_size": dist_info.world_size, "sharded": parallel.sharded},
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        _prune_checkpoints(out_dir, keep)
    dist_info.barrier()
    return final


def _sharded_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(
        module, optimizer, options=StateDictOptions(ignore_frozen_params=True)
    )
    return {"model": model_state, "optim": optim_state}


def load_sharded_trainable(checkpoint: Path, module: nn.Module) -> None:
    """Load a sharded checkpoint's trainable weights into an unsharded module in this one process."""
    state = {"model": trainable_state(module)}
    _dcp_load(state, checkpoint, no_dist=True)
    load_trainable_state(module, state["model"], source=str(checkpoint))


def _dcp_load(state: dict[str, Any], checkpoint: Path, *, no_dist: bool) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        # Reading every shard into one process is the intent of no_dist; DCP warns about it all the same.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(checkpoint / SHARDED_DIR), no_dist=no_dist)


def _prune_checkpoints(out_dir: Path, keep: int) -> None:
    root = out_dir / CHECKPOINT_DIR
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))
    for _, path in steps[: max(0, len(steps) - max(keep, 1))]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(
    checkpoint: Path,
    parallel: Parallel,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    task: TrainingTask,
    dist_info: DistInfo,
) -> int:
    """Restore a checkpoint; the number of processes may differ (the data position does not depend on it), but
    then every rank's RNG stream (dropout) is new, so the run is no longer bit-for-bit the uninterrupted one."""
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    optim_state = torch.load(checkpoint / "optim.pt", map_location="cpu", weights_only=True)
    if state.get("sharded", False):
        # DCP reshards on load: into FSDP shards of any size, or whole tensors in a single process.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        sharded_state = _sharded_state(parallel.model, optimizer)
        _dcp_load(sharded_state, checkpoint, no_dist=not parallel.distributed)
        set_state_dict(
            parallel.model,
            optimizer,
            model_state_dict=sharded_state["model"],
            optim_state_dict=sharded_state["optim"],
            # The frozen weights are not in the checkpoint; DCP has already refused a missing trainable one.
            options=StateDictOptions(ignore_frozen_params=True, strict=False),
        )
    elif parallel.sharded:
        raise ValueError(
            f"{checkpoint} is an unsharded checkpoint and this run is sharded (FSDP); resume it with "
            f"--strategy ddp or in one process"
        )
    else:
        load_trainable_state(
            task.module, load_file(str(checkpoint / "trainable.safetensors")), source=str(checkpoint)
        )
        optimizer.load_state_dict(optim_state["optimizer"])
    scheduler.load_state_dict(optim_state["scheduler"])
    same_ranks = state["world_size"] == dist_info.world_size
    rank_file = dist_info.rank if same_ranks else 0
    task.load_data_state(json.loads((checkpoint / f"data.rank{rank_file}.json").read_text(encoding="utf-8")))
    step = int(state["step"])
    if same_ranks:
        _set_rng_state(torch.load(checkpoint / f"rng.rank{dist_info.rank}.pt", weights_only=True))
    else:
        seed_everything(hash_seed(step, dist_info.rank))
        if dist_info.is_main:
            print(
                f"{checkpoint} was written by {state['world_size']} process(es), resumed on "
                f"{dist_info.world_size}: same data order, new per-rank RNG streams (dropout)"
            )
    return step


def hash_seed(step: int, rank: int) -> int:
    """A seed per (step, rank) for RNG streams that a checkpoint cannot restore."""
    return (step * 1_000_003 + rank) % 2**32
