"""What a backbone family must provide. Everything version-sensitive lives behind this interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class VisionCache:
    """The vision tower's output for one batch: filled by the first forward that receives it, reused by later forwards
    of the same batch (GradCache's replay) instead of running a *frozen* tower again. Use one per batch."""

    __slots__ = ("features",)

    def __init__(self) -> None:
        self.features: Any = None


@dataclass(frozen=True)
class BackboneAdapter:
    """Glue between coma and one family of transformers VLMs.

    Subclasses own model and processor loading, the image block that replaces ``<|image_1|>``, position ids and
    which modules LoRA targets. The rest of coma only talks to models through these methods.
    """

    family: str
    model_type: str
    image_block: str
    lora_target_regex: str

    def load_model(self, name_or_path: str, **kwargs: Any) -> nn.Module:
        raise NotImplementedError

    @property
    def published_processor_class(self) -> str:
        """The transformers processor class that ``AutoProcessor`` (sentence-transformers, vLLM) should load."""
        raise NotImplementedError

    def load_processor(self, name_or_path: str, **kwargs: Any) -> Any:
        raise NotImplementedError

    def position_ids(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def hidden_states(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        vision_cache: VisionCache | None = None,
    ) -> torch.Tensor:
        """Last-layer hidden states (B, L, D); ``attention_mask`` may be a 4-D additive mask.

        With ``vision_cache`` the image features are computed once without grad and reused from the cache afterwards:
        only for a frozen vision tower, whose output does not depend on the grad mode.
        """
        raise NotImplementedError

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def vision_tower(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def vision_blocks(self, model: nn.Module) -> nn.ModuleList:
        """The vision tower's transformer blocks (FSDP shards them one by one)."""
        raise NotImplementedError

    def visual_tokens(self, processor: Any, width: int, height: int) -> int:
        """How many tokens a width × height image becomes in the language model, at the processor's pixel bounds."""
        raise NotImplementedError

    def enable_activation_checkpointing(self, model: nn.Module) -> None:
        """Non-reentrant activation checkpointing of every decoder layer of ``model`` (a transformers model).

        transformers 5.24 renamed ``gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)`` to
        ``activation_checkpointing_enable(activation_checkpointing_kwargs=...)`` and deprecated the old name; the
        model's class says which one this release has. Non-reentrant, because it gives gradients to the weights
        inside a layer even when the layer's inputs do not require grad (the reentrant variant gives them none).
        """
        kwargs = {"use_reentrant": False}
        if hasattr(type(model), "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        off = [i for i, layer in enumerate(self.decoder_layers(model)) if not layer.gradient_checkpointing]
        if off:
            # A release that stops honouring the call would otherwise silently train without checkpointing.
            raise RuntimeError(
                f"activation checkpointing did not reach decoder layers {off} of {type(model).__name__}"
            )
