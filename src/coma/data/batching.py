"""Batches by cost: inputs grouped so that each batch's padded token count stays under a budget.

A batch costs ``rows × its longest sequence`` tokens (everything is padded to the longest), so sorting by length
and cutting when the next item would push that product over ``max_batch_tokens`` keeps padding small and memory
bounded: many short texts share a batch, long image sequences get few rows. Batches are plain lists of input
indices, so a ``DataLoader`` can take them as its ``batch_sampler`` and collate them in worker processes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from PIL import Image

from coma.data.images import load_image, resolve_image_path

# Padded tokens per encode batch (rows × longest sequence): 64 images of 256 visual tokens, or 32 of 512. It bounds
# activation memory; the row cap (batch_size) still applies to short inputs.
DEFAULT_MAX_BATCH_TOKENS = 16384


def image_size(
    source: str | os.PathLike | Image.Image, root: str | os.PathLike | None = None
) -> tuple[int, int]:
    """``(width, height)`` of an image, read from the file header without decoding the pixels.

    A file PIL cannot open raises :class:`ImageLoadError` with :func:`load_image`'s message.
    """
    if isinstance(source, Image.Image):
        return source.size
    path = resolve_image_path(source, root)
    try:
        with Image.open(path) as image:  # lazy: only the header is read
            return image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        # load_image gives the message users see for this file everywhere else.
        return load_image(source, root).size


def padded_cost(batch: Sequence[int], lengths: Sequence[int]) -> int:
    """Tokens a batch occupies once padded: rows × the longest sequence."""
    return len(batch) * max((lengths[i] for i in batch), default=0)


def budget_batches(
    order: Sequence[int], lengths: Sequence[int], max_batch_tokens: int | None, max_rows: int
) -> list[list[int]]:
    """Cut ``order`` (indices, best sorted by length) into consecutive batches of at most ``max_rows`` rows whose
    :func:`padded_cost` is at most ``max_batch_tokens``; an item longer than the budget gets a batch of its own.

    ``max_batch_tokens=None`` cuts by rows alone (fixed-size batches).
    """
    if max_rows < 1:
        raise ValueError(f"batch_size must be >= 1, got {max_rows}")
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order:
        length = max(longest, lengths[index])
        over_budget = max_batch_tokens is not None and (len(current) + 1) * length > max_batch_tokens
        if current and (len(current) == max_rows or over_budget):
            batches.append(current)
            current, length = [], lengths[index]
        current.append(index)
        longest = length
    if current:
        batches.append(current)
    return batches


__all__ = ["DEFAULT_MAX_BATCH_TOKENS", "budget_batches", "image_size", "padded_cost"]
