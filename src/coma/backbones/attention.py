"""Which attention kernels a run uses, for the language model and the vision tower separately.

Paths whose mask is only padding (stage 2, eval, encode, stage 1 ``mask_mode: none``) pass the 2-D padding mask
and run ``flash_attention_2`` where the flash-attn package is installed (CUDA), else SDPA. Stage 1's bottleneck
needs a 4-D mask, which flash-attn cannot take: there ``auto`` is the block-sparse FlexAttention path on GPU and
the dense additive mask under SDPA elsewhere.

FlexAttention runs through transformers' own ``flex_attention_forward``, registered under :data:`BLOCK_SPARSE`:
transformers 5.17 and 5.24 refuse ``attn_implementation="flex_attention"`` for the Qwen-VL classes (they do not
declare support, and their vision tower's per-image ``cu_seqlens`` attention would indeed be wrong under it), but
their language model only needs the ``BlockMask`` coma builds and hands in (a 4-D mask skips transformers' own
mask creation). The vision tower never runs FlexAttention.

The vision tower attends within each image (and, in Qwen2.5-VL's windowed blocks, within each 112-px window) by
``cu_seqlens``. Under SDPA transformers loops over those segments in Python, one kernel per window; ``packed_sdpa``
(:func:`packed_varlen_attention`) instead batches all segments of equal length into one SDPA call, a handful of
calls per layer. It is registered under :data:`PACKED_VISION`, whose name contains "flash" because that is what
makes the Qwen-VL vision attention hand over the whole packed sequence with its ``cu_seqlens`` in one call.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch

TEXT_CHOICES = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention")
PACKED_SDPA = "packed_sdpa"
VISION_CHOICES = ("auto", "sdpa", PACKED_SDPA, "eager", "flash_attention_2")
# The key the Qwen-VL models dispatch to for FlexAttention (its name must not contain "flex_attention", which
# transformers checks against the model class's declared support).
BLOCK_SPARSE = "coma_block_sparse"
# The key the vision attention dispatches to for packed_sdpa; set on the loaded tower's config, never passed to
# from_pretrained (which would try to import flash-attn for a name containing "flash").
PACKED_VISION = "coma_packed_flash_varlen"


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flex_attention_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def resolve_attention(
    text: str, vision: str = "auto", *, device: torch.device, four_d_mask: bool, training: bool = False
) -> tuple[str, str]:
    """``(language model, vision tower)`` implementations for a run on ``device``; ``four_d_mask`` when the
    language model must take a mask that is more than padding (stage 1's bottleneck, split layers, bidirectional
    C); ``training`` when gradients flow through it. Raises ValueError for unknown values and ones that cannot run
    here."""
    if text not in TEXT_CHOICES:
        raise ValueError(f"unknown attn_implementation {text!r}; choose one of {', '.join(TEXT_CHOICES)}")
    if vision not in VISION_CHOICES:
        raise ValueError(
            f"unknown vision_attn_implementation {vision!r}; choose one of {', '.join(VISION_CHOICES)} "
            "(the vision tower attends per image through cu_seqlens, which FlexAttention would ignore)"
        )
    cuda = torch.device(device).type == "cuda"
    padding_only = "flash_attention_2" if cuda and flash_attn_installed() else "sdpa"
    if text == "auto":
        if four_d_mask:
            text = "flex_attention" if cuda and flex_attention_available() else "sdpa"
        else:
            text = padding_only
    if vision == "auto":
        vision = "flash_attention_2" if padding_only == "flash_attention_2" else PACKED_SDPA
    if four_d_mask and text == "flash_attention_2":
        raise ValueError(
            "attn_implementation flash_attention_2 takes only padding masks, and this stage-1 run needs a 4-D "
            "attention mask (mask_mode bottleneck or split_layer, or bidirectional_c): use auto, flex_attention, "
            "sdpa or eager, or mask_mode none"
        )
    for field, value in (("attn_implementation", text), ("vision_attn_implementation", vision)):
        if value == "flash_attention_2" and not (cuda and flash_attn_installed()):
            raise ValueError(f"{field} flash_attention_2 needs a CUDA device and the flash-attn package")
    if text == "flex_attention" and not flex_attention_available():
        raise ValueError(
            "attn_implementation flex_attention needs torch.nn.attention.flex_attention (torch >= 2.5)"
        )
    if text == "flex_attention" and training and not cuda:
        raise ValueError("attn_implementation flex_attention has no backward pass on CPU (torch): use sdpa")
    return text, vision


def transformers_attn_implementation(text: str, vision: str) -> dict[str, str]:
    """The ``attn_implementation`` argument of :func:`coma.backbones.load_backbone`: one implementation per
    sub-config (``packed_sdpa`` loads as SDPA and is swapped in after loading)."""
    if text == "flex_attention":
        register_block_sparse()
        text = BLOCK_SPARSE
    return {"": text, "text_config": text, "vision_config": vision}


def load_with_attention(
    load: Callable[[str | dict[str, str]], torch.nn.Module],
    attn_implementation: str | dict[str, str],
    vision_tower: Callable[[torch.nn.Module], torch.nn.Module],
) -> torch.nn.Module:
    """``load(attn_implementation)`` (``from_pretrained`` or ``_from_config``), loading a ``packed_sdpa`` vision
    tower as SDPA and then switching it to :func:`packed_varlen_attention` (``vision_tower`` finds it)."""
    packed = isinstance(attn_implementation, dict) and attn_implementation.get("vision_config") == PACKED_SDPA
    model = load({**attn_implementation, "vision_config": "sdpa"} if packed else attn_implementation)
    if packed:
        use_packed_vision_attention(vision_tower(model))
    return model


def use_packed_vision_attention(vision_tower: torch.nn.Module) -> None:
    """Make a loaded Qwen-VL vision tower run :func:`packed_varlen_attention`."""
    register_packed_vision()
    configs = {
        id(module.config): module.config for module in vision_tower.modules() if hasattr(module, "config")
    }
    for config in configs.values():
        config._attn_implementation = PACKED_VISION


def packed_varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    cu_seq_lens_q: torch.Tensor,
    scaling: float | None = None,
    **_: object,
) -> tuple[torch.Tensor, None]:
    """Bidirectional attention within each segment of a packed sequence, one SDPA call per distinct segment length.

    ``query``/``key``/``value`` are ``(1, heads, total, head_dim)`` with segment boundaries ``cu_seq_lens_q``
    (the same for keys); returns ``((1, total, heads, head_dim), None)`` as transformers' attention functions do.
    """
    if attention_mask is not None:
        raise ValueError("packed_sdpa attends within cu_seqlens segments and takes no attention mask")
    bounds = cu_seq_lens_q.tolist()
    by_length: dict[int, list[int]] = {}
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end > start:
            by_length.setdefault(end - start, []).append(start)
    if len(by_length) == 1:
        ((length, starts),) = by_length.items()
        if starts == list(range(0, query.shape[2], length)):  # equal segments tiling the sequence: a view
            q, k, v = (
                tensor[0].unflatten(1, (len(starts), length)).transpose(0, 1)
                for tensor in (query, key, value)
            )
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling)
            return out.permute(0, 2, 1, 3).reshape(1, -1, *out.shape[1:2], out.shape[-1]), None
    outputs, positions = [], []
    for length, starts in by_length.items():
        index = torch.tensor(starts, device=query.device)[:, None] + torch.arange(length, device=query.device)
        flat = index.reshape(-1)
        # (1, heads, n*length, d) -> (n, heads, length, d)
        q, k, v = (
            tensor[0, :, flat].unflatten(1, index.shape).transpose(0, 1) for tensor in (query, key, value)
        )
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling)
        outputs.append(out.permute(0, 2, 1, 3).reshape(-1, *out.shape[1:2], out.shape[-1]))
        positions.append(flat)
    order = torch.cat(positions)
    packed = torch.cat(outputs)[torch.argsort(order)] if len(outputs) > 1 else outputs[0]
    return packed.unsqueeze(0), None


@functools.cache
def register_packed_vision() -> None:
    """Make :data:`PACKED_VISION` a transformers attention implementation (once per process)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_VISION, packed_varlen_attention)


@functools.cache
def register_block_sparse() -> None:
    """Make :data:`BLOCK_SPARSE` a transformers attention implementation: its FlexAttention forward, and its
    FlexAttention mask builder for calls that pass only a padding mask."""
    from transformers import AttentionInterface
    from transformers.integrations.flex_attention import flex_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, flex_attention_mask

    AttentionInterface.register(BLOCK_SPARSE, flex_attention_forward)
    AttentionMaskInterface.register(BLOCK_SPARSE, flex_attention_mask)
