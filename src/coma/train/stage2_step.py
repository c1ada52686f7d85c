"""One stage-2 (matching) training step: forward and backward of a rank's share of a global batch.

Two halves. :meth:`ChunkPlan.prepare` (CPU only, no model: it runs in a DataLoader worker) splits queries,
targets and optional hard negatives into chunks and collates every chunk into a processor batch, once per step.
:meth:`ContrastiveStep.run` embeds the chunks and back-propagates ``ContrastiveLoss`` (InfoNCE over the
embeddings gathered from every rank): with GradCache (``coma.gradcache.grad_cache_step``: no-grad pass, loss,
replay of every chunk under its recorded RNG state, on the same collated batches) or plainly (every chunk
encoded with grad, one backward).

Frozen vision. When the vision tower (merger included) has no trainable parameter, GradCache's replay takes
each chunk's image features from its no-grad pass (:class:`coma.backbones.base.VisionCache`) instead of
running the tower again: the same values, so the same gradients.

Distributed safety. Ranks agree, through one small all-reduce per step, on the number of chunks per group (a
rank short of chunks encodes dummy-only chunks that contribute no rows) and on whether there is a
hard-negative group at all, so every rank runs the same sequence of forwards and collectives even when batch
shares or negative counts differ. With ``dummy_image`` a chunk without any image also gets one dummy image
input appended, whose embedding enters the result multiplied by zero, so the vision tower runs in every chunk
on every rank. That is needed when the vision parameters are trainable (DDP's reducer waits for their
gradients on every rank) and under FSDP (every rank must all-gather each sharded vision block as often as the
others); with a frozen tower under DDP it is pure overhead, and :func:`needs_dummy_image` says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor, nn

from coma.backbones.base import VisionCache
from coma.data.pipeline import to_device
from coma.embedder import EncodeInput
from coma.gradcache import grad_cache_step, split_into_chunks
from coma.losses import ContrastiveLoss, gather_with_grad, world_size

__all__ = [
    "Chunk",
    "ChunkPlan",
    "ContrastiveStep",
    "PreparedStep",
    "chunk_inputs",
    "in_batch_accuracy",
    "needs_dummy_image",
    "vision_frozen",
]

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


def vision_frozen(model: nn.Module) -> bool:
    """Whether an ``EmbeddingModel``'s vision tower (merger included) has no trainable parameter."""
    tower = model.adapter.vision_tower(model.backbone)
    return not any(parameter.requires_grad for parameter in tower.parameters())


def needs_dummy_image(model: nn.Module, distributed: bool, strategy: str) -> bool:
    """Whether text-only chunks need the dummy image (see the module docstring): in a distributed run whose vision
    tower is trainable or sharded block by block (FSDP)."""
    return distributed and (strategy == "fsdp" or not vision_frozen(model))


@dataclass
class Chunk:
    """One collated chunk: ``batch`` holds ``rows`` real inputs, then possibly the dummy image input."""

    batch: dict[str, Tensor]
    rows: int
    tokens: int  # non-padding tokens of the real rows


@dataclass
class PreparedStep:
    """A rank's share of one step, collated: ``groups`` = query, target and (possibly empty) hard-negative chunks."""

    groups: list[list[Chunk]]
    pairs: int
    padding: Chunk | None = None  # a dummy-only chunk for a rank short of chunks (distributed runs)


@dataclass(frozen=True)
class ChunkPlan:
    """How a step is cut into chunks and collated; :meth:`prepare` needs no model, so it can run in a worker.

    ``query_chunk_size`` / ``target_chunk_size``: inputs per forward (None: the whole group); hard negatives use
    the target chunk size. ``dummy_image``: append the dummy image to image-less chunks. ``padding``: also
    collate a dummy-only chunk, for distributed runs where this rank may have fewer chunks than another.
    """

    query_chunk_size: int | None = None
    target_chunk_size: int | None = None
    dummy_image: bool = True
    padding: bool = False

    def __post_init__(self) -> None:
        for name in ("query_chunk_size", "target_chunk_size"):
            size = getattr(self, name)
            if size is not None and size < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {size}")

    def prepare(
        self,
        queries: Sequence[EncodeInput],
        targets: Sequence[EncodeInput],
        negatives: Sequence[EncodeInput] | None,
        collate: Collate,
    ) -> PreparedStep:
        """Every chunk of this rank's pairs collated once (``collate``: ``PairCollator.collate``)."""
        if len(queries) != len(targets):
            raise ValueError(f"ContrastiveStep: {len(queries)} queries but {len(targets)} targets")
        groups = [
            chunk_inputs(queries, self.query_chunk_size),
            chunk_inputs(targets, self.target_chunk_size),
            chunk_inputs(negatives or [], self.target_chunk_size),
        ]
        return PreparedStep(
            groups=[[self._collate(chunk, collate) for chunk in chunks] for chunks in groups],
            pairs=len(queries),
            padding=self._collate([], collate) if self.padding else None,
        )

    def _collate(self, items: list[EncodeInput], collate: Collate) -> Chunk:
        # An empty (padding) chunk must still run a forward, so it always gets the dummy.
        needs_dummy = not items or (self.dummy_image and all(item.image is None for item in items))
        batch = collate([*items, _dummy_input()] if needs_dummy else items)
        return Chunk(batch, len(items), int(batch["attention_mask"][: len(items)].sum()))


