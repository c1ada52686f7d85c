"""What trains: LoRA/DoRA on the language model plus the compression-token rows, or the full LM.

The vision tower and merger stay frozen in both modes.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from coma.backbones.base import BackboneAdapter
from coma.train.config import LoraSettings


def make_trainable(
    backbone: nn.Module,
    adapter: BackboneAdapter,
    token_ids: list[int],
    lora: LoraSettings,
    *,
    train_lm_head: bool = True,
) -> nn.Module:
    """Freeze the backbone, then open LoRA (or the whole LM) and the compression rows to training.

    ``train_lm_head=False`` (stage 2, which never computes logits) keeps an untied LM head frozen under full
    fine-tuning: a trainable parameter without a gradient stops DDP. A tied head is the input embedding and trains.
    """
    backbone.requires_grad_(False)
    if lora.full_finetune:
        language_model = adapter.decoder_layers(backbone)
        language_model.requires_grad_(True)
        backbone.get_input_embeddings().requires_grad_(True)
        output = backbone.get_output_embeddings()
        if output is not None and train_lm_head:
            output.requires_grad_(True)
        for name, parameter in backbone.named_parameters():
            if "language_model" in name and "norm" in name:
                parameter.requires_grad_(True)
        adapter.vision_tower(backbone).requires_grad_(lora.train_vision)
        return backbone
    if lora.train_vision:
        raise ValueError("train_vision needs full_finetune (LoRA targets the language model only)")
    config = LoraConfig(
        target_modules=adapter.lora_target_regex,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        use_dora=lora.dora,
        init_lora_weights=lora.init if lora.init != "default" else True,
        trainable_token_indices={"embed_tokens": list(token_ids)},
    )
    return get_peft_model(backbone, config)


def merged_backbone(model: nn.Module) -> nn.Module:
    """A plain transformers model with the adapter and the trained token rows folded into the weights."""
    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: parameter.detach().cpu().contiguous()
        for name, parameter in module.named_parameters()
        if parameter.requires_grad
    }


def load_trainable_state(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    parameters = dict(module.named_parameters())
    expected = {name for name, parameter in parameters.items() if parameter.requires_grad}
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"{source}: trainable parameters differ (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            parameters[name].copy_(tensor)
