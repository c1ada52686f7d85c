"""Attention backends: per-stage validation, the vision tower's own implementation, padding-only masks where the mask
is plain causal, and the block-sparse (FlexAttention) stage-1 masks equal to the dense ones."""

from __future__ import annotations

import pytest
import torch
from helpers import FAMILIES, random_image
from test_stage1_bottleneck import CONFIG, make_batch

import coma.backbones.attention as attention
from coma import Embedder
from coma.backbones import load_backbone
from coma.backbones.attention import (
    BLOCK_SPARSE,
    PACKED_SDPA,
    PACKED_VISION,
    packed_varlen_attention,
    resolve_attention,
    transformers_attn_implementation,
)
from coma.compression import add_compression_tokens
from coma.masks import (
    allowed_from_additive,
    compression_attention_mask,
    compression_block_mask,
    split_layer_block_masks,
    split_layer_masks,
)
from coma.train.stage1_model import Stage1Objective

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_on_cpu_is_sdpa_for_every_stage():
    assert resolve_attention("auto", device=CPU, four_d_mask=False) == ("sdpa", PACKED_SDPA)
    assert resolve_attention("auto", device=CPU, four_d_mask=True) == ("sdpa", PACKED_SDPA)


@pytest.mark.parametrize("flash", [True, False])
def test_auto_on_gpu(monkeypatch, flash):
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: flash)
    padding_only = "flash_attention_2" if flash else "sdpa"
    vision = "flash_attention_2" if flash else PACKED_SDPA
    assert resolve_attention("auto", device=CUDA, four_d_mask=False) == (padding_only, vision)
    assert resolve_attention("auto", device=CUDA, four_d_mask=True) == ("flex_attention", vision)
    assert resolve_attention("sdpa", "eager", device=CUDA, four_d_mask=True) == ("sdpa", "eager")


def test_unknown_or_impossible_implementations_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown attn_implementation 'flash'"):
        resolve_attention("flash", device=CPU, four_d_mask=False)
    with pytest.raises(ValueError, match="unknown vision_attn_implementation 'flex_attention'"):
        resolve_attention("sdpa", "flex_attention", device=CPU, four_d_mask=False)
    with pytest.raises(ValueError, match="needs a CUDA device and the flash-attn package"):
        resolve_attention("flash_attention_2", device=CPU, four_d_mask=False)
    with pytest.raises(ValueError, match="no backward pass on CPU"):
        resolve_attention("flex_attention", device=CPU, four_d_mask=True, training=True)
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: True)
    with pytest.raises(ValueError, match="takes only padding masks"):
        resolve_attention("flash_attention_2", device=CUDA, four_d_mask=True)


def test_stage1_refuses_flash_attention_before_loading(tiny_model_dir, monkeypatch, tmp_path):
    from coma.train.compress import CompressConfig, CompressTask
    from coma.train.loop import DistInfo

    monkeypatch.setattr(attention, "flash_attn_installed", lambda: True)
    config = CompressConfig(model=str(tiny_model_dir), data=["x.jsonl"], out=str(tmp_path))
    config.train.attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="takes only padding masks"):
        CompressTask(config, DistInfo(device=CUDA), with_data=False)


def test_the_vision_tower_has_its_own_implementation(tiny_model_dir):
    embedder = Embedder.from_pretrained(
        tiny_model_dir, num_tokens=4, attn_implementation="eager", vision_attn_implementation="sdpa"
    )
    backbone, adapter = embedder.model.backbone, embedder.adapter
    assert adapter.decoder_layers(backbone)[0].self_attn.config._attn_implementation == "eager"
    assert adapter.vision_blocks(backbone)[0].attn.config._attn_implementation == "sdpa"


