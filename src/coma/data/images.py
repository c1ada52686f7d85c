"""Safe image loading: paths confined to their root, clear errors naming the file, bounded sizes."""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Refuse decompression bombs before decoding: 8192 × 8192 is far above any VLM's pixel budget.
MAX_SOURCE_PIXELS = 8192 * 8192
MAX_ASPECT_RATIO = 200
# PIL format names of IMAGE_EXTENSIONS: the only decoders tried on bytes from the network.
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
_DATA_URL = re.compile(r"data:(?:image/[A-Za-z0-9.+-]+)?(?:;[A-Za-z0-9=.+-]+)*?(?P<base64>;base64)?,")


class ImageLoadError(ValueError):
    """An image that is missing, unreadable, too large or outside its root."""


class ImageTooLargeError(ImageLoadError):
    """Image bytes (an upload) above the allowed size, refused before they are decoded."""


def resolve_image_path(path: str | os.PathLike, root: str | os.PathLike | None) -> Path:
    """The file a dataset image path names inside ``root``; ``..`` escapes and absolute paths elsewhere are refused.

    The check is made on the path as written, not after following links: image roots (and folders inside them) are
    often symlinks to shared storage, and a link the user made is theirs to make.
    """
    candidate = Path(path)
    if root is None:
        return candidate
    root_path = Path(os.path.abspath(root))
    joined = Path(os.path.normpath(candidate if candidate.is_absolute() else root_path / candidate))
    if not joined.is_relative_to(root_path):
        raise ImageLoadError(
            f"image path {str(path)!r} leads to {joined}, outside the image root {root_path}"
        )
    return joined


def image_path_problem(path: str, root: str | os.PathLike | None) -> str | None:
    """Why a dataset image path cannot be used (outside its root, no such file), or None when it can."""
    try:
        resolved = resolve_image_path(path, root)
    except ImageLoadError as error:
        return str(error)
    return None if resolved.is_file() else f"image not found: {resolved}"


def is_image_file(path: Path) -> bool:
    """An image by its name; hidden files are not (macOS ``._*`` AppleDouble files share the image's suffix)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files under ``folder`` (recursively, following links), sorted; hidden files and folders skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(name for name in dirnames if not name.startswith((".", "__MACOSX")))
        found += [Path(dirpath) / name for name in filenames if is_image_file(Path(name))]
    return sorted(found)


def load_image(
    source: str | os.PathLike | Image.Image,
    root: str | os.PathLike | None = None,
    max_source_pixels: int = MAX_SOURCE_PIXELS,
) -> Image.Image:
    """Open an image as RGB, or raise :class:`ImageLoadError` naming the file and the reason."""
    if isinstance(source, Image.Image):
        _check_size(source, "<PIL image>", max_source_pixels)
        return source.convert("RGB")
    path = resolve_image_path(source, root)
    if not path.is_file():
        raise ImageLoadError(f"image not found: {path}")
    return _decode(path, path, max_source_pixels)


def load_image_bytes(
    data: bytes, name: str = "<bytes>", max_source_pixels: int = MAX_SOURCE_PIXELS
) -> Image.Image:
    """Decode untrusted image bytes (an upload) as RGB under the same limits as :func:`load_image`.

    Only the formats of :data:`IMAGE_EXTENSIONS` are tried, so bytes from the network never reach PIL's other
    plugins (EPS would run Ghostscript).
    """
    return _decode(io.BytesIO(data), name, max_source_pixels, formats=UPLOAD_FORMATS)


def image_data_url_bytes(url: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:[image/...][;base64],...`` URL, refusing payloads above ``max_bytes`` before decoding.

    Raises :class:`ImageTooLargeError` for an oversized payload and :class:`ImageLoadError` for anything else.
    """
    match = _DATA_URL.match(url)
    if match is None:
        raise ImageLoadError("not a data URL: expected data:image/<format>;base64,<data>")
    if not match.group("base64"):
        raise ImageLoadError("the data URL is not base64-encoded: expected data:image/<format>;base64,<data>")
    payload = url[match.end() :]
    if len(payload) // 4 * 3 > max_bytes + 2:  # 4 base64 characters per 3 bytes, at most 2 of them padding
        raise ImageTooLargeError(
            f"the image has about {len(payload) // 4 * 3:,} bytes, above the limit of {max_bytes:,}"
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageLoadError(f"the data URL's base64 payload is invalid: {error}") from None
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"the image has {len(data):,} bytes, above the limit of {max_bytes:,}")
    if not data:
        raise ImageLoadError("the data URL holds no image data")
    return data


def _decode(
    source: Path | BinaryIO, name: object, max_source_pixels: int, formats: tuple[str, ...] | None = None
) -> Image.Image:
    try:
        with Image.open(source, formats=formats) as image:
            _check_size(image, name, max_source_pixels)
            image.load()
            return image.convert("RGB")
    except ImageLoadError:
        raise
    except UnidentifiedImageError as error:
        # PIL names the stream (``<_io.BytesIO object at 0x…>``) where a file would have its path.
        reason = f"not a {', '.join(formats)} image" if formats else error
        raise ImageLoadError(f"cannot read image {name}: {reason}") from None
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(f"cannot read image {name}: {error}") from None


def _check_size(image: Image.Image, name: object, max_source_pixels: int) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageLoadError(f"image {name} is empty ({width}×{height})")
    if width * height > max_source_pixels:
        raise ImageLoadError(
            f"image {name} has {width}×{height} pixels, above the limit of {max_source_pixels} (decompression bomb?)"
        )
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise ImageLoadError(f"image {name} has an aspect ratio above {MAX_ASPECT_RATIO} ({width}×{height})")


def looks_like_image_path(text: str) -> bool:
    return text.lower().endswith(IMAGE_EXTENSIONS) and "\n" not in text and len(text) < 4096


class DecodedImageCache:
    """Decoded RGB images by path, least recently used first out, bounded by their pixel bytes.

    Multi-epoch training draws the same files again and again; each is decoded
    once. Entries are keyed by path, size and mtime, so a file rewritten on disk is decoded again.
    """

    def __init__(self, max_bytes: int = 512 * 2**20) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._images: OrderedDict[tuple[Path, int, int], tuple[Image.Image, int]] = OrderedDict()

    def get(self, path: Path) -> Image.Image:
        """The decoded image at ``path`` (an already-resolved path), from the cache when it is there."""
        stat = path.stat()
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key in self._images:
            self._images.move_to_end(key)
            return self._images[key][0]
        image = load_image(path)
        size = image.width * image.height * len(image.getbands())
        if size <= self.max_bytes:
            self._images[key] = (image, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, evicted) = self._images.popitem(last=False)
                self.bytes -= evicted
        return image

    def __len__(self) -> int:
        return len(self._images)
