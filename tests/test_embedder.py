"""Embedding API: loading, encoding invariances, pooling, save/load, T mismatch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import FAMILIES, random_image
from safetensors.torch import load_file

from coma import Embedder
from coma.config import POOLINGS, ComaConfig


def mixed_inputs(image_files):
    return [
        "a red circle at the top left",
        {"text": "What colour is the square?", "image": image_files[0]},
        random_image(7),
        {"text": "<|image_1|>\nRepresent the given image.", "image": str(image_files[1])},
        "two",
        {"image": image_files[2]},
    ]


@pytest.fixture(scope="module")
def embedders(tiny_model_dirs):
    return {family: Embedder.from_pretrained(path) for family, path in tiny_model_dirs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_both_families_encode(embedders, image_files, family):
    embedder = embedders[family]
    out = embedder.encode(mixed_inputs(image_files), show_progress=False)
    assert out.dtype == np.float32 and out.shape == (6, embedder.model.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert np.abs(out[0] - out[1]).max() > 1e-4, "different inputs must not collapse to one embedding"


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batch_equals_single_encodes(tiny_model_dir, image_files, pooling, padding_side):
    embedder = Embedder.from_pretrained(tiny_model_dir, pooling=pooling)
    embedder.padding_side = padding_side
    inputs = mixed_inputs(image_files)
    batched = embedder.encode(inputs, batch_size=len(inputs), show_progress=False)
    singles = np.concatenate([embedder.encode([item], show_progress=False) for item in inputs])
    np.testing.assert_allclose(batched, singles, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_invariant_to_batch_size_and_padding_side(embedders, image_files, family):
    embedder = embedders[family]
    inputs = mixed_inputs(image_files) * 2
    reference = embedder.encode(inputs, batch_size=len(inputs), show_progress=False)
    for batch_size in (1, 3, 5):
        np.testing.assert_allclose(embedder.encode(inputs, batch_size=batch_size, show_progress=False), reference,
                                   atol=1e-5)  # fmt: skip
    embedder.padding_side = "left"
    try:
        np.testing.assert_allclose(
            embedder.encode(inputs, batch_size=4, show_progress=False), reference, atol=1e-5
        )
    finally:
        embedder.padding_side = "right"


@pytest.mark.parametrize("pooling", ["mean", "gated", "latent"])
def test_save_load_round_trip_is_bit_identical(tiny_model_dir, image_files, tmp_path, pooling):
    embedder = Embedder.from_pretrained(tiny_model_dir, pooling=pooling)
    with torch.no_grad():  # make the head non-trivial so a lost head would show
        for parameter in embedder.model.pooler.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    inputs = mixed_inputs(image_files)
    before = embedder.encode(inputs, show_progress=False)
    embedder.save_pretrained(tmp_path / "saved")
    reloaded = Embedder.from_pretrained(tmp_path / "saved")
    assert reloaded.config == embedder.config
    np.testing.assert_array_equal(reloaded.encode(inputs, show_progress=False), before)
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    for name, tensor in embedder.model.backbone.state_dict().items():
        if name in saved:
            assert torch.equal(saved[name], tensor), name


def test_num_tokens_mismatch_raises(tiny_model_dir, tmp_path):
    Embedder.from_pretrained(tiny_model_dir, num_tokens=8).save_pretrained(tmp_path / "t8")
    assert ComaConfig.load(tmp_path / "t8").num_tokens == 8
    with pytest.raises(ValueError, match="T=8.*requested T=16"):
        Embedder.from_pretrained(tmp_path / "t8", num_tokens=16)
    assert Embedder.from_pretrained(tmp_path / "t8", num_tokens=8).config.num_tokens == 8


def test_compression_rows_are_mean_initialised(tiny_model_dir):
    from coma.backbones import load_backbone
    from coma.compression import add_compression_tokens

    model, processor, _ = load_backbone(tiny_model_dir)
    rows_before = len(processor.tokenizer)
    mean = model.get_input_embeddings().weight[:rows_before].mean(0)
    ids = add_compression_tokens(model, processor.tokenizer, ComaConfig(num_tokens=4))
    assert ids == list(range(rows_before, rows_before + 4))
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == rows_before + 4, "a BPE vocab has no spare rows: the matrix must grow"
    torch.testing.assert_close(weight[ids], mean.expand(4, -1))
    assert add_compression_tokens(model, processor.tokenizer, ComaConfig(num_tokens=4)) == ids
    with pytest.raises(ValueError, match="already holds 4 compression tokens.*T=8"):
        add_compression_tokens(model, processor.tokenizer, ComaConfig(num_tokens=8))


def test_missing_model_folder_gives_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found") as info:
        Embedder.from_pretrained(tmp_path / "nope")
    assert "\n" not in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Embedder.from_pretrained(tmp_path / "empty")


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        Embedder.from_pretrained("not-an-org/not-a-model-coma-test")


def test_placeholder_without_image_is_dropped_and_reported(embedders, caplog):
    # Real WebQA / EDIS text-only queries carry the placeholder (hub-layouts §1-§2).
    embedder = embedders["qwen2_vl"]
    with caplog.at_level("WARNING", logger="coma.embedder"):
        fixed = embedder.encode(["<|image_1|>\nFind a news image.", "a dog"], show_progress=False)
    plain = embedder.encode(["Find a news image.", "a dog"], show_progress=False)
    np.testing.assert_allclose(fixed, plain, atol=1e-6)
    assert "1 text-only input(s) carried <|image_1|>; removed" in caplog.text


def test_pixel_bounds_shape_the_visual_tokens(tiny_model_dir):
    from coma.embedder import EncodeInput

    small = Embedder.from_pretrained(tiny_model_dir, max_pixels=56 * 56)
    batch = small.collate([EncodeInput(image=random_image(1, (224, 224)))])
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]  # 56 px -> 4 × 4 patches -> 4 visual tokens
