"""How the training loop spreads a model over ranks: one process, DDP, or FSDP2 (``fully_shard``).

``ddp`` replicates the model and all-reduces gradients. ``fsdp`` shards every decoder layer and vision block, then
the rest of the model as the root unit, with ``torch.distributed.fsdp.fully_shard``; parameters, gradients and
optimizer state live in shards and each unit is all-gathered just for its forward and backward. Trainable
parameters are kept in fp32 (small AdamW updates on bf16 weights round away) and computed in the run's dtype through
FSDP's ``MixedPrecisionPolicy``; gradients are reduced in fp32. Frozen weights stay in the dtype they were loaded in.

Without FSDP (one process, DDP) the same holds: trainable parameters are cast to fp32 and the task's step runs under
``torch.autocast`` in the run's dtype, so matmuls compute in bf16 while AdamW updates fp32 master weights.

Both strategies defer the gradient reduction over the chunks of one step (GradCache's replay, stage 1's
micro-batches) to the last backward, so the summed gradient is exactly the one-process gradient either way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

STRATEGIES = ("auto", "ddp", "fsdp")


def resolve_strategy(setting: str, environ: dict[str, str] | None = None) -> str:
    """``ddp`` or ``fsdp``; ``auto`` follows an FSDP ``accelerate launch`` config (it exports ACCELERATE_USE_FSDP)."""
    environ = os.environ if environ is None else environ
    if setting not in STRATEGIES:
        raise ValueError(f"unknown strategy {setting!r}; choose one of {', '.join(STRATEGIES)}")
    accelerate_fsdp = environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if accelerate_fsdp and environ.get("FSDP_VERSION", "2") != "2":
        raise ValueError(
            "the accelerate config asks for FSDP version 1; coma shards with FSDP2: set fsdp_version: 2 "
            "(configs/accelerate/fsdp.yaml)"
        )
    if setting == "auto":
        return "fsdp" if accelerate_fsdp else "ddp"
    return setting


@dataclass
class Parallel:
    """The model a task's step calls, and what the loop needs to know about how it is spread."""

    model: nn.Module
    strategy: str
    distributed: bool
    device: torch.device = torch.device("cpu")
    compute_dtype: torch.dtype = torch.float32
    defer_sharded_sync: bool = True

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp" and self.distributed

    def autocast(self) -> AbstractContextManager:
        """Where the task's step runs: bf16 autocast over fp32 trainable weights, unless FSDP's
        MixedPrecisionPolicy already casts them or the run is fp32."""
        if self.sharded or self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def no_sync(self) -> AbstractContextManager:
        """Backward passes inside accumulate gradients locally; the first backward after it reduces them all.
        FSDP without deferred sync reduce-scatters every backward into the sharded gradients instead."""
        if not self.distributed:
            return contextlib.nullcontext()
        if self.sharded:
            return _fsdp_no_sync(self.model) if self.defer_sharded_sync else contextlib.nullcontext()
        return self.model.no_sync()

    def clip_grad_norm(self, parameters: list[nn.Parameter], max_norm: float) -> float:
        """Clip the global gradient norm (over all shards under FSDP) and return it before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def keep_trainable_in_fp32(module: nn.Module) -> int:
    """Cast trainable floating-point parameters to fp32 in place; returns how many were cast."""
    cast = 0
    for parameter in module.parameters():
        if parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
            cast += 1
    return cast


def parallelize(
    module: nn.Module,
    *,
    strategy: str,
    world_size: int,
    device: torch.device,
    compute_dtype: torch.dtype,
    shard_units: Callable[[], Iterable[nn.Module]],
    defer_sharded_sync: bool = True,
) -> Parallel:
    """Wrap ``module`` for ``strategy`` (in place for FSDP). ``shard_units`` lists the blocks FSDP shards one by one
    (decoder layers and vision blocks); everything else forms the root unit. ``defer_sharded_sync`` (FSDP): hold
    unsharded gradients until a step's last backward instead of reduce-scattering after each."""
    distributed = world_size > 1
    # Every path keeps fp32 master weights: FSDP through its policy below, the others under autocast.
    keep_trainable_in_fp32(module)
    if not distributed or strategy == "ddp":
        if distributed:
            device_ids = [device.index] if device.type == "cuda" else None
            # Gradients live in the all-reduce buckets instead of beside a second copy there.
            module = nn.parallel.DistributedDataParallel(
                module, device_ids=device_ids, gradient_as_bucket_view=True
            )
        return Parallel(module, strategy, distributed, device, compute_dtype)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for unit in shard_units():
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)
    return Parallel(module, strategy, True, device, compute_dtype, defer_sharded_sync)
