"""GradCache (Gao et al., 2021): a contrastive step over a batch too large to encode with grad at once.

1. Encode every chunk without grad, recording the RNG state before each chunk.
2. Compute the loss on the concatenated (detached) embeddings and the gradient of the loss with respect
   to every embedding: the "cache".
3. Re-encode each chunk with grad under its recorded RNG state (so dropout masks repeat) and
   back-propagate the cached gradient through it.

The parameter gradients equal those of encoding all chunks with grad in the same order and
back-propagating the loss once, while only one chunk's activations are alive at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["RngState", "grad_cache_step", "split_into_chunks"]


@dataclass(frozen=True)
class RngState:
    """The torch CPU generator state, plus the current CUDA device's generator when CUDA is in use.

    CUDA state is recorded only once CUDA is initialised; a model on the GPU has initialised it before
    the first chunk is encoded.
    """

    cpu: Tensor
    cuda_device: int | None = None
    cuda: Tensor | None = None

    @classmethod
    def capture(cls) -> RngState:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            device = torch.cuda.current_device()
            return cls(torch.get_rng_state(), device, torch.cuda.get_rng_state(device))
        return cls(torch.get_rng_state())

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.cuda_device)


def split_into_chunks(batch: Any, chunk_size: int) -> list[Any]:
    """Split a batch into consecutive chunks of at most `chunk_size` examples (the last may be shorter).

    `batch` is a tensor (split along dim 0), a list/tuple of examples, or a mapping whose values are all
    tensors or lists indexed by example along dim 0 and of equal length; mappings come back as dicts.
    """
    if chunk_size < 1:
        raise ValueError(f"split_into_chunks: chunk_size must be >= 1, got {chunk_size}")
    if isinstance(batch, Tensor):
        return list(batch.split(chunk_size))
    if isinstance(batch, (list, tuple)):
        return [batch[start : start + chunk_size] for start in range(0, len(batch), chunk_size)]
    if isinstance(batch, Mapping):
        if not batch:
            raise ValueError("split_into_chunks: the batch mapping is empty")
        lengths = {}
        for key, value in batch.items():
            if not isinstance(value, (Tensor, list, tuple)):
                raise TypeError(
                    f"split_into_chunks: batch[{key!r}] is a {type(value).__name__}; "
                    f"expected a tensor, list or tuple with one entry per example"
                )
            lengths[key] = value.shape[0] if isinstance(value, Tensor) else len(value)
        n = next(iter(lengths.values()))
        if any(length != n for length in lengths.values()):
            raise ValueError(
                f"split_into_chunks: batch values disagree on the number of examples along dim 0: {lengths}"
            )
        return [
            {key: value[start : start + chunk_size] for key, value in batch.items()}
            for start in range(0, n, chunk_size)
        ]
    raise TypeError(f"split_into_chunks: cannot split a {type(batch).__name__}")


def grad_cache_step(
    groups: Sequence[Sequence[Any]],
    encode: Callable[[int, Any], Tensor],
    loss_fn: Callable[[list[Tensor]], Tensor],
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> Tensor:
    """Accumulate into `.grad` the parameter gradients of `loss_fn` over chunked groups; return the loss.

    `groups[g]` is the list of chunks of group g (e.g. [query_chunks, target_chunks, negative_chunks]);
    `encode(g, chunk)` embeds one chunk as an (n, ...) tensor; `loss_fn` receives one tensor per group,
    the chunk embeddings concatenated along dim 0. Chunks are encoded group by group, in order.

    `no_sync` (e.g. `ddp_model.no_sync`) wraps every backward except the very last one, together with
    the forward that precedes it, so DDP all-reduces once, after the last chunk. Under DDP every rank
    must encode the same number of chunks. Gradients of parameters inside `loss_fn` (if any) are
    accumulated too, but not synchronised by DDP.

    RNG: after the call, the torch CPU (and current CUDA device) generators are in the state the plain
    step (encode every chunk with grad, then `loss_fn`) would leave them in.
    Returns the detached loss.
    """
    if not groups or any(len(chunks) == 0 for chunks in groups):
        raise ValueError(
            f"grad_cache_step: every group needs at least one chunk, got {[len(c) for c in groups]} chunks"
        )

    # 1. Embed without grad; the RNG state before each chunk lets step 3 replay the same dropout masks.
    states: list[list[RngState]] = []
    embeddings: list[list[Tensor]] = []
    with torch.no_grad():
        for g, chunks in enumerate(groups):
            states.append([])
            embeddings.append([])
            for chunk in chunks:
                states[g].append(RngState.capture())
                embeddings[g].append(encode(g, chunk))

    # 2. Loss on leaf copies of the embeddings; their gradients are the cache.
    sync_off = no_sync() if no_sync is not None else contextlib.nullcontext()
    with sync_off:
        leaves = [torch.cat(chunk_embs).detach().requires_grad_() for chunk_embs in embeddings]
        loss = loss_fn(leaves)
        loss.backward()
    after_loss = RngState.capture()
    cached: list[tuple[Tensor, ...]] = []
    for g, leaf in enumerate(leaves):
        if leaf.grad is None:
            raise ValueError(f"grad_cache_step: the loss does not depend on the embeddings of group {g}")
        cached.append(leaf.grad.split([emb.shape[0] for emb in embeddings[g]]))
    del embeddings, leaves

    # 3. Replay each chunk with grad and push its cached gradient through the encoder.
    n_chunks = sum(len(chunks) for chunks in groups)
    done = 0
    for g, chunks in enumerate(groups):
        for i, chunk in enumerate(chunks):
            done += 1
            last = done == n_chunks
            ctx = no_sync() if no_sync is not None and not last else contextlib.nullcontext()
            with ctx:
                states[g][i].restore()
                emb = encode(g, chunk)
                if emb.shape != cached[g][i].shape:
                    raise RuntimeError(
                        f"grad_cache_step: re-encoding chunk {i} of group {g} gave shape {tuple(emb.shape)}, "
                        f"the no-grad pass gave {tuple(cached[g][i].shape)}; encode must be deterministic "
                        f"given the RNG state"
                    )
                torch.sum(emb * cached[g][i]).backward()
    after_loss.restore()
    return loss.detach()
