"""The pre-flight check behind ``coma check``: what a data set holds and what is wrong with it, per subset.

The readers already parse every row and resolve every image path (and ``compress`` / ``match`` / ``eval`` run them
before the model loads); this module adds what only an explicit check pays for: every image opened in worker
processes, visual-token and sequence-length statistics at the recipe's pixel bounds, and one table.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from coma.data.formats import DataFormatError, PlaceholderFixes, ProblemLog
from coma.data.images import ImageLoadError, load_image, resolve_image_path


@dataclass
class InputGroup:
    """One subset (or dataset, or conversation file): its row count and every model input it makes.

    ``inputs`` are ``(text, image path as written or "", source, row, field)``; ``text`` is what the tokenizer
    sees besides the image block and the compression tokens.
    """

    rows: int = 0
    text_only_rows: int = 0
    inputs: list[tuple[str, str, str, int, str]] = field(default_factory=list)


@dataclass
class GroupStats:
    rows: int
    images: int
    bad_rows: int
    missing_images: int
    corrupt_images: int | None
    text_only_rows: int
    placeholder_fixes: int
    visual_tokens: tuple[float, float] | None
    sequence_length: tuple[float, float] | None


def _open_image(path: str) -> tuple[int, int] | str:
    """(width, height) of a fully decoded image, or why it cannot be read (runs in a worker process)."""
    try:
        image = load_image(path)
    except ImageLoadError as error:
        return str(error)
    return image.size


def open_images(
    paths: Sequence[str], workers: int, show_progress: bool = True
) -> dict[str, tuple[int, int] | str]:
    """Decode every image (``workers`` processes; 0 or 1 opens them here) with a progress bar."""
    if workers <= 1:
        results = (_open_image(path) for path in paths)
        return dict(zip(paths, tqdm(results, total=len(paths), desc="images", unit="img",
                                    disable=not show_progress), strict=True))  # fmt: skip
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_open_image, paths, chunksize=max(1, min(64, len(paths) // (4 * workers) or 1)))
        return dict(zip(paths, tqdm(results, total=len(paths), desc="images", unit="img",
                                    disable=not show_progress), strict=True))  # fmt: skip


def _mean_p95(values: Sequence[int]) -> tuple[float, float] | None:
    if not values:
        return None
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(np.percentile(array, 95))


def summarize(
    groups: dict[str, InputGroup],
    problems: ProblemLog,
    fixes: PlaceholderFixes,
    image_root: str | os.PathLike | None,
    *,
    open_all: bool = False,
    workers: int = 1,
    visual_tokens: Callable[[int, int], int] | None = None,
    text_tokens: Callable[[list[tuple[str, bool]]], list[int]] | None = None,
    extra_tokens: int = 0,
    show_progress: bool = True,
) -> dict[str, GroupStats]:
    """Per-group statistics; with ``open_all`` every image is decoded and the unreadable ones join ``problems``.

    ``visual_tokens(width, height)`` gives an image's token count at the recipe's pixel bounds, ``text_tokens``
    the other tokens of ``(text, has_image)`` inputs, ``extra_tokens`` what every input adds (the T compression
    tokens); sequence lengths need both (and ``open_all``), and sum text, visual and extra tokens per input.
    """
    sizes: dict[str, tuple[int, int] | str] = {}
    if open_all:
        distinct = sorted({image for group in groups.values() for _, image, *_ in group.inputs if image})
        resolved = [str(resolve_image_path(image, image_root)) for image in distinct]
        opened = open_images(resolved, workers, show_progress)
        sizes = {image: opened[path] for image, path in zip(distinct, resolved, strict=True)}
    stats = {}
    for name, group in groups.items():
        images = {image for _, image, *_ in group.inputs if image}
        corrupt = set()
        for _, image, source, row, field_name in group.inputs:
            if isinstance(sizes.get(image), str) and image not in corrupt:
                corrupt.add(image)
                problems.add(DataFormatError(source, row, field_name, sizes[image]), name)
        visual_stats = lengths = None
        if open_all and visual_tokens is not None:
            usable = [(text, image) for text, image, *_ in group.inputs if not image or image not in corrupt]
            visual = [visual_tokens(*sizes[image]) if image else 0 for _, image in usable]
            visual_stats = _mean_p95([v for (_, image), v in zip(usable, visual, strict=True) if image])
            if text_tokens is not None:
                counts = text_tokens([(text, bool(image)) for text, image in usable])
                lengths = _mean_p95([n + v + extra_tokens for n, v in zip(counts, visual, strict=True)])
        stats[name] = GroupStats(
            rows=group.rows,
            images=len(images),
            bad_rows=problems.by_dataset[name],
            missing_images=problems.missing_images[name],
            corrupt_images=len(corrupt) if open_all else None,
            text_only_rows=group.text_only_rows,
            placeholder_fixes=fixes.total(name),
            visual_tokens=visual_stats,
            sequence_length=lengths,
        )
    return stats


def stats_table(stats: dict[str, GroupStats], what: str = "subset") -> str:
    """A markdown table (aligned for the terminal) with a total row."""
    from coma.eval.report import markdown_table

    def pair(value: tuple[float, float] | None) -> str:
        return "—" if value is None else f"{value[0]:,.0f} / {value[1]:,.0f}"

    rows = [[name, f"{s.rows:,}", f"{s.images:,}", f"{s.bad_rows:,}", f"{s.missing_images:,}",
             "—" if s.corrupt_images is None else f"{s.corrupt_images:,}", f"{s.text_only_rows:,}",
             f"{s.placeholder_fixes:,}", pair(s.visual_tokens), pair(s.sequence_length)]
            for name, s in stats.items()]  # fmt: skip
    values = list(stats.values())
    corrupt = [s.corrupt_images for s in values if s.corrupt_images is not None]
    rows.append(["total", f"{sum(s.rows for s in values):,}", f"{sum(s.images for s in values):,}",
                 f"{sum(s.bad_rows for s in values):,}", f"{sum(s.missing_images for s in values):,}",
                 f"{sum(corrupt):,}" if corrupt else "—", f"{sum(s.text_only_rows for s in values):,}",
                 f"{sum(s.placeholder_fixes for s in values):,}", "", ""])  # fmt: skip
    header = [what, "rows", "images", "bad rows", "missing img", "corrupt img", "text-only rows",
              "placeholder fixes", "visual tok mean/p95", "seq len mean/p95"]  # fmt: skip
    return "\n".join(markdown_table(header, rows, "lrrrrrrrrr")) + "\n"


__all__ = ["GroupStats", "InputGroup", "open_images", "stats_table", "summarize"]
