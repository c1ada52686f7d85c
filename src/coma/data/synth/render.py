"""Render scene graphs to RGB images with Pillow.

Every random detail of a drawing (offsets, scale, rotation, colour and background jitter) comes from a generator
seeded by ``(style_seed, variant, slot)``: re-rendering a scene with the same variant is pixel-identical, another
variant is the same scene "photographed again", and an edit of one object leaves every other pixel unchanged.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from coma.data.synth.scenes import GRID, Scene, SceneObject

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (155, 60, 205),
    "orange": (245, 140, 30),
    "cyan": (40, 210, 220),
    "white": (240, 240, 240),
}
# Dark backgrounds keep every object colour (white included) clearly visible.
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "black": (22, 22, 26),
    "charcoal": (58, 58, 64),
    "navy": (22, 30, 72),
    "forest": (24, 62, 40),
    "maroon": (72, 28, 30),
    "brown": (64, 46, 26),
}
WORD_RGB = (225, 225, 225)
HALF_EXTENT = {
    "small": 0.20,
    "large": 0.36,
}  # of a cell; with the jitter below an object never leaves its cell
MAX_OFFSET = 0.08
MAX_SCALE_JITTER = 0.06
MAX_ROTATION_DEG = 10.0  # small, so a square never turns into a diamond
COLOUR_JITTER = 14
MIN_IMAGE_SIZE = 48
# Qwen-VL merges 28 x 28 px into one visual token: at 84 px each cell of the 3 x 3 grid is exactly one token.
DEFAULT_IMAGE_SIZE = 84
PNG_COMPRESS_LEVEL = 1  # noisy textures compress poorly; level 1 is ~3x faster than the default at ~same size
WORD_SLOT = 100  # style slot of the word, distinct from the cell slots 0..8
BACKGROUND_SLOT = 101


def check_image_size(image_size: int) -> None:
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image size must be at least {MIN_IMAGE_SIZE} px, got {image_size}")


def _style_rng(scene: Scene, variant: int, slot: int) -> np.random.Generator:
    return np.random.default_rng([scene.style_seed, variant, slot])


def cell_box(cell: int, image_size: int) -> tuple[int, int, int, int]:
    """Pixel box (left, top, right, bottom) of a grid cell; the last row/column absorbs rounding."""
    row, col = divmod(cell, GRID)
    edges = [round(i * image_size / GRID) for i in range(GRID + 1)]
    return edges[col], edges[row], edges[col + 1], edges[row + 1]


def _jitter_colour(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    noise = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    return tuple(min(255, max(0, value + int(n))) for value, n in zip(rgb, noise, strict=True))


@lru_cache(maxsize=1024)
def _texture_mask(texture: str, size: int, period: int, phase: int, axis: int) -> np.ndarray:
    """Where a periodic texture is lit (size x size, uint8 0/1); cached, since few distinct ones exist."""
    coords = np.arange(size)
    if texture == "stripes":
        along = (coords[None, :], coords[:, None], coords[:, None] + coords[None, :])[axis]
        mask = ((along + phase) // (period // 2 + 1)) % 2 == 0
    elif texture == "checker":
        cells = (coords + phase) // period
        mask = (cells[:, None] + cells[None, :]) % 2 == 0
    elif texture == "dots":
        near = (coords + phase) % period < 2
        mask = near[:, None] & near[None, :]
    else:
        raise ValueError(f"unknown periodic texture {texture!r}")
    mask = np.ascontiguousarray(np.broadcast_to(mask, (size, size)), dtype=np.uint8)
    mask.flags.writeable = False
    return mask


def _background(scene: Scene, variant: int, size: int) -> np.ndarray:
    """Background colour plus a low-contrast texture; all offsets are small and non-negative, so uint8 is safe."""
    rng = _style_rng(scene, variant, BACKGROUND_SLOT)
    base = np.array(BACKGROUND_RGB[scene.background]) + rng.integers(-8, 9, size=3)
    shade = int(rng.integers(8, 16))
    period = int(rng.integers(6, 13))
    phase = int(rng.integers(period))
    axis = int(rng.integers(3))
    if scene.texture == "plain":
        offset = np.zeros((size, size), dtype=np.uint8)
    elif scene.texture == "grain":
        offset = rng.integers(0, shade, size=(size, size), dtype=np.uint8)
    else:
        boost = 10 if scene.texture == "dots" else 0  # dots cover little area, so make them brighter
        offset = _texture_mask(scene.texture, size, period, phase, axis) * np.uint8(shade + boost)
    # Three 2-D adds then one stack: numpy broadcasts over a trailing axis of 3 about 8x slower.
    return np.stack([offset + np.uint8(channel) for channel in base], axis=-1)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of ``shape``, reaching at most ~1.06 ``r`` from the centre at any rotation up to 10 degrees."""
    if shape == "square":
        h = 0.82 * r  # a rotated square's corners reach ~1.16 h; this keeps it inside its cell
        points = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "diamond":
        points = [(0.0, -r), (r, 0.0), (0.0, r), (-r, 0.0)]
    elif shape == "triangle":
        points = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        points = [(x, y + 0.15 * r) for x, y in points]  # centre the triangle's bounding box
    elif shape == "cross":
        t = 0.36 * r
        points = [
            (-t, -r),
            (t, -r),
            (t, -t),
            (r, -t),
            (r, t),
            (t, t),
            (t, r),
            (-t, r),
            (-t, t),
            (-r, t),
            (-r, -t),
            (-t, -t),
        ]
    elif shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.45 * r
            a = -math.pi / 2 + k * math.pi / 5
            points.append((radius * math.cos(a), radius * math.sin(a)))
    else:
        raise ValueError(f"unknown polygon shape {shape!r}")
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]


