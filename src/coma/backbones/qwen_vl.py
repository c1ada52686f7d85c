"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL on top of transformers' own classes (no copied modeling code).

The three families share one adapter: the same image block, the same M-RoPE entry point (``get_rope_index`` on the
inner model) and the same module names. Qwen3-VL's DeepStack (ViT features added to the first LM layers' states
at the image positions) runs inside its model's forward and needs nothing from coma: it only rewrites image-token
states, which the dialogue never attends to under the bottleneck, and its mergers sit in ``visual`` (frozen with
the tower, outside the LoRA regex).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)

from coma.backbones.base import BackboneAdapter, VisionCache

QWEN_IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
# Only the language model's attention projections; the ViT uses `qkv`/`proj` and stays frozen (Qwen3-VL's q_norm /
# k_norm and DeepStack mergers do not match either).
QWEN_LORA_TARGETS = r"(.*\.)?language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2-VL processor without the video slot, which cannot be built when torchvision is absent."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without the video slot (see :class:`Qwen2VLImageOnlyProcessor`)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )


class Qwen3VLImageOnlyProcessor(Qwen3VLProcessor):
    """Qwen3-VL processor without the video slot (see :class:`Qwen2VLImageOnlyProcessor`)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )


@dataclass(frozen=True)
class QwenVLAdapter(BackboneAdapter):
    model_class: type = Qwen2VLForConditionalGeneration
    processor_class: type = Qwen2VLImageOnlyProcessor

    def load_model(self, name_or_path: str, **kwargs: Any) -> nn.Module:
        return self.model_class.from_pretrained(name_or_path, use_safetensors=True, **kwargs)

    def load_processor(self, name_or_path: str, **kwargs: Any) -> Any:
        return self.processor_class.from_pretrained(name_or_path, **kwargs)

    @property
    def published_processor_class(self) -> str:
        # coma's processors are transformers' minus the video slot; other tools load transformers' own.
        return self.processor_class.__mro__[1].__name__

    def position_ids(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """3 × B × L M-RoPE ids from the 2-D padding mask; correct for either padding side and text-only rows."""
        inner = _inner_model(model)
        kwargs = {
            "image_grid_thw": batch.get("image_grid_thw"),
            "attention_mask": batch["attention_mask"],
        }
        if _rope_takes_token_types(type(inner)):
            token_types = batch.get("mm_token_type_ids")
            if token_types is None:
                token_types = torch.zeros_like(batch["input_ids"], dtype=torch.int)
            kwargs["mm_token_type_ids"] = token_types
        position_ids, _ = inner.get_rope_index(batch["input_ids"], **kwargs)
        return position_ids

    def hidden_states(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        vision_cache: VisionCache | None = None,
    ) -> torch.Tensor:
        inputs = {
            key: batch[key]
            for key in ("input_ids", "pixel_values", "image_grid_thw", "mm_token_type_ids")
            if batch.get(key) is not None
        }
        position_ids = batch.get("position_ids")
        if position_ids is None:
            position_ids = self.position_ids(model, batch)
        mask = batch["attention_mask"] if attention_mask is None else attention_mask
        inner = _inner_model(model)
        with contextlib.ExitStack() as stack:
            if vision_cache is not None and "pixel_values" in inputs:
                inputs = self._reuse_image_features(inner, inputs, vision_cache, stack)
            output = inner(**inputs, attention_mask=mask, position_ids=position_ids, use_cache=False)
        return output.last_hidden_state

    @staticmethod
    def _reuse_image_features(
        inner: nn.Module, inputs: dict[str, torch.Tensor], cache: VisionCache, stack: contextlib.ExitStack
    ) -> dict[str, Any]:
        """``inputs`` for a forward that takes the image features (and Qwen3-VL's DeepStack features) from ``cache``,
        filling it first."""
        if cache.features is None:
            with torch.no_grad():
                output = inner.get_image_features(
                    inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True
                )
            # Only what the language model consumes: the tower's pre-merge states would only hold memory.
            kept = {"pooler_output": output.pooler_output}
            if getattr(output, "deepstack_features", None) is not None:
                kept["deepstack_features"] = output.deepstack_features
            cache.features = type(output)(**kept)
        if _forward_takes_encoder_outputs(type(inner)):
            # transformers >= 5.24: the forward accepts precomputed encoder outputs in place of pixel_values.
            inputs = {key: value for key, value in inputs.items() if key != "pixel_values"}
            return {**inputs, "mm_encoder_outputs": {"image": cache.features}}
        # Earlier 5.x forwards call self.get_image_features(pixel_values, ...) when given pixels: answer from the cache.
        inner.get_image_features = lambda *args, **kwargs: cache.features
        stack.callback(delattr, inner, "get_image_features")
        return inputs

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return _inner_model(model).language_model.layers

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return _inner_model(model).visual

    def vision_blocks(self, model: nn.Module) -> nn.ModuleList:
        return self.vision_tower(model).blocks

    def visual_tokens(self, processor: Any, width: int, height: int) -> int:
        """Visual tokens of a width × height image at the processor's pixel bounds (its own resize rule)."""
        image_processor = processor.image_processor
        # The rule lives beside the processor class in use (the PIL one without torchvision, whose module differs).
        smart_resize = importlib.import_module(type(image_processor).__module__).smart_resize
        factor = image_processor.patch_size * image_processor.merge_size
        size = image_processor.size
        resized_height, resized_width = smart_resize(
            height, width, factor=factor, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"]
        )
        return (resized_height // factor) * (resized_width // factor)


@functools.cache
def _rope_takes_token_types(model_class: type) -> bool:
    """Qwen2/2.5-VL's get_rope_index requires mm_token_type_ids from transformers 5.24 on and does not take it
    before; Qwen3-VL's requires it in every 5.x release."""
    return "mm_token_type_ids" in inspect.signature(model_class.get_rope_index).parameters


@functools.cache
def _forward_takes_encoder_outputs(model_class: type) -> bool:
    return "mm_encoder_outputs" in inspect.signature(model_class.forward).parameters


def _inner_model(model: nn.Module) -> nn.Module:
    """The ``Qwen2VLModel`` (or 2.5 / 3 counterpart) under the LM head, also when wrapped by peft."""
    while not hasattr(model, "get_rope_index"):
        if hasattr(model, "model"):
            model = model.model
        elif hasattr(model, "base_model"):
            model = model.base_model
        else:
            raise TypeError(f"{type(model).__name__} is not a Qwen-VL model")
    return model


QWEN2_VL = QwenVLAdapter(
    family="qwen2_vl",
    model_type="qwen2_vl",
    image_block=QWEN_IMAGE_BLOCK,
    lora_target_regex=QWEN_LORA_TARGETS,
    model_class=Qwen2VLForConditionalGeneration,
    processor_class=Qwen2VLImageOnlyProcessor,
)
QWEN2_5_VL = QwenVLAdapter(
    family="qwen2_5_vl",
    model_type="qwen2_5_vl",
    image_block=QWEN_IMAGE_BLOCK,
    lora_target_regex=QWEN_LORA_TARGETS,
    model_class=Qwen2_5_VLForConditionalGeneration,
    processor_class=Qwen2_5_VLImageOnlyProcessor,
)
QWEN3_VL = QwenVLAdapter(
    family="qwen3_vl",
    model_type="qwen3_vl",
    image_block=QWEN_IMAGE_BLOCK,
    lora_target_regex=QWEN_LORA_TARGETS,
    model_class=Qwen3VLForConditionalGeneration,
    processor_class=Qwen3VLImageOnlyProcessor,
)