def _dummy_input() -> EncodeInput:
    return EncodeInput(image=Image.new("RGB", (DUMMY_IMAGE_SIZE, DUMMY_IMAGE_SIZE), (128, 128, 128)))


class ContrastiveStep:
    """Forward + backward of one contrastive step; gradients accumulate into ``.grad`` (zero them first).

    ``model``: an ``EmbeddingModel`` (its backbone may be peft-wrapped), or a DDP/FSDP wrapper of one, whose
    ``model(batch)`` returns (B, D) normalised embeddings. ``loss``: the ``ContrastiveLoss`` (temperature,
    symmetric). ``query_chunk_size`` / ``target_chunk_size`` / ``dummy_image``: see :class:`ChunkPlan` (the
    dummy costs one extra row per text-only chunk, and the chunk is padded to the dummy's length; see
    :func:`needs_dummy_image` for when it is needed). ``use_grad_cache``: GradCache (memory of one chunk) or the
    plain step (every chunk encoded with grad, then one backward; the same gradients). ``reuse_vision``: under
    GradCache, the replay reuses the no-grad pass's image features (None: when the vision tower is frozen).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: ContrastiveLoss,
        query_chunk_size: int | None = None,
        target_chunk_size: int | None = None,
        use_grad_cache: bool = True,
        dummy_image: bool = True,
        reuse_vision: bool | None = None,
    ) -> None:
        self.plan = ChunkPlan(query_chunk_size, target_chunk_size, dummy_image, padding=world_size() > 1)
        self.model = model
        self.loss = loss
        self.use_grad_cache = use_grad_cache
        if reuse_vision is None:
            reuse_vision = hasattr(model, "adapter") and vision_frozen(model)
        elif reuse_vision and not vision_frozen(model):
            raise ValueError(
                "reuse_vision needs a frozen vision tower: a trainable one must run in the replay"
            )
        self.reuse_vision = reuse_vision

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
        """Collate this rank's pairs in this process (:meth:`ChunkPlan.prepare`) and :meth:`run` the step."""
        return self.run(self.plan.prepare(queries, targets, negatives, collate), no_sync, model=model)

    def run(
        self,
        prepared: PreparedStep,
        no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
        *,
        model: nn.Module | None = None,
    ) -> dict[str, float | int]:
        """Back-propagate the loss of this rank's pairs (query i <-> target i) against the global batch.

        ``no_sync`` (``ddp_model.no_sync``) defers DDP's all-reduce to the last chunk under GradCache; ``model``
        overrides the constructor's model for this call (e.g. the DDP wrapper the training loop builds).
        Returns ``loss`` (the global InfoNCE loss, for logging), ``n`` (this rank's pairs), ``tokens``
        (non-padding tokens of this rank's inputs, each input counted once) and ``accuracy`` (in-batch
        retrieval accuracy over the global batch, see :func:`in_batch_accuracy`).
        """
        model = self.model if model is None else model
        device = _model_device(model)
        groups = prepared.groups
        counts = _global_chunk_counts([len(chunks) for chunks in groups], device)
        if counts[0] == 0:
            raise ValueError("ContrastiveStep: the global batch holds no pairs")
        if counts[2] == 0:
            groups = groups[:2]
        # A rank short of chunks encodes empty (dummy-only) chunks, so every rank runs as many forwards.
        groups = [
            chunks + [prepared.padding] * (count - len(chunks))
            for chunks, count in zip(groups, counts[: len(groups)], strict=True)
        ]
        # Positions, not the chunks themselves, key the vision caches: padding chunks repeat one object.
        indexed = [list(enumerate(chunks)) for chunks in groups]
        caches: dict[tuple[int, int], VisionCache] = {}
        stats: dict[str, float] = {}

        def encode(group: int, item: tuple[int, Chunk]) -> Tensor:
            index, chunk = item
            cache = None
            if self.use_grad_cache and self.reuse_vision:
                cache = caches.setdefault((group, index), VisionCache())
            return self._encode(model, chunk, device, cache)

        def loss_fn(embeddings: list[Tensor]) -> Tensor:
            negative = embeddings[2] if len(embeddings) > 2 else None
            gathered = [gather_with_grad(e.detach()) for e in embeddings]
            stats["accuracy"] = in_batch_accuracy(*gathered)
            return self.loss(embeddings[0], embeddings[1], negative)

        if self.use_grad_cache:
            loss = grad_cache_step(indexed, encode, loss_fn, no_sync=no_sync)
        else:
            embeddings = [torch.cat([encode(g, item) for item in items]) for g, items in enumerate(indexed)]
            loss = loss_fn(embeddings)
            loss.backward()
        return {
            "loss": float(loss.detach()) / world_size(),
            "n": prepared.pairs,
            "tokens": sum(chunk.tokens for chunks in prepared.groups[: len(groups)] for chunk in chunks),
            "accuracy": stats["accuracy"],
        }

    @staticmethod
    def _encode(model: nn.Module, chunk: Chunk, device: torch.device, cache: VisionCache | None) -> Tensor:
        """Embeddings (chunk.rows, D) of one chunk, with a dummy row folded in at weight zero if there is one."""
        batch = to_device(chunk.batch, device)
        embeddings = model(batch) if cache is None else model(batch, vision_cache=cache)
        if embeddings.shape[0] == chunk.rows:
            return embeddings
        real, dummy = embeddings[: chunk.rows], embeddings[chunk.rows :]
        # Zero weight keeps the values exact while putting the vision tower into this chunk's graph.
        return real + dummy.sum() * 0.0
