"""Small helpers shared by test modules (imported as a top-level module, like pytest's rootdir-less tests)."""

from __future__ import annotations

import numpy as np
from PIL import Image

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def random_image(seed: int, size: tuple[int, int] = (112, 112)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))
