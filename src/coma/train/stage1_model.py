"""Stage-1 forward and loss: the backbone's LM under the compression bottleneck (DESIGN §2.2).

``Stage1Objective(backbone, adapter)(batch)`` takes a :class:`coma.train.stage1_data.Stage1Collator` batch, builds
the 4-D additive attention mask once (in the model's dtype), computes M-RoPE position ids from the 2-D padding
mask, runs the ``…ForConditionalGeneration`` model and returns the shifted token cross-entropy over the supervised
tokens. Logits are computed (and upcast to fp32) only at positions whose next token is supervised.

``mask_mode="split_layer"`` reproduces the released code's layer-split variant: decoder layers below
``split_layer`` get the lower mask, the others the upper one. The swap is done by forward pre-hooks on the decoder
layers that replace their ``attention_mask`` keyword. They stay installed, and keep the last batch's masks, until
the next forward: transformers 5.24 checkpoints a layer's ``forward`` (the hooks run once, outside), but earlier 5.x
releases checkpoint its whole ``__call__``, so backward's recompute runs the hooks again after forward has returned.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coma.backbones.attention import BLOCK_SPARSE
from coma.backbones.base import BackboneAdapter
from coma.masks import (
    compression_attention_mask,
    compression_block_mask,
    per_layer_masks,
    split_layer_block_masks,
    split_layer_masks,
)
from coma.train.stage1_data import IGNORE_INDEX

__all__ = [
    "MASK_MODES",
    "REDUCTIONS",
    "Stage1Objective",
    "LayerMaskSwap",
    "Stage1Output",
    "next_token_targets",
]

MASK_MODES = ("bottleneck", "none", "split_layer")
REDUCTIONS = ("mean", "sum", "sample_sum")
_MODEL_INPUTS = ("input_ids", "pixel_values", "image_grid_thw", "mm_token_type_ids")


@dataclass
class Stage1Output:
    """``loss`` (see the objective's ``reduction``), and the micro-batch's counts: supervised tokens, samples with
    at least one supervised token, all real tokens."""

    loss: Tensor
    supervised_tokens: int
    total_tokens: int
    supervised_samples: int = 0


def _swap_attention_mask(mask: Tensor, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if "attention_mask" not in kwargs:
        # A transformers release that passes the mask positionally would silently bypass the split.
        raise RuntimeError(
            f"{type(module).__name__} was called without an attention_mask keyword; the split-layer masks "
            "cannot be applied with this transformers version"
        )
    return args, {**kwargs, "attention_mask": mask}


class LayerMaskSwap:
    """Forward pre-hooks that give decoder layer ``i`` the mask ``masks[i]`` inside :meth:`applying`.

    After the block, a layer is still given its mask when it is called again with the very mask object it received
    inside: that is backward's recompute under gradient checkpointing, which replays the layer with the keywords of
    its first call. Any other call (another batch, another objective on the same model) keeps its own mask.
    """

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.masks: Sequence[Tensor] = ()
        self.received: list[Any] = [None] * len(layers)
        self.active = False
        for index, layer in enumerate(layers):
            layer.register_forward_pre_hook(partial(self._swap, index), with_kwargs=True)

    @contextlib.contextmanager
    def applying(self, masks: Sequence[Tensor]) -> Iterator[None]:
        if len(masks) != len(self.received):
            raise ValueError(f"{len(self.received)} decoder layers but {len(masks)} masks")
        self.masks, self.received, self.active = masks, [None] * len(masks), True
        try:
            yield
        finally:
            self.active = False

    def _swap(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        incoming = kwargs.get("attention_mask")
        if self.active:
            self.received[index] = incoming
        elif incoming is None or incoming is not self.received[index]:
            return None
        return _swap_attention_mask(self.masks[index], module, args, kwargs)


def next_token_targets(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Position i predicts token i + 1: the (B, L) mask of positions whose next token is supervised, and those
    tokens in row-major order."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep, labels[:, 1:][keep[:, :-1]]


def _compute_dtype(backbone: nn.Module) -> torch.dtype:
    """The dtype the language model computes in: autocast's, else that of its input embeddings (LoRA weights may
    be fp32)."""
    embeddings = backbone.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    if not isinstance(weight, Tensor):
        weight = next(p for p in embeddings.parameters() if p.is_floating_point())
    if torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype


class Stage1Objective(nn.Module):
    """Shifted token cross-entropy of the dialogue under the stage-1 attention mask.

    ``backbone`` is the (possibly peft-wrapped) ``…ForConditionalGeneration`` model, ``adapter`` its family adapter.
    ``mask_mode``: ``"bottleneck"`` (dialogue never sees image/prompt tokens, at every layer), ``"none"`` (plain
    causal, as the released code runs) or ``"split_layer"`` with ``split_layer=k`` (1 <= k < number of layers).
    ``bidirectional_c`` lets the compression tokens see each other both ways (not with ``split_layer``).
    ``reduction="mean"`` divides by the supervised tokens of the micro-batch; ``"sum"`` leaves that to the caller
    (for a token-weighted mean across gradient-accumulation steps and ranks); ``"sample_sum"`` sums each sample's
    token mean (the caller divides by the samples of the global batch).

    The mask follows the language model's attention implementation: a FlexAttention ``BlockMask`` under
    :data:`coma.backbones.attention.BLOCK_SPARSE`, only the 2-D padding mask when it is plain causal (``none``
    without ``bidirectional_c``: flash-attn can run it), else the dense additive 4-D mask.
    """

    def __init__(
        self,
        backbone: nn.Module,
        adapter: BackboneAdapter,
        *,
        mask_mode: str = "bottleneck",
        split_layer: int | None = None,
        bidirectional_c: bool = False,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if mask_mode == "split_layer":
            if split_layer is None:
                raise ValueError("mask_mode='split_layer' needs split_layer=k")
            if bidirectional_c:
                raise ValueError("bidirectional_c is not available with mask_mode='split_layer'")
            num_layers = len(adapter.decoder_layers(backbone))
            if not 0 < split_layer < num_layers:
                raise ValueError(
                    f"split_layer must be in [1, {num_layers - 1}] for {num_layers} layers, got {split_layer}"
                )
        elif split_layer is not None:
            raise ValueError(f"split_layer={split_layer} is only used with mask_mode='split_layer'")
        self.backbone = backbone
        self.adapter = adapter
        self.mask_mode = mask_mode
        self.split_layer = split_layer
        self.bidirectional_c = bidirectional_c
        self.reduction = reduction
        self.layer_mask_swap = (
            LayerMaskSwap(adapter.decoder_layers(backbone)) if mask_mode == "split_layer" else None
        )

    @property
    def block_sparse(self) -> bool:
        """Whether the language model runs FlexAttention (and so takes ``BlockMask``s)."""
        attention = self.adapter.decoder_layers(self.backbone)[0].self_attn
        return attention.config._attn_implementation == BLOCK_SPARSE

    def attention_masks(self, batch: dict[str, Any]) -> list[Any] | Any:
        """The batch's mask (see the class), or one per decoder layer (shared objects) for ``split_layer``."""
        padding = batch["attention_mask"]
        block_sparse = self.block_sparse
        if self.mask_mode == "none" and not self.bidirectional_c and not block_sparse:
            return padding
        dtype = _compute_dtype(self.backbone)
        if self.mask_mode == "split_layer":
            positions = (padding, batch["c_start"], batch["c_end"], batch["answer_start"])
            if block_sparse:
                lower, upper = split_layer_block_masks(*positions)
            else:
                lower, upper = split_layer_masks(*positions, dtype=dtype)
            layers = self.adapter.decoder_layers(self.backbone)
            return per_layer_masks(len(layers), self.split_layer, lower, upper)
        if block_sparse:
            return compression_block_mask(
                padding,
                batch["c_start"],
                batch["c_end"],
                mode=self.mask_mode,
                bidirectional_c=self.bidirectional_c,
            )
        return compression_attention_mask(
            padding,
            batch["c_start"],
            batch["c_end"],
            mode=self.mask_mode,
            bidirectional_c=self.bidirectional_c,
            dtype=dtype,
        )

    @contextlib.contextmanager
    def _masked(self, batch: dict[str, Any]) -> Iterator[tuple[Tensor, Tensor]]:
        """Install this objective's masks; yields the model-level mask and the position ids."""
        masks = self.attention_masks(batch)
        # M-RoPE ids from the 2-D padding mask: a 4-D mask gives the model nothing to compute them from.
        position_ids = batch.get("position_ids")
        if position_ids is None:
            position_ids = self.adapter.position_ids(self.backbone, batch)
        if isinstance(masks, list):
            with self.layer_mask_swap.applying(masks):
                yield masks[0], position_ids
        else:
            yield masks, position_ids

    def backbone_outputs(self, batch: dict[str, Any], **kwargs: Any) -> Any:
        """Run the backbone on the batch under this objective's masks; ``kwargs`` go to its forward."""
        inputs = {key: batch[key] for key in _MODEL_INPUTS if batch.get(key) is not None}
        with self._masked(batch) as (model_mask, position_ids):
            return self.backbone(
                **inputs, attention_mask=model_mask, position_ids=position_ids, use_cache=False, **kwargs
            )

    def last_hidden_states(self, batch: dict[str, Any]) -> Tensor:
        with self._masked(batch) as (model_mask, position_ids):
            return self.adapter.hidden_states(
                self.backbone, {**batch, "position_ids": position_ids}, model_mask
            )

    def forward(self, batch: dict[str, Any]) -> Stage1Output:
        total = int(batch["attention_mask"].sum())
        keep, targets = next_token_targets(batch["labels"])
        supervised = targets.numel()
        if supervised == 0:
            return Stage1Output(self._zero_loss(), 0, total)
        # The LM head runs only where the next token is supervised (a boolean logits_to_keep is not in every
        # transformers 5.x release, so the head is applied here).
        hidden = self.last_hidden_states(batch)[keep]
        logits = self.backbone.get_output_embeddings()(hidden)
        token_losses = F.cross_entropy(logits.float(), targets, reduction="none")
        per_sample = keep.sum(dim=1)
        samples = int((per_sample > 0).sum())
        if self.reduction == "sample_sum":
            sample_of_token = torch.repeat_interleave(
                torch.arange(len(per_sample), device=keep.device), per_sample
            )
            sums = torch.zeros(len(per_sample), device=keep.device).index_add(
                0, sample_of_token, token_losses
            )
            loss = (sums / per_sample.clamp(min=1)).sum()
        else:
            loss = token_losses.sum()
            if self.reduction == "mean":
                loss = loss / supervised
        return Stage1Output(loss, supervised, total, samples)

    def _zero_loss(self) -> Tensor:
        """A zero loss that still reaches every trainable parameter, so DDP's gradient hooks fire on every rank."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        if not trainable:
            return torch.zeros((), device=next(self.parameters()).device)
        return sum((p.sum() * 0.0).float() for p in trainable)
