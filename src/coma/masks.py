"""Stage-1 attention masks (DESIGN §2.2).

One sample is laid out as ``ENC (image block + prompt) | C (T compression tokens) | DEC (dialogue)``; all
positions are indices into the padded sequence, so right- and left-padded batches are handled alike.

Every builder returns a 4-D **additive float** mask ``(B, 1, L, L)``: ``0.0`` where query ``i`` may attend to
key ``j`` and ``torch.finfo(dtype).min`` where it may not. A boolean 4-D mask is silently misread by eager
attention (DESIGN §4), so boolean masks never leave this module.

Padding query rows attend only to themselves. Real rows never see padding keys, so whatever a padding row
computes cannot reach a real token, and no row is ever fully masked (no kernel produces NaN).

The ``*_block_mask`` builders state the same rules as FlexAttention ``BlockMask``s: the rules are written once
(``_compression_rule``, ``_split_rules``) on broadcastable index tensors, evaluated on the full grid for the dense
masks and per (batch, query, key) by FlexAttention, which skips every block the rules block entirely (the dialogue's
rows against the image's columns under the bottleneck).
"""

from __future__ import annotations

from itertools import pairwise
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

MASK_MODES = ("bottleneck", "none")


def _check_inputs(padding_mask: Tensor, dtype: torch.dtype, **positions: Tensor) -> None:
    if padding_mask.dim() != 2:
        raise ValueError(f"padding_mask must be (B, L), got shape {tuple(padding_mask.shape)}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype for an additive mask, got {dtype}")
    batch, length = padding_mask.shape
    for name, value in positions.items():
        if value.shape != (batch,):
            raise ValueError(f"{name} must have shape ({batch},), got {tuple(value.shape)}")
        if value.dtype.is_floating_point or value.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {value.dtype}")
        if bool(((value < 0) | (value > length)).any()):
            raise ValueError(f"{name} must lie in [0, {length}], got {value.tolist()}")
    for (lo_name, lo), (hi_name, hi) in pairwise(positions.items()):
        if bool((lo > hi).any()):
            raise ValueError(
                f"{lo_name} must be <= {hi_name} in every sample, got {lo.tolist()} and {hi.tolist()}"
            )


