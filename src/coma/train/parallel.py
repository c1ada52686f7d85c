"""How the training loop spreads a model over ranks: one process, DDP, or FSDP2 (``fully_shard``).

``ddp`` replicates the model and all-reduces gradients. ``fsdp`` shards every decoder layer and vision block, then
the rest of the model as the root unit, with ``torch.distributed.fsdp.fully_shard``; parameters, gradients and
optimizer state live in shards and each unit is all-gathered just for its forward and backward. Trainable
parameters are kept in fp32 (small AdamW updates on bf16 weights round away) and computed in the run's dtype through
FSDP's ``MixedPrecisionPolicy``; gradients are reduced in fp32. Frozen weights stay in the dtype they were loaded in.

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

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp" and self.distributed

    def no_sync(self) -> AbstractContextManager:
        """Backward passes inside accumulate gradients locally; the first backward after it reduces them all."""
        if not self.distributed:
            return contextlib.nullcontext()
        if self.sharded:
            return _fsdp_no_sync(self.model)
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
) -> Parallel:
    """Wrap ``module`` for ``strategy`` (in place for FSDP). ``shard_units`` lists the blocks FSDP shards one by one
    (decoder layers and vision blocks); everything else forms the root unit."""
    distributed = world_size > 1
    if not distributed:
        return Parallel(module, strategy, distributed=False)
    if strategy == "ddp":
        device_ids = [device.index] if device.type == "cuda" else None
        return Parallel(nn.parallel.DistributedDataParallel(module, device_ids=device_ids), strategy, True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    keep_trainable_in_fp32(module)
    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for unit in shard_units():
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)
    return Parallel(module, strategy, distributed=True)