def test_packed_attention_equals_attention_per_segment():
    """Segments of several lengths, out of order, and an empty one: each attends only within itself."""
    torch.manual_seed(0)
    lengths = [5, 3, 5, 0, 7, 3]
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    query, key, value = (torch.randn(1, 2, sum(lengths), 4, dtype=torch.float64) for _ in range(3))
    packed, _ = packed_varlen_attention(None, query, key, value, None, cu_seq_lens_q=bounds, scaling=0.3)
    expected = torch.cat([
        torch.nn.functional.scaled_dot_product_attention(
            query[..., start:end, :], key[..., start:end, :], value[..., start:end, :], scale=0.3
        ).transpose(1, 2)
        for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)
        if end > start
    ], dim=1)  # fmt: skip
    assert packed.shape == (1, sum(lengths), 2, 4)
    torch.testing.assert_close(packed, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_vision_tower_equals_transformers_sdpa(tiny_model_dirs, family, monkeypatch):
    """The whole vision tower, packed_sdpa against transformers' per-segment SDPA loop: outputs and input gradients
    (fp32, 1e-5), on images whose sizes give Qwen2.5-VL windows of several lengths; one call per layer."""
    images = [random_image(0), random_image(1, (168, 84)), random_image(2, (140, 196))]
    results, calls = [], []
    for vision in ("sdpa", PACKED_SDPA):
        model, processor, adapter = load_backbone(
            tiny_model_dirs[family], attn_implementation=transformers_attn_implementation("sdpa", vision)
        )
        tower = adapter.vision_tower(model)
        if vision == PACKED_SDPA:
            assert {block.attn.config._attn_implementation for block in tower.blocks} == {PACKED_VISION}
            from transformers import AttentionInterface

            def counting(*args, **kwargs):
                calls.append(kwargs["cu_seq_lens_q"].diff().tolist())
                return packed_varlen_attention(*args, **kwargs)

            monkeypatch.setitem(AttentionInterface._global_mapping, PACKED_VISION, counting)
        batch = processor.image_processor(images=images, return_tensors="pt")
        pixels = batch["pixel_values"].requires_grad_(True)
        output = tower(pixels, grid_thw=batch["image_grid_thw"]).pooler_output
        output.square().sum().backward()
        results.append((output.detach(), pixels.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-5)
    assert len(calls) == len(tower.blocks)
    if family == "qwen2_5_vl":  # windowed blocks: many segments of unequal lengths in one call
        assert max(len(set(lengths)) for lengths in calls) > 1
        assert max(len(lengths) for lengths in calls) > len(images)


def test_plain_causal_stage1_passes_only_the_padding_mask(tiny_model_dir):
    model, processor, adapter = load_backbone(tiny_model_dir)
    add_compression_tokens(model, processor.tokenizer, CONFIG)
    batch = make_batch(processor, [random_image(0)], text_only=True)
    assert Stage1Objective(model, adapter, mask_mode="none").attention_masks(batch) is batch["attention_mask"]
    assert Stage1Objective(model, adapter, mask_mode="bottleneck").attention_masks(batch).dim() == 4


def _grid_allowed(block_mask, batch: int, length: int) -> torch.Tensor:
    """Evaluate a BlockMask's rule at every (b, q, kv): what FlexAttention computes inside unskipped blocks."""
    b = torch.arange(batch).view(batch, 1, 1)
    q, kv = torch.arange(length).view(1, length, 1), torch.arange(length).view(1, 1, length)
    return block_mask.mask_mod(b, torch.zeros(()), q, kv).expand(batch, length, length)


def _skipped_blocks_are_blocked(block_mask, allowed: torch.Tensor) -> None:
    dense_blocks = block_mask.to_dense()[
        :, 0
    ].bool()  # (B, Lq / block, Lk / block): blocks FlexAttention visits
    size = block_mask.BLOCK_SIZE[0]
    for b, qb, kb in (~dense_blocks).nonzero().tolist():
        assert not allowed[b, qb * size : (qb + 1) * size, kb * size : (kb + 1) * size].any()


@pytest.mark.parametrize("mode,bidirectional", [("bottleneck", False), ("bottleneck", True), ("none", True)])
def test_block_mask_has_the_dense_rules(mode, bidirectional):
    padding = torch.tensor([[1] * 40, [0] * 7 + [1] * 33, [1] * 25 + [0] * 15])
    c_start, c_end = torch.tensor([10, 17, 5]), torch.tensor([14, 21, 9])
    dense = compression_attention_mask(padding, c_start, c_end, mode=mode, bidirectional_c=bidirectional)
    block = compression_block_mask(
        padding, c_start, c_end, mode=mode, bidirectional_c=bidirectional, block_size=8
    )
    allowed = allowed_from_additive(dense)[:, 0]
    assert torch.equal(_grid_allowed(block, 3, 40), allowed)
    _skipped_blocks_are_blocked(block, allowed)
    if mode == "bottleneck":
        assert block.to_dense().sum() < block.to_dense().numel(), "the bottleneck skips whole blocks"


def test_split_layer_block_masks_have_the_dense_rules():
    padding = torch.tensor([[1] * 32, [0] * 5 + [1] * 27])
    positions = torch.tensor([8, 13]), torch.tensor([12, 17]), torch.tensor([20, 24])
    blocks = split_layer_block_masks(padding, *positions, block_size=8)
    for dense, block in zip(split_layer_masks(padding, *positions), blocks, strict=True):
        allowed = allowed_from_additive(dense)[:, 0]
        assert torch.equal(_grid_allowed(block, 2, 32), allowed)
        _skipped_blocks_are_blocked(block, allowed)


@pytest.fixture
def uncompiled_flex(monkeypatch):
    """transformers compiles FlexAttention on first use (~40 s of inductor on this CPU); the uncompiled kernel
    computes the same, so the equality below holds for what runs on GPU."""
    import transformers.integrations.flex_attention as hf_flex
    from torch.nn.attention.flex_attention import flex_attention

    def uncompiled(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", uncompiled)


def _loss_and_grads(folder, text: str, mode: str, device: torch.device, grads: bool) -> tuple[float, dict]:
    implementation = transformers_attn_implementation(text, "sdpa")
    model, processor, adapter = load_backbone(folder, attn_implementation=implementation)
    add_compression_tokens(model, processor.tokenizer, CONFIG)
    model.to(device)
    batch = make_batch(processor, [random_image(6), random_image(7, (84, 56))], text_only=True)
    batch = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
    split = 1 if mode == "split_layer" else None
    objective = Stage1Objective(model, adapter, mask_mode=mode, split_layer=split)
    assert objective.block_sparse == (text == "flex_attention")
    with torch.set_grad_enabled(grads):
        loss = objective(batch).loss
    if not grads:
        return float(loss), {}
    loss.backward()
    layers = adapter.decoder_layers(model)
    return float(loss), {name: p.grad.cpu() for name, p in layers.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["bottleneck", "split_layer"])
def test_block_sparse_path_equals_the_dense_mask(tiny_model_dirs, uncompiled_flex, family, mode):
    """Forward only: FlexAttention has no backward on CPU (the gradients are compared on GPU below)."""
    dense, _ = _loss_and_grads(tiny_model_dirs[family], "sdpa", mode, CPU, grads=False)
    flex, _ = _loss_and_grads(tiny_model_dirs[family], "flex_attention", mode, CPU, grads=False)
    assert flex == pytest.approx(dense, abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs a GPU")
@pytest.mark.parametrize("mode", ["bottleneck", "split_layer"])
def test_block_sparse_gradients_equal_the_dense_mask_on_gpu(tiny_model_dir, mode):
    dense_loss, dense_grads = _loss_and_grads(tiny_model_dir, "sdpa", mode, CUDA, grads=True)
    flex_loss, flex_grads = _loss_and_grads(tiny_model_dir, "flex_attention", mode, CUDA, grads=True)
    assert flex_loss == pytest.approx(dense_loss, abs=1e-5)
    assert flex_grads.keys() == dense_grads.keys() and dense_grads
    for name in dense_grads:
        torch.testing.assert_close(flex_grads[name], dense_grads[name], atol=1e-5, rtol=1e-4)


def test_block_sparse_is_registered_with_transformers():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert transformers_attn_implementation("flex_attention", "sdpa")["text_config"] == BLOCK_SPARSE
    assert BLOCK_SPARSE in ALL_ATTENTION_FUNCTIONS and BLOCK_SPARSE in ALL_MASK_ATTENTION_FUNCTIONS
