"""One stage-2 (matching) training step: forward and backward of a rank's share of a global batch.

Queries, targets and optional hard negatives are split into chunks, each chunk is collated into a processor
batch and embedded, and ``ContrastiveLoss`` (InfoNCE over the embeddings gathered from every rank) is
back-propagated: with GradCache (``coma.gradcache.grad_cache_step``: no-grad pass, loss, replay of every
chunk under its recorded RNG state) or plainly (every chunk encoded with grad, one backward).

Distributed safety. Every chunk runs the vision tower: a chunk without any image gets one dummy image input
appended, whose embedding enters the result multiplied by zero, so the vision parameters take part in
every forward and receive a (zero) gradient on every rank; DDP's reducer and FSDP's per-module collectives
then see the same modules on every rank. Ranks also agree, through one small all-reduce per step, on the
number of chunks per group (a rank short of chunks encodes dummy-only chunks that contribute no rows) and on
whether there is a hard-negative group at all, so every rank runs the same sequence of forwards and
collectives even when batch shares or negative counts differ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor, nn

from coma.embedder import EncodeInput
from coma.gradcache import grad_cache_step, split_into_chunks
from coma.losses import ContrastiveLoss, gather_with_grad, world_size

__all__ = ["ContrastiveStep", "chunk_inputs", "in_batch_accuracy"]

# Two 28-px cells: the smallest image every Qwen-VL processor accepts (it is resized up to min_pixels anyway).
DUMMY_IMAGE_SIZE = 56
Collate = Callable[[Sequence[EncodeInput]], dict]


def chunk_inputs(items: Sequence[EncodeInput], chunk_size: int | None) -> list[list[EncodeInput]]:
    """Consecutive chunks of at most ``chunk_size`` inputs (None: one chunk); no chunks for no inputs."""
    if not items:
        return []
    if chunk_size is None:
        return [list(items)]
    return [list(chunk) for chunk in split_into_chunks(list(items), chunk_size)]


def in_batch_accuracy(queries: Tensor, targets: Tensor, negatives: Tensor | None = None) -> float:
    """Fraction of queries whose own target (same row) scores strictly above every other candidate.

    Candidates are all targets plus the hard negatives, as in the loss; a tie counts as a miss, so a
    collapsed model (all embeddings equal) scores 0 rather than 1/N.
    """
    n = queries.shape[0]
    if n == 0:
        raise ValueError("in_batch_accuracy: no queries")
    candidates = targets if negatives is None else torch.cat([targets, negatives])
    scores = queries.detach().float() @ candidates.detach().float().T
    rows = torch.arange(n, device=scores.device)
    positive = scores[rows, rows]
    others = scores.clone()
    others[rows, rows] = float("-inf")
    best_other = others.max(dim=1).values
    return float((positive > best_other).float().mean())


def _global_chunk_counts(counts: list[int], device: torch.device) -> list[int]:
    """The per-group maximum of the chunk counts over all ranks (the counts themselves on one rank)."""
    if world_size() == 1:
        return counts
    tensor = torch.tensor(counts, dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [int(count) for count in tensor.tolist()]


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class ContrastiveStep:
    """Forward + backward of one contrastive step; gradients accumulate into ``.grad`` (zero them first).

    ``model``: an ``EmbeddingModel`` (its backbone may be peft-wrapped), or a DDP/FSDP wrapper of one, whose
    ``model(batch)`` returns (B, D) normalised embeddings. ``loss``: the ``ContrastiveLoss`` (temperature,
    symmetric). ``query_chunk_size`` / ``target_chunk_size``: inputs per forward (None: the whole group in
    one forward); hard negatives use the target chunk size. ``use_grad_cache``: GradCache (memory of one
    chunk) or the plain step (every chunk encoded with grad, then one backward; the same gradients).
    ``dummy_image``: append a dummy image to image-less chunks (see the module docstring). It costs one extra
    row per text-only chunk, and the chunk is padded to the dummy's length (its visual tokens follow the
    processor's ``min_pixels``); turn it off only for single-process runs. Empty padding chunks always get it.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: ContrastiveLoss,
        query_chunk_size: int | None = None,
        target_chunk_size: int | None = None,
        use_grad_cache: bool = True,
        dummy_image: bool = True,
    ) -> None:
        for name, size in (("query_chunk_size", query_chunk_size), ("target_chunk_size", target_chunk_size)):
            if size is not None and size < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {size}")
        self.model = model
        self.loss = loss
        self.query_chunk_size = query_chunk_size
        self.target_chunk_size = target_chunk_size
        self.use_grad_cache = use_grad_cache
        self.dummy_image = dummy_image
        self.dummy_input = EncodeInput(
            image=Image.new("RGB", (DUMMY_IMAGE_SIZE, DUMMY_IMAGE_SIZE), (128, 128, 128))
        )

    def __call__(
        self,
        queries: Sequence[EncodeInput],
        targets: Sequence[EncodeInput],
        negatives: Sequence[EncodeInput] | None,
        collate: Collate,
        no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
        *,
        model: nn.Module | None = None,
    ) -> dict[str, float | int]:
        """Back-propagate the loss of this rank's pairs (query i <-> target i) against the global batch.

        ``collate`` turns a list of inputs into a processor batch (``PairCollator.collate``); ``no_sync``
        (``ddp_model.no_sync``) defers DDP's all-reduce to the last chunk under GradCache; ``model``
        overrides the constructor's model for this call (e.g. the DDP wrapper the training loop builds).
        Returns ``loss`` (the global InfoNCE loss, for logging), ``n`` (this rank's pairs), ``tokens``
        (non-padding tokens of this rank's inputs, each input counted once) and ``accuracy`` (in-batch
        retrieval accuracy over the global batch, see :func:`in_batch_accuracy`).
        """
        if len(queries) != len(targets):
            raise ValueError(f"ContrastiveStep: {len(queries)} queries but {len(targets)} targets")
        model = self.model if model is None else model
        device = _model_device(model)
        groups = [
            chunk_inputs(queries, self.query_chunk_size),
            chunk_inputs(targets, self.target_chunk_size),
            chunk_inputs(negatives or [], self.target_chunk_size),
        ]
        counts = _global_chunk_counts([len(chunks) for chunks in groups], device)
        if counts[0] == 0:
            raise ValueError("ContrastiveStep: the global batch holds no pairs")
        if counts[2] == 0:
            groups = groups[:2]
        # A rank short of chunks encodes empty (dummy-only) chunks, so every rank runs as many forwards.
        groups = [
            chunks + [[] for _ in range(count - len(chunks))]
            for chunks, count in zip(groups, counts[: len(groups)], strict=True)
        ]

        tokens: dict[tuple[int, int], int] = {}
        stats: dict[str, float] = {}

        def encode(group: int, chunk: list[EncodeInput]) -> Tensor:
            return self._encode(model, chunk, collate, device, tokens, (group, id(chunk)))

        def loss_fn(embeddings: list[Tensor]) -> Tensor:
            negative = embeddings[2] if len(embeddings) > 2 else None
            gathered = [gather_with_grad(e.detach()) for e in embeddings]
            stats["accuracy"] = in_batch_accuracy(*gathered)
            return self.loss(embeddings[0], embeddings[1], negative)

        if self.use_grad_cache:
            loss = grad_cache_step(groups, encode, loss_fn, no_sync=no_sync)
        else:
            embeddings = [
                torch.cat([encode(g, chunk) for chunk in chunks]) for g, chunks in enumerate(groups)
            ]
            loss = loss_fn(embeddings)
            loss.backward()
        return {
            "loss": float(loss.detach()) / world_size(),
            "n": len(queries),
            "tokens": sum(tokens.values()),
            "accuracy": stats["accuracy"],
        }

    def _encode(
        self,
        model: nn.Module,
        items: list[EncodeInput],
        collate: Collate,
        device: torch.device,
        tokens: dict[tuple[int, int], int],
        key: tuple[int, int],
    ) -> Tensor:
        """Embeddings (len(items), D) of one chunk, with the dummy image folded in at weight zero if needed."""
        # An empty (padding) chunk must still run a forward, so it always gets the dummy.
        needs_dummy = not items or (self.dummy_image and all(item.image is None for item in items))
        batch = collate([*items, self.dummy_input] if needs_dummy else items)
        tokens[key] = int(batch["attention_mask"][: len(items)].sum())
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        embeddings = model(batch)
        if not needs_dummy:
            return embeddings
        real, dummy = embeddings[: len(items)], embeddings[len(items) :]
        # Zero weight keeps the values exact while putting the vision tower into this chunk's graph.
        return real + dummy.sum() * 0.0
