"""Shared fixtures: tiny random models built once per session and loaded through the real loading code."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from helpers import FAMILIES, random_image  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """One saved tiny random model folder per family (seed 0, BPE tokenizer)."""
    from coma.backbones.tiny import init_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {family: init_model(root / family, family=family, size="tiny", seed=0) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["qwen2_vl"]


@pytest.fixture(scope="session")
def image_files(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for seed, size in enumerate([(112, 112), (84, 140), (224, 112), (56, 56)]):
        path = folder / f"img{seed}.png"
        random_image(seed, size).save(path)
        paths.append(path)
    return paths
