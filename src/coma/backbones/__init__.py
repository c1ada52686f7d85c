"""Backbone families and loading of local folders or hub names."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from coma.backbones.attention import load_with_attention
from coma.backbones.base import BackboneAdapter
from coma.backbones.qwen_vl import QWEN2_5_VL, QWEN2_VL, QWEN3_VL

ADAPTERS: dict[str, BackboneAdapter] = {
    adapter.model_type: adapter for adapter in (QWEN2_VL, QWEN2_5_VL, QWEN3_VL)
}
FAMILIES = tuple(ADAPTERS)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def adapter_for(model_type: str) -> BackboneAdapter:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported backbone model_type {model_type!r}; supported: {', '.join(FAMILIES)}"
        ) from None


def resolve_model_source(name_or_path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """Return the string to hand to ``from_pretrained`` and its hub keyword arguments.

    A local folder must hold ``config.json``; anything that is not a folder and looks like ``org/name`` is a hub id,
    looked up in the local cache only when ``HF_HUB_OFFLINE=1``.
    """
    source = str(name_or_path)
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model folder {path} has no config.json (looked for {path / 'config.json'})"
            )
        return str(path), {}
    if _HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        return source, {"local_files_only": hub_offline()}
    raise FileNotFoundError(f"model folder not found: {source} (looked for {path / 'config.json'})")


def read_model_type(name_or_path: str | os.PathLike) -> str:
    source, hub_kwargs = resolve_model_source(name_or_path)
    path = Path(source)
    if path.is_dir():
        with open(path / "config.json", encoding="utf-8") as handle:
            return json.load(handle).get("model_type", "")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, **hub_kwargs).model_type
    except OSError as error:
        mode = " (HF_HUB_OFFLINE=1: only the local cache was searched)" if hub_offline() else ""
        raise FileNotFoundError(
            f"model {source!r} is neither a local folder nor available from the hub{mode}"
        ) from error


def load_backbone(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | dict[str, str] = "sdpa",
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any, BackboneAdapter]:
    """Load ``(model, processor, adapter)`` from a folder or hub id, safetensors only.

    ``attn_implementation`` is one implementation or one per sub-config
    (:func:`coma.backbones.attention.transformers_attn_implementation`); a vision tower asked for ``packed_sdpa``
    loads as SDPA and then runs :func:`coma.backbones.attention.packed_varlen_attention`."""
    source, hub_kwargs = resolve_model_source(name_or_path)
    adapter = adapter_for(read_model_type(source))
    model = load_with_attention(
        lambda implementation: adapter.load_model(
            source,
            dtype=dtype,
            attn_implementation=implementation,
            trust_remote_code=trust_remote_code,
            **hub_kwargs,
        ),
        attn_implementation,
        adapter.vision_tower,
    )
    processor = adapter.load_processor(source, **hub_kwargs)
    return model, processor, adapter


__all__ = ["ADAPTERS", "FAMILIES", "BackboneAdapter", "adapter_for", "load_backbone", "resolve_model_source"]
