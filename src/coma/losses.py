"""Contrastive loss for stage 2 (matching): InfoNCE with in-batch negatives gathered across ranks.

The gradient convention (see `ContrastiveLoss`): every rank computes the *same* global loss, but gradients
flow only into its own shard of embeddings. Summing those per-rank gradients gives the exact global
gradient, so the loss is multiplied by the world size to cancel DDP's gradient averaging.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ContrastiveLoss", "gather_with_grad", "info_nce", "world_size"]


def world_size() -> int:
    """Number of `torch.distributed` ranks, 1 when the process group is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from every rank along dim 0, in rank order.

    The local shard is `x` itself, so it stays in the autograd graph; the other ranks' shards are constants.
    Ranks may hold different numbers of rows (even zero), but all ranks must call this together with the
    same trailing shape and dtype. Identity when `torch.distributed` is not initialised or has one rank.
    """
    n_ranks = world_size()
    if n_ranks == 1:
        return x
    # Row counts first, so that shards of unequal length can be padded to a common size for all_gather.
    local_rows = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    row_counts = [torch.zeros_like(local_rows) for _ in range(n_ranks)]
    dist.all_gather(row_counts, local_rows)
    sizes = [int(n.item()) for n in row_counts]
    max_rows = max(sizes)
    if max_rows == 0:
        return x
    sent = x.detach()
    if sent.shape[0] < max_rows:
        sent = torch.cat([sent, sent.new_zeros((max_rows - sent.shape[0], *sent.shape[1:]))])
    received = [torch.empty_like(sent) for _ in range(n_ranks)]
    dist.all_gather(received, sent.contiguous())
    shards = [shard[:n] for shard, n in zip(received, sizes, strict=True)]
    shards[dist.get_rank()] = x
    return torch.cat(shards)


def info_nce(
    queries: Tensor,
    targets: Tensor,
    *,
    temperature: float = 0.03,
    negatives: Tensor | None = None,
    symmetric: bool = False,
) -> Tensor:
    """InfoNCE over a batch of (query, target) pairs; inputs are assumed L2-normalised.

    logits = queries @ [targets; negatives]^T / temperature and the positive of query i is column i, so
    the other targets act as in-batch negatives and `negatives` (M, D) are extra columns shared by every
    query. `symmetric=True` averages in the target->query term (targets vs queries, no extra negatives).
    Returns the mean over queries.
    """
    if queries.ndim != 2 or queries.shape != targets.shape:
        raise ValueError(
            f"info_nce: queries and targets must both be (N, D) with equal shapes, "
            f"got queries {tuple(queries.shape)} and targets {tuple(targets.shape)}"
        )
    if negatives is not None and (negatives.ndim != 2 or negatives.shape[1] != queries.shape[1]):
        raise ValueError(
            f"info_nce: negatives must be (M, {queries.shape[1]}) to match queries, "
            f"got {tuple(negatives.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"info_nce: temperature must be > 0, got {temperature}")
    labels = torch.arange(queries.shape[0], device=queries.device)
    candidates = targets if negatives is None else torch.cat([targets, negatives])
    loss = F.cross_entropy(queries @ candidates.T / temperature, labels)
    if symmetric:
        reverse = F.cross_entropy(targets @ queries.T / temperature, labels)
        loss = (loss + reverse) / 2
    return loss


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class ContrastiveLoss(torch.nn.Module):
    """InfoNCE over the global batch: queries, targets and negatives are gathered from every rank.

    Query i of rank r is matched with target i of rank r (each rank must pass as many queries as
    targets; ranks may hold different batch sizes). Every rank passes `negatives` or none may: a rank
    without hard negatives in a step still takes part in the gather with an empty shard.

    The returned value is `world_size * global_loss`. Each rank back-propagates only into its own shard,
    and the per-rank gradients sum to the exact gradient of the global loss; DDP averages gradients over
    ranks, so the factor makes the synchronised gradient equal to the single-process gradient of the
    whole global batch. Divide the returned value by `coma.losses.world_size()` for logging.
    """

    def __init__(self, temperature: float = 0.03, symmetric: bool = False) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"ContrastiveLoss: temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.symmetric = symmetric

    def forward(self, queries: Tensor, targets: Tensor, negatives: Tensor | None = None) -> Tensor:
        if queries.shape[0] != targets.shape[0]:
            raise ValueError(
                f"ContrastiveLoss: {queries.shape[0]} queries but {targets.shape[0]} targets on this rank"
            )
        n_ranks = world_size()
        all_queries = gather_with_grad(queries)
        all_targets = gather_with_grad(targets)
        all_negatives = None
        if n_ranks > 1:
            # Always gather, so that ranks with and without negatives in the same step run the same collectives.
            local_negatives = negatives if negatives is not None else queries.new_zeros((0, queries.shape[1]))
            all_negatives = gather_with_grad(local_negatives)
            if all_negatives.shape[0] == 0:
                all_negatives = None
        elif negatives is not None:
            all_negatives = negatives
        # In fp32 even inside a bf16 autocast step: at temperature 0.02 the logits reach 50, where bf16 resolves
        # only steps of 0.25.
        with torch.autocast(queries.device.type, enabled=False):
            loss = info_nce(
                _at_least_fp32(all_queries),
                _at_least_fp32(all_targets),
                temperature=self.temperature,
                negatives=None if all_negatives is None else _at_least_fp32(all_negatives),
                symmetric=self.symmetric,
            )
        return loss * n_ranks

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, symmetric={self.symmetric}"
