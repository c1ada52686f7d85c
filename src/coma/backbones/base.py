"""What a backbone family must provide. Everything version-sensitive lives behind this interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


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

    def load_processor(self, name_or_path: str, **kwargs: Any) -> Any:
        raise NotImplementedError

    def position_ids(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def hidden_states(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last-layer hidden states (B, L, D); ``attention_mask`` may be a 4-D additive mask."""
        raise NotImplementedError

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def vision_tower(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError
