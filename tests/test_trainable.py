"""What trains: LoRA/DoRA + compression rows (ViT frozen), or the full LM; merging folds both into the weights."""

from __future__ import annotations

import torch

from coma import Embedder
from coma.train.config import LoraSettings
from coma.train.trainable import make_trainable, merged_backbone


def _train_one_step(model, batch):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(batch).sum().backward()
    optimizer.step()


def test_lora_trains_the_compression_rows_and_nothing_else_of_the_embedding(tiny_model_dir):
    from helpers import random_image

    from coma.embedder import EncodeInput

    embedder = Embedder.from_pretrained(tiny_model_dir, num_tokens=4)
    token_ids = embedder.model.token_ids.tolist()
    before = embedder.model.backbone.get_input_embeddings().weight.detach().clone()
    vision_before = [
        p.detach().clone() for p in embedder.adapter.vision_tower(embedder.model.backbone).parameters()
    ]
    embedder.model.backbone = make_trainable(
        embedder.model.backbone, embedder.adapter, token_ids, LoraSettings(r=4)
    )
    trainable = [name for name, p in embedder.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or "trainable_tokens" in name for name in trainable)
    batch = embedder.collate([EncodeInput("a red circle", random_image(0)), EncodeInput("two squares")])
    embedder.model.train()
    _train_one_step(embedder.model, batch)

    merged = merged_backbone(embedder.model.backbone)
    after = merged.get_input_embeddings().weight.detach()
    changed = (after != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == token_ids, "only the compression rows of the embedding may change"
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight, (
        "tying survives merging"
    )
    vision_after = list(embedder.adapter.vision_tower(merged).parameters())
    assert all(torch.equal(a, b) for a, b in zip(vision_before, vision_after, strict=True)), (
        "the ViT stays frozen"
    )


def test_full_finetune_opens_the_language_model_but_not_the_vision_tower(tiny_model_dir):
    embedder = Embedder.from_pretrained(tiny_model_dir, num_tokens=4)
    model = make_trainable(embedder.model.backbone, embedder.adapter, embedder.model.token_ids.tolist(),
                           LoraSettings(full_finetune=True))  # fmt: skip
    vision = {id(p) for p in embedder.adapter.vision_tower(model).parameters()}
    for parameter in model.parameters():
        assert parameter.requires_grad == (id(parameter) not in vision)