def _draw_object(
    draw: ImageDraw.ImageDraw, obj: SceneObject, scene: Scene, variant: int, image_size: int
) -> None:
    rng = _style_rng(scene, variant, obj.cell)
    left, top, right, bottom = cell_box(obj.cell, image_size)
    cell = min(right - left, bottom - top)
    dx, dy = rng.uniform(-MAX_OFFSET, MAX_OFFSET, size=2) * cell
    cx, cy = (left + right) / 2 + dx, (top + bottom) / 2 + dy
    r = HALF_EXTENT[obj.size] * cell * (1 + rng.uniform(-MAX_SCALE_JITTER, MAX_SCALE_JITTER))
    angle = math.radians(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    fill = _jitter_colour(COLOUR_RGB[obj.colour], rng)
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(obj.shape, cx, cy, r, angle), fill=fill)


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _draw_word(
    draw: ImageDraw.ImageDraw, word: str, cell: int, scene: Scene, variant: int, image_size: int
) -> None:
    rng = _style_rng(scene, variant, WORD_SLOT)
    left, top, right, bottom = cell_box(cell, image_size)
    side = min(right - left, bottom - top)
    font = _font(max(8, round(side * 0.38)))
    dx, dy = rng.uniform(-0.05, 0.05, size=2) * side
    draw.text(
        ((left + right) / 2 + dx, (top + bottom) / 2 + dy),
        word,
        font=font,
        fill=_jitter_colour(WORD_RGB, rng),
        anchor="mm",
    )


def render_scene(scene: Scene, image_size: int = DEFAULT_IMAGE_SIZE, variant: int = 0) -> Image.Image:
    """Draw ``scene`` as an ``image_size`` x ``image_size`` RGB image; ``variant`` re-draws it with new jitter."""
    check_image_size(image_size)
    image = Image.fromarray(_background(scene, variant, image_size))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, scene, variant, image_size)
    if scene.word is not None and scene.word_cell is not None:
        _draw_word(draw, scene.word, scene.word_cell, scene, variant, image_size)
    return image


def crop_cell(image: Image.Image, cell: int, image_size: int) -> Image.Image:
    """The grid cell holding one object, scaled back up to the full image size (MMEB crops are images too)."""
    return image.crop(cell_box(cell, image_size)).resize((image_size, image_size), Image.Resampling.BICUBIC)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()