def _grid(padding_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Query idx (1, L, 1), key idx (1, 1, L), real queries (B, L, 1)."""
    length = padding_mask.shape[1]
    idx = torch.arange(length, device=padding_mask.device)
    return idx.view(1, length, 1), idx.view(1, 1, length), padding_mask.bool()[:, :, None]


def _per_sample(value: Tensor, device: torch.device) -> Tensor:
    return value.to(device=device, dtype=torch.long).view(-1, 1, 1)


def _compression_rule(
    query: Tensor, key: Tensor, real_key: Tensor, cs: Tensor, ce: Tensor, mode: str, bidirectional_c: bool
) -> Tensor:
    """Where a real query may attend (index tensors broadcast): causal over real keys, then the mode's cuts."""
    allowed = (key <= query) & real_key
    if mode == "bottleneck":
        allowed = allowed & ~((query >= ce) & (key < cs))
    if bidirectional_c:
        allowed = allowed | ((query >= cs) & (query < ce) & (key >= cs) & (key < ce) & real_key)
    return allowed


def _split_rules(
    query: Tensor, key: Tensor, real_key: Tensor, cs: Tensor, ce: Tensor, ans: Tensor
) -> tuple[Tensor, Tensor]:
    """The layer-split variant's (lower, upper) rules for real queries (see :func:`split_layer_masks`)."""
    lower = (key <= query) & real_key & ~((query >= ans) & (key < ce))
    return lower, lower & ~((query >= cs) & (key < cs))


def _with_padding_rows(allowed: Tensor, real_query: Tensor, query: Tensor, key: Tensor) -> Tensor:
    # Padding rows: only the diagonal, whatever the rules said, so the row is never empty.
    return torch.where(real_query, allowed, query == key)


def _finish(allowed: Tensor, real_query: Tensor, query: Tensor, key: Tensor, dtype: torch.dtype) -> Tensor:
    allowed = _with_padding_rows(allowed, real_query, query, key)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


def compression_attention_mask(
    padding_mask: Tensor,
    c_start: Tensor,
    c_end: Tensor,
    mode: str = "bottleneck",
    bidirectional_c: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Additive (B, 1, L, L) stage-1 mask.

    ``padding_mask`` (B, L) is 1 for real tokens and 0 for padding on either side; ``c_start`` / ``c_end``
    (B,) are the index of the first compression token and one past the last one (the first DEC token).
    ``mode="none"`` is plain causal + padding (what the authors' released code runs); ``"bottleneck"`` also
    stops DEC queries (``i >= c_end``) from seeing ENC keys (``j < c_start``), so the dialogue reads the
    image only through the compression tokens. ``bidirectional_c`` lets every C query see every C key, in
    either mode.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mode must be one of {MASK_MODES}, got {mode!r}")
    _check_inputs(padding_mask, dtype, c_start=c_start, c_end=c_end)
    query, key, real_query = _grid(padding_mask)
    cs, ce = _per_sample(c_start, padding_mask.device), _per_sample(c_end, padding_mask.device)
    real_key = padding_mask.bool()[:, None, :]
    allowed = _compression_rule(query, key, real_key, cs, ce, mode, bidirectional_c)
    return _finish(allowed, real_query, query, key, dtype)


def split_layer_masks(
    padding_mask: Tensor,
    c_start: Tensor,
    c_end: Tensor,
    answer_start: Tensor,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """The released code's layer-split masks ``(lower, upper)``, each additive (B, 1, L, L).

    ``lower`` (layers < k): causal + padding, and rows ``i >= answer_start`` blocked from keys ``j < c_end``.
    ``upper`` (layers >= k): ``lower`` plus rows ``i >= c_start`` blocked from keys ``j < c_start``; so C sees
    only C, the question sees C and the question, the answer sees only question and answer.
    ``answer_start`` (B,) is per sample and must satisfy ``c_start <= c_end <= answer_start <= L``.
    """
    _check_inputs(padding_mask, dtype, c_start=c_start, c_end=c_end, answer_start=answer_start)
    query, key, real_query = _grid(padding_mask)
    device = padding_mask.device
    cs, ce = _per_sample(c_start, device), _per_sample(c_end, device)
    ans = _per_sample(answer_start, device)
    lower, upper = _split_rules(query, key, padding_mask.bool()[:, None, :], cs, ce, ans)
    return _finish(lower, real_query, query, key, dtype), _finish(upper, real_query, query, key, dtype)


def per_layer_masks(num_layers: int, split_layer: int, lower: Tensor, upper: Tensor) -> list[Tensor]:
    """Mask per decoder layer: ``lower`` below ``split_layer``, ``upper`` from it on (tensors are shared)."""
    if not 0 < split_layer < num_layers:
        # split_layer = 0 would cut the image off from every token; >= num_layers never uses `upper`.
        raise ValueError(
            f"split_layer must be in [1, {num_layers - 1}] for {num_layers} layers, got {split_layer}"
        )
    return [lower if layer < split_layer else upper for layer in range(num_layers)]


def allowed_from_additive(mask: Tensor) -> Tensor:
    """Boolean view of an additive mask: True where attention is allowed (the entry is exactly 0)."""
    return mask == 0


def compression_block_mask(
    padding_mask: Tensor,
    c_start: Tensor,
    c_end: Tensor,
    mode: str = "bottleneck",
    bidirectional_c: bool = False,
    block_size: int = 128,
) -> BlockMask:
    """:func:`compression_attention_mask`'s rules as a FlexAttention ``BlockMask`` (B, 1, L, L)."""
    if mode not in MASK_MODES:
        raise ValueError(f"mode must be one of {MASK_MODES}, got {mode!r}")
    _check_inputs(padding_mask, torch.float32, c_start=c_start, c_end=c_end)
    real, cs, ce = padding_mask.bool(), c_start.to(padding_mask.device), c_end.to(padding_mask.device)

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        allowed = _compression_rule(q, kv, real[b, kv], cs[b], ce[b], mode, bidirectional_c)
        return _with_padding_rows(allowed, real[b, q], q, kv)

    return _block_mask(mask_mod, padding_mask, block_size)


def split_layer_block_masks(
    padding_mask: Tensor, c_start: Tensor, c_end: Tensor, answer_start: Tensor, block_size: int = 128
) -> tuple[BlockMask, BlockMask]:
    """:func:`split_layer_masks`' ``(lower, upper)`` as FlexAttention ``BlockMask``s."""
    _check_inputs(padding_mask, torch.float32, c_start=c_start, c_end=c_end, answer_start=answer_start)
    device = padding_mask.device
    real, cs, ce, ans = padding_mask.bool(), c_start.to(device), c_end.to(device), answer_start.to(device)

    def mask_mod(which: int, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        allowed = _split_rules(q, kv, real[b, kv], cs[b], ce[b], ans[b])[which]
        return _with_padding_rows(allowed, real[b, q], q, kv)

    lower = _block_mask(lambda b, h, q, kv: mask_mod(0, b, h, q, kv), padding_mask, block_size)
    upper = _block_mask(lambda b, h, q, kv: mask_mod(1, b, h, q, kv), padding_mask, block_size)
    return lower, upper


def _block_mask(mask_mod, padding_mask: Tensor, block_size: int) -> BlockMask:
    from torch.nn.attention.flex_attention import create_block_mask

    batch, length = padding_mask.shape
    device = padding_mask.device
    # Compiled on GPU: the uncompiled builder materialises the whole (B, L, L) grid, which is what this avoids.
    return create_block_mask(mask_mod, batch, None, length, length, device=device, BLOCK_SIZE=block_size,
                             _compile=device.type == "cuda")  # fmt: skip
