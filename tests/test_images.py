"""Image loading safety: missing, corrupt, escaping and oversized images fail with the file named."""

from __future__ import annotations

import os

import pytest
from helpers import random_image

from coma.data.images import DecodedImageCache, ImageLoadError, load_image, resolve_image_path


def test_corrupt_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(ImageLoadError, match="broken.png"):
        load_image(bad)


def test_missing_image_names_the_file(tmp_path):
    with pytest.raises(ImageLoadError, match="image not found: .*nowhere.jpg"):
        load_image("nowhere.jpg", root=tmp_path)


@pytest.mark.parametrize("path", ["../secret.png", "a/../../secret.png", "/etc/passwd"])
def test_paths_escaping_the_root_are_refused(tmp_path, path):
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ImageLoadError, match="outside the image root"):
        resolve_image_path(path, root)


def test_paths_inside_the_root_resolve(tmp_path):
    (tmp_path / "sub").mkdir()
    random_image(0).save(tmp_path / "sub" / "ok.png")
    assert resolve_image_path("sub/./ok.png", tmp_path) == (tmp_path / "sub" / "ok.png").resolve()
    assert resolve_image_path(str(tmp_path / "sub" / "ok.png"), tmp_path).is_file()
    assert load_image("sub/ok.png", root=tmp_path).mode == "RGB"


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    random_image(0, (300, 300)).save(path)
    with pytest.raises(ImageLoadError, match="big.png.*above the limit"):
        load_image(path, max_source_pixels=200 * 200)


def test_extreme_aspect_ratio_is_refused(tmp_path):
    path = tmp_path / "strip.png"
    random_image(0, (2010, 10)).save(path)
    with pytest.raises(ImageLoadError, match="aspect ratio"):
        load_image(path)


def test_encode_reports_the_bad_image(tiny_model_dir, tmp_path):
    from coma import Embedder

    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"garbage")
    with pytest.raises(ImageLoadError, match="corrupt.jpg"):
        Embedder.from_pretrained(tiny_model_dir).encode([{"text": "x", "image": bad}], show_progress=False)


def test_decoded_image_cache_reuses_evicts_by_bytes_and_sees_rewrites(tmp_path):
    paths = []
    for seed in range(3):
        path = tmp_path / f"{seed}.png"
        random_image(seed, (8, 8)).save(path)
        paths.append(path)
    cache = DecodedImageCache(max_bytes=2 * 8 * 8 * 3)  # room for two 8 x 8 RGB images
    first = cache.get(paths[0])
    assert cache.get(paths[0]) is first and list(first.getdata()) == list(load_image(paths[0]).getdata())
    cache.get(paths[1])
    cache.get(paths[0])  # 0 is now the most recent, so 1 is evicted next
    cache.get(paths[2])
    assert len(cache) == 2 and cache.bytes == 2 * 8 * 8 * 3
    assert cache.get(paths[0]) is first
    random_image(7, (8, 8)).save(paths[0])
    os.utime(paths[0], ns=(1, 1))  # a rewrite with another mtime is decoded again
    assert list(cache.get(paths[0]).getdata()) == list(random_image(7, (8, 8)).getdata())
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    with pytest.raises(ImageLoadError, match="corrupt.png"):
        cache.get(corrupt)


def test_symlinked_roots_and_folders_inside_them_are_followed(tmp_path):
    # Clusters mount shared storage and link it in: judged on the path as written, `..` still refused.
    storage = tmp_path / "storage"
    (storage / "Train").mkdir(parents=True)
    random_image(0).save(storage / "Train" / "x.png")
    root = tmp_path / "root"
    root.mkdir()
    (root / "images").symlink_to(storage)
    assert load_image("images/Train/x.png", root=root).size == (112, 112)
    linked_root = tmp_path / "linked-root"
    linked_root.symlink_to(root)
    assert resolve_image_path("images/Train/x.png", linked_root) == linked_root / "images" / "Train" / "x.png"
    with pytest.raises(ImageLoadError, match="outside the image root"):
        resolve_image_path("images/../../storage/Train/x.png", root)
