"""The user-facing API: ``Embedder.from_pretrained(dir).encode(inputs)``."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from coma.backbones import load_backbone
from coma.backbones.attention import resolve_attention, transformers_attn_implementation
from coma.backbones.base import BackboneAdapter
from coma.compression import add_compression_tokens, compression_token_ids, embedding_text
from coma.config import ComaConfig
from coma.data.batching import DEFAULT_MAX_BATCH_TOKENS, budget_batches, image_size
from coma.data.formats import PlaceholderFixes
from coma.data.images import looks_like_image_path
from coma.data.pipeline import BatchPipeline, EncodeCollator, to_device
from coma.io import atomic_open
from coma.model import EmbeddingModel

logger = logging.getLogger(__name__)
POOLER_WEIGHTS = "pooler.safetensors"
ImageLike = str | os.PathLike | Image.Image
_LENGTH_CHUNK = 4096


@dataclass(frozen=True)
class EncodeInput:
    """One input: text (may contain ``<|image_1|>``), an image, or both."""

    text: str = ""
    image: ImageLike | None = None


def as_encode_input(item: Any) -> EncodeInput:
    """Normalise a string, image, path or ``{"text", "image"}`` dict.

    A string is text unless it ends in an image extension and names an existing file.
    """
    if isinstance(item, EncodeInput):
        return item
    if isinstance(item, (Image.Image, Path)):
        return EncodeInput(image=item)
    if isinstance(item, str):
        if looks_like_image_path(item) and Path(item).is_file():
            return EncodeInput(image=item)
        return EncodeInput(text=item)
    if isinstance(item, dict):
        unknown = set(item) - {"text", "image"}
        if unknown:
            raise ValueError(
                f"encode input has unknown keys {sorted(unknown)}; expected 'text' and/or 'image'"
            )
        text, image = item.get("text") or "", item.get("image") or None
        if not isinstance(text, str):
            raise ValueError(f"encode input field 'text' must be a string, got {type(text).__name__}")
        if not text and image is None:
            raise ValueError("encode input needs a 'text' or an 'image'")
        return EncodeInput(text=text, image=image)
    raise TypeError(f"cannot encode an input of type {type(item).__name__}")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Embedder:
    """A multimodal embedding model ready to encode, save and load."""

    def __init__(self, model: EmbeddingModel, processor: Any, device: torch.device | None = None):
        self.model = model
        self.processor = processor
        self.device = device or next(model.parameters()).device
        self.padding_side = "right"

    @property
    def config(self) -> ComaConfig:
        return self.model.config

    @property
    def adapter(self) -> BackboneAdapter:
        return self.model.adapter

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        num_tokens: int | None = None,
        pooling: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        attn_implementation: str = "auto",
        vision_attn_implementation: str = "auto",
        trust_remote_code: bool = False,
    ) -> Embedder:
        """Load a coma model folder, or a plain VLM (folder or hub id) to which compression tokens are added.

        A folder with a saved coma config keeps its T; asking for a different ``num_tokens`` is an error.
        ``auto`` attention is flash_attention_2 on CUDA where flash-attn is installed, else SDPA (encoding passes
        only padding masks); the vision tower's implementation can differ from the language model's.
        """
        device = torch.device(device) if device is not None else default_device()
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        text, vision = resolve_attention(
            attn_implementation, vision_attn_implementation, device=device, four_d_mask=False
        )
        backbone, processor, adapter = load_backbone(
            name_or_path,
            dtype=dtype,
            attn_implementation=transformers_attn_implementation(text, vision),
            trust_remote_code=trust_remote_code,
        )
        folder = Path(name_or_path)
        saved = ComaConfig.load(folder) if folder.is_dir() else None
        if saved is not None:
            if num_tokens is not None and num_tokens != saved.num_tokens:
                raise ValueError(
                    f"{folder} was trained with T={saved.num_tokens} compression tokens; requested T={num_tokens}"
                )
            config = saved
            token_ids = compression_token_ids(processor.tokenizer, config)
        else:
            config = ComaConfig(num_tokens=num_tokens or ComaConfig.num_tokens)
            token_ids = add_compression_tokens(backbone, processor.tokenizer, config)
        overrides = {"pooling": pooling, "min_pixels": min_pixels, "max_pixels": max_pixels}
        for key, value in overrides.items():
            if value is not None:
                setattr(config, key, value)
        config.__post_init__()
        apply_pixel_bounds(processor, config)
        model = EmbeddingModel(backbone, adapter, config, token_ids)
        pooler_file = folder / POOLER_WEIGHTS
        if model.pooler.head is not None and pooler_file.is_file():
            model.pooler.load_state_dict(load_file(str(pooler_file)))
        return cls(model.to(device).eval(), processor, device)

    def save_pretrained(self, out: str | os.PathLike) -> Path:
        """Write the model, processor, coma config and pooler head; ``from_pretrained`` restores it exactly."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.model.backbone.save_pretrained(out, safe_serialization=True)
        self.processor.save_pretrained(out)
        self.config.save(out)
        pooler_state = {k: v.detach().cpu().contiguous() for k, v in self.model.pooler.state_dict().items()}
        if pooler_state:
            with atomic_open(out / POOLER_WEIGHTS, "wb") as handle:
                handle.write(safetensors_bytes(pooler_state))
        return out

    def collate(self, items: Sequence[EncodeInput], image_root: str | os.PathLike | None = None) -> dict:
        """Processor batch for a list of inputs (text formatted with the image block and compression tokens)."""
        return EncodeCollator.from_embedder(self, image_root).collate(items)

    @torch.inference_mode()
    def encode(
        self,
        inputs: Sequence[Any],
        instruction: str | None = None,
        batch_size: int = 32,
        show_progress: bool = True,
        image_root: str | os.PathLike | None = None,
        max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS,
        num_workers: int = 0,
    ) -> np.ndarray:
        """Embed texts, images, image paths or ``{"text", "image"}`` dicts into an (N, D) float32 array.

        ``instruction`` is put before each input's text (after the image block), as MMEB instructions are. Inputs
        are batched by cost (:meth:`plan_batches`): at most ``batch_size`` rows and ``max_batch_tokens`` padded
        tokens per batch (``None``: rows only); the result does not depend on either. ``num_workers`` processes
        prepare batches ahead of the model (0: in this process).
        """
        items = [as_encode_input(item) for item in inputs]
        fixes = PlaceholderFixes(self.config.image_placeholder)
        items = [
            EncodeInput(fixes.fix(it.text, it.image is not None, "encode", "input(s)"), it.image)
            for it in items
        ]
        if fixes.total():
            logger.warning(
                "%d text-only input(s) carried %s; removed", fixes.total(), self.config.image_placeholder
            )
        if instruction:
            items = [
                EncodeInput(f"{instruction}\n{it.text}" if it.text else instruction, it.image) for it in items
            ]
        if not items:
            return np.zeros((0, self.model.hidden_size), dtype=np.float32)
        batches = self.plan_batches(items, batch_size, max_batch_tokens, image_root)
        self.model.eval()
        result = None
        with tqdm(total=len(items), desc="encode", unit="input", disable=not show_progress) as bar:
            for batch, embeddings in self.encode_batches(items, batches, image_root, num_workers=num_workers):
                if result is None:  # the width depends on the pooling (concat: T × hidden)
                    result = np.empty((len(items), embeddings.shape[1]), dtype=np.float32)
                result[batch] = embeddings  # back in input order
                bar.update(len(batch))
        return result

    def input_lengths(
        self, items: Sequence[EncodeInput], image_root: str | os.PathLike | None = None
    ) -> list[int]:
        """Each input's sequence length as :meth:`collate` makes it (image block, visual tokens, compression
        tokens), with image sizes read from file headers: the cost of a batch without decoding or processing."""
        lengths = []
        for start in range(0, len(items), _LENGTH_CHUNK):  # bounded tokenizer output for huge inputs
            chunk = items[start : start + _LENGTH_CHUNK]
            texts = [
                embedding_text(item.text, item.image is not None, self.config, self.adapter.image_block)
                for item in chunk
            ]
            for item, ids in zip(chunk, self.processor.tokenizer(texts)["input_ids"], strict=True):
                # The processor expands the image block's one pad token into the image's visual tokens.
                visual = 0
                if item.image is not None:
                    visual = (
                        self.adapter.visual_tokens(self.processor, *image_size(item.image, image_root)) - 1
                    )
                lengths.append(len(ids) + visual)
        return lengths

    def plan_batches(
        self,
        items: Sequence[EncodeInput],
        batch_size: int = 32,
        max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS,
        image_root: str | os.PathLike | None = None,
    ) -> list[list[int]]:
        """Indices of ``items`` grouped into batches: sorted by (has image, length), cut under ``max_batch_tokens``
        padded tokens and ``batch_size`` rows (:func:`coma.data.batching.budget_batches`)."""
        lengths = self.input_lengths(items, image_root)
        order = sorted(range(len(items)), key=lambda i: (items[i].image is not None, lengths[i]))
        return budget_batches(order, lengths, max_batch_tokens, batch_size)

    @torch.inference_mode()
    def encode_batches(
        self,
        items: Sequence[EncodeInput],
        batches: Sequence[Sequence[int]],
        image_root: str | os.PathLike | None = None,
        timings: dict[str, float] | None = None,
        num_workers: int = 0,
    ) -> Iterator[tuple[list[int], np.ndarray]]:
        """``(batch, its (rows, D) float32 embeddings)`` for each batch of indices into ``items``, in order.

        ``num_workers`` > 0 decodes images and runs the processor in that many DataLoader worker processes, ahead of
        the model (:class:`coma.data.pipeline.BatchPipeline`); 0 collates in this process. ``timings`` accumulates
        seconds spent waiting for a collated batch (``"collate"``) and in the model (``"model"``).
        """
        timings = timings if timings is not None else {}
        jobs = ([items[i] for i in batch] for batch in batches)
        if num_workers > 0:
            prepared = BatchPipeline(EncodeCollator.from_embedder(self, image_root), num_workers)(jobs)
        else:
            prepared = (self.collate(job, image_root) for job in jobs)
        try:
            for batch in batches:
                started = time.perf_counter()
                inputs = to_device(next(prepared), self.device)
                collated = time.perf_counter()
                embeddings = self.model(inputs).float().cpu().numpy()
                timings["collate"] = timings.get("collate", 0.0) + collated - started
                timings["model"] = timings.get("model", 0.0) + time.perf_counter() - collated
                yield list(batch), embeddings
        finally:
            prepared.close()  # stops the workers when the consumer stops early


def apply_pixel_bounds(processor: Any, config: ComaConfig) -> None:
    """Set min/max pixels on the image processor (call-time pixel arguments are deprecated in transformers 5)."""
    image_processor = processor.image_processor
    size = dict(getattr(image_processor, "size", None) or {})
    if config.min_pixels is not None:
        size["shortest_edge"] = config.min_pixels
    if config.max_pixels is not None:
        size["longest_edge"] = config.max_pixels
    if size:
        image_processor.size = size


__all__ = ["Embedder", "EncodeInput", "as_encode_input"]
