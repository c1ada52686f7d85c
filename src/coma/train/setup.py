"""Model set-up both stages share: load through ``Embedder`` (one code path for tiny and real models),
open the trainable parts, and write the merged result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from coma.backbones.attention import resolve_attention
from coma.data.pipeline import SampledBatches
from coma.data.sampling import BlockMixtureSampler
from coma.embedder import Embedder
from coma.train.config import LoraSettings, TrainSettings
from coma.train.loop import DistInfo, resolve_dtype
from coma.train.trainable import make_trainable, merged_backbone


def load_trainable_embedder(
    config: Any,
    dist_info: DistInfo,
    *,
    pooling: str | None = None,
    generative: bool = False,
    four_d_mask: bool = False,
) -> Embedder:
    """An Embedder whose backbone is wrapped for training (LoRA/DoRA + compression rows, or the full LM).

    ``config`` is a stage config: it names the model, the token count, the pixel bounds and its ``train`` and
    ``lora`` sections. ``generative`` (stage 1) trains an untied LM head under full fine-tuning; ``four_d_mask``
    says the language model takes a 4-D attention mask (checked against ``attn_implementation``).
    """
    settings: TrainSettings = config.train
    lora: LoraSettings = config.lora
    text, vision = resolve_attention(
        settings.attn_implementation,
        settings.vision_attn_implementation,
        device=dist_info.device,
        four_d_mask=four_d_mask,
        training=True,
    )
    embedder = Embedder.from_pretrained(
        config.model,
        num_tokens=config.num_tokens,
        pooling=pooling,
        min_pixels=config.min_pixels,
        max_pixels=config.max_pixels,
        device=dist_info.device,
        dtype=resolve_dtype(settings.dtype, dist_info.device),
        attn_implementation=text,
        vision_attn_implementation=vision,
    )
    backbone = embedder.model.backbone
    if settings.gradient_checkpointing:
        embedder.adapter.enable_activation_checkpointing(backbone)
    embedder.model.backbone = make_trainable(
        backbone, embedder.adapter, embedder.model.token_ids.tolist(), lora, train_lm_head=generative
    )
    return embedder


def save_merged(embedder: Embedder, out_dir: str | Path) -> Path:
    """Fold the adapter and trained token rows into the weights and save a plain, loadable model folder."""
    embedder.model.backbone = merged_backbone(embedder.model.backbone)
    embedder.model.backbone.requires_grad_(False)
    # Trained weights were fp32 master copies; the saved model keeps the dtype it was loaded in.
    dtype = embedder.model.backbone.config.dtype
    if isinstance(dtype, torch.dtype):
        embedder.model.backbone.to(dtype)
    return embedder.save_pretrained(out_dir)


class StageTask:
    """What both stage tasks share: data position = the sampler's state after the last consumed step (batches
    prepared ahead do not count); the result = the merged model."""

    embedder: Embedder
    sampler: BlockMixtureSampler
    batches: SampledBatches

    def data_state(self) -> dict:
        return self.batches.state_dict()

    def load_data_state(self, state: dict) -> None:
        self.batches.load_state_dict(state)

    def finish(self, out_dir: Path) -> Path:
        return save_merged(self.embedder, out_dir)

    def finish_from_checkpoint(self, checkpoint: Path, out_dir: Path) -> Path:
        from coma.train.run import merge_checkpoint

        return merge_checkpoint(checkpoint, out_dir)

    def shard_units(self) -> list[nn.Module]:
        backbone, adapter = self.embedder.model.backbone, self.embedder.adapter
        return [*adapter.vision_blocks(backbone), *adapter.decoder_layers(backbone)]


def count_parameters(module: nn.Module) -> tuple[int, int]:
    total = sum(parameter.numel() for parameter in module.parameters())
    trainable = sum(parameter.numel() for parameter in module.parameters() if parameter.requires_grad)
    return trainable, total
