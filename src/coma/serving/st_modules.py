"""The sentence-transformers modules for what ST's own ``Transformer`` and ``Pooling`` cannot express.

``Pooling(pooling_mode="lasttoken")`` is coma's ``last`` pooling (the last compression token ends the input), so a
``last`` export needs no code of ours. ``mean``, ``concat``, ``gated`` and ``latent`` pool the T compression states,
which :class:`CompressionPooling` finds by token id (as :func:`coma.pooling.compression_states` does, so padding side
and batch make no difference) and pools with coma's own :class:`coma.pooling.Pooler`. Those exports also read their
inputs through :class:`ComaTransformer`, which prepares images with coma's processor. Loading either needs
``trust_remote_code=True`` (sentence-transformers ≥ 6 asks that of every class outside its package) and coma
installed.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from sentence_transformers.base.modules import Module, Transformer

from coma.backbones import adapter_for
from coma.config import ComaConfig
from coma.pooling import Pooler, compression_states

_PROCESSOR_SWAP = threading.Lock()


class ComaTransformer(Transformer):
    """ST's ``Transformer`` reading images with coma's processor.

    ST loads the processor with ``AutoProcessor``, which on a Qwen-VL folder needs torchvision for the video slot
    (DESIGN §4: coma runs without it) and, where torchvision is installed, picks transformers' torchvision image
    backend. coma's processor is the same image processor on its PIL backend, so images are resized and patched
    exactly as ``Embedder.encode`` does it, with or without torchvision.
    """

    def __init__(self, model_name_or_path: str, *args: Any, **kwargs: Any) -> None:
        from sentence_transformers.base.modules import transformer as st_transformer

        module = self

        class ComaAutoProcessor:  # ST's Transformer calls AutoProcessor.from_pretrained once, after the model loads
            @staticmethod
            def from_pretrained(name_or_path: str, **processor_kwargs: Any) -> Any:
                return adapter_for(module.config.model_type).load_processor(name_or_path, **processor_kwargs)

        # ST reads the name from its module's globals: stand coma's loader in for the one call, one load at a time.
        with _PROCESSOR_SWAP:
            original = st_transformer.AutoProcessor
            st_transformer.AutoProcessor = ComaAutoProcessor
            try:
                super().__init__(model_name_or_path, *args, **kwargs)
            finally:
                st_transformer.AutoProcessor = original


class CompressionPooling(Module):
    """``token_embeddings`` (B, L, D) and ``input_ids`` -> ``sentence_embedding``, unnormalised (a ``Normalize`` follows)."""

    config_keys = [
        "pooling",
        "token_ids",
        "hidden_size",
        "gated_temperature",
        "latent_queries",
        "latent_heads",
    ]

    def __init__(
        self,
        pooling: str,
        token_ids: list[int],
        hidden_size: int,
        gated_temperature: float = 2.0,
        latent_queries: int = 4,
        latent_heads: int = 2,
    ) -> None:
        super().__init__()
        self.pooling = pooling
        self.token_ids = list(token_ids)
        self.hidden_size = hidden_size
        self.gated_temperature = gated_temperature
        self.latent_queries = latent_queries
        self.latent_heads = latent_heads
        config = ComaConfig(
            num_tokens=len(self.token_ids),
            pooling=pooling,
            normalize=False,
            gated_temperature=gated_temperature,
            latent_queries=latent_queries,
            latent_heads=latent_heads,
        )
        self.pooler = Pooler(config, hidden_size)
        self.register_buffer("ids", torch.tensor(self.token_ids, dtype=torch.long), persistent=False)

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        hidden = features["token_embeddings"]
        states = compression_states(
            hidden, features["input_ids"].to(hidden.device), self.ids.to(hidden.device)
        )
        features["sentence_embedding"] = self.pooler(states.float())
        return features

    def get_embedding_dimension(self) -> int:
        return self.hidden_size * len(self.token_ids) if self.pooling == "concat" else self.hidden_size

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)
        if self.pooler.head is not None:
            self.save_torch_weights(output_path, safe_serialization=safe_serialization)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs) -> CompressionPooling:
        hub_kwargs = {
            key: kwargs[key]
            for key in ("token", "cache_folder", "revision", "local_files_only")
            if key in kwargs
        }
        config = cls.load_config(model_name_or_path, subfolder=subfolder, **hub_kwargs)
        module = cls(**config)
        if module.pooler.head is not None:
            cls.load_torch_weights(model_name_or_path, subfolder=subfolder, model=module, **hub_kwargs)
        return module
