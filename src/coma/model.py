"""The embedding model: a transformers VLM, the compression tokens and a pooler, as one ``nn.Module``."""

from __future__ import annotations

import torch
from torch import nn

from coma.backbones.base import BackboneAdapter, VisionCache
from coma.config import ComaConfig
from coma.pooling import Pooler, compression_states


class EmbeddingModel(nn.Module):
    """``forward(batch) -> (B, D)`` embeddings from the last-layer states at the compression positions."""

    def __init__(
        self, backbone: nn.Module, adapter: BackboneAdapter, config: ComaConfig, token_ids: list[int]
    ):
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter
        self.config = config
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long), persistent=False)
        self.pooler = Pooler(config, self.hidden_size)

    @property
    def hidden_size(self) -> int:
        return self.backbone.get_input_embeddings().embedding_dim

    def forward(
        self, batch: dict[str, torch.Tensor], vision_cache: VisionCache | None = None
    ) -> torch.Tensor:
        """``vision_cache``: reuse a frozen vision tower's output across forwards of one batch (GradCache's replay)."""
        hidden = self.adapter.hidden_states(self.backbone, batch, vision_cache=vision_cache)
        states = compression_states(hidden, batch["input_ids"], self.token_ids)
        return self.pooler(states.float())
