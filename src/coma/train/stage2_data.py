"""Stage-2 (matching) data: MMEB-train pairs by subset, and the collator that turns them into model inputs.

``PairDataset`` holds the selected subsets (capped by ``num_sample_per_subset``) and answers
``get(subset, index)`` for the ``(subset, index)`` keys a :class:`coma.data.sampling.BlockMixtureSampler`
draws. ``PairCollator`` turns a list of pairs into query / target / hard-negative ``EncodeInput`` lists and
those into processor batches (``Embedder.collate`` formats the text: image block, compression tokens).

Every row is checked when the dataset is built, so a bad row stops the run before the first step rather
than hours into it; errors name the data file, the row and the field.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm

from coma.config import ComaConfig
from coma.data.formats import (
    DEFAULT_SPLIT,
    DataCheckError,
    DataFormatError,
    PlaceholderFixes,
    ProblemLog,
    TrainPair,
    data_files,
    default_split,
    drop_orphan_placeholder,
    list_data_subsets,
    read_mmeb_train_subset,
    splits_present,
)
from coma.data.images import DecodedImageCache, ImageLoadError, image_path_problem, resolve_image_path
from coma.embedder import EncodeInput

logger = logging.getLogger(__name__)

__all__ = [
    "PairBatch",
    "PairCollator",
    "PairDataset",
    "PairInputs",
    "pair_inputs",
]

# Decoded images kept per collator (a DataLoader worker each): multi-epoch runs draw the same files again.
IMAGE_CACHE_BYTES = 512 * 2**20
# The query / target / negative sides of a row: (text field, image field).
QUERY_FIELDS = ("qry", "qry_image_path")
TARGET_FIELDS = ("pos_text", "pos_image_path")
NEGATIVE_FIELDS = ("neg_text", "neg_image_path")


# ---------------------------------------------------------------------------------------------------------------
# One row -> model inputs


def _side(pair: TrainPair, fields: tuple[str, str], placeholder: str, required: bool) -> EncodeInput | None:
    """The ``EncodeInput`` of one side of a row, or None for an absent optional side (hard negative).

    A text-only side whose text holds the placeholder loses it (see :func:`drop_orphan_placeholder`).
    """
    text_field, image_field = fields
    image: str = getattr(pair, image_field)
    text, _ = drop_orphan_placeholder(getattr(pair, text_field), bool(image), placeholder)
    if not text.strip() and not image:
        if not required:
            return None
        raise DataFormatError(
            pair.source, pair.row, text_field, f"empty: neither '{text_field}' nor '{image_field}' is set"
        )
    count = text.count(placeholder)
    if count > 1:
        raise DataFormatError(
            pair.source,
            pair.row,
            text_field,
            f"{count} image placeholders {placeholder!r}; one image per input",
        )
    return EncodeInput(text=text, image=image or None)


def pair_inputs(
    pair: TrainPair, placeholder: str = ComaConfig.image_placeholder
) -> tuple[EncodeInput, EncodeInput, EncodeInput | None]:
    """(query, target, hard negative or None) of one row; raises ``DataFormatError`` for a malformed row.

    Image paths stay relative (resolved against the image root when collated).
    """
    return (
        _side(pair, QUERY_FIELDS, placeholder, required=True),
        _side(pair, TARGET_FIELDS, placeholder, required=True),
        _side(pair, NEGATIVE_FIELDS, placeholder, required=False),
    )


def _count_fixes(pair: TrainPair, placeholder: str, fixes: PlaceholderFixes) -> None:
    for (text_field, image_field), side in ((QUERY_FIELDS, "queries"), (TARGET_FIELDS, "targets"),
                                            (NEGATIVE_FIELDS, "negatives")):  # fmt: skip
        fixes.fix(getattr(pair, text_field), bool(getattr(pair, image_field)), pair.subset, side)


# ---------------------------------------------------------------------------------------------------------------
# Dataset


def _check_caps(caps: Mapping[str, int]) -> None:
    for name, cap in caps.items():
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ValueError(f"num_sample_per_subset[{name!r}] must be a positive integer, got {cap!r}")


def _resolve_weights(selected: Sequence[str], weights: Mapping[str, float]) -> dict[str, float]:
    resolved = {}
    for name in selected:
        weight = weights.get(name, 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"weight of subset {name!r} must be a number >= 0, got {weight!r}")
        resolved[name] = float(weight)
    if not any(resolved.values()):
        raise ValueError(f"every selected subset has weight 0: {resolved}")
    return resolved


@dataclass
class ReadReport:
    """What reading an MMEB-train root found besides the rows: for the log, the metrics and ``coma check``."""

    unread_splits: set[str]  # the other splits of folders read as DEFAULT_SPLIT because no split was given
    placeholder_fixes: PlaceholderFixes
    problems: ProblemLog
    rows_read: dict[str, int]
    ignored_settings: list[str]

    def lines(self) -> list[str]:
        """What a user should see once: the split read, placeholder fixes, ignored settings."""
        lines = []
        if self.unread_splits:
            lines.append(f"no --split given: reading {DEFAULT_SPLIT!r} "
                         f"(also present, not read: {', '.join(sorted(self.unread_splits))})")  # fmt: skip
        lines += self.placeholder_fixes.lines()
        if self.ignored_settings:
            lines.append(f"ignored for subsets not selected: {'; '.join(self.ignored_settings)}")
        return lines


def check_pair_images(pair: TrainPair, image_root: Path, verdicts: dict[str, str | None]) -> None:
    """Raise the first image-path problem of a row; ``verdicts`` holds each distinct path's problem (or None)."""
    for field in (QUERY_FIELDS[1], TARGET_FIELDS[1], NEGATIVE_FIELDS[1]):
        path = getattr(pair, field)
        if not path:
            continue
        if path not in verdicts:
            verdicts[path] = image_path_problem(path, image_root)
        if verdicts[path] is not None:
            raise DataFormatError(pair.source, pair.row, field, verdicts[path])


@dataclass
class PairDataset:
    """The selected MMEB-train subsets in memory: ``pairs[subset][index]``; ``weights`` feed the sampler."""

    root: Path
    pairs: dict[str, list[TrainPair]]
    weights: dict[str, float]
    report: ReadReport | None = None

    @classmethod
    def from_config(
        cls,
        root: str | os.PathLike,
        subsets: Sequence[str] | None = None,
        weights: Mapping[str, float] | None = None,
        caps: Mapping[str, int] | None = None,
        split: str | None = None,
        image_placeholder: str = ComaConfig.image_placeholder,
        image_root: str | os.PathLike | None = None,
        skip_bad: bool = False,
        show_progress: bool = False,
    ) -> PairDataset:
        """Read the subsets of an MMEB-train root (one folder per subset), checking every row before training.

        ``subsets`` None selects every subset folder. ``weights`` (default 1.0 each) and ``caps`` (the paper's
        ``num_sample_per_subset``: the first N rows of a subset) for subsets that are not selected are ignored (a
        recipe lists all 20 while a user downloaded a few). ``split`` picks ``{split}-*.parquet`` /
        ``{split}.jsonl`` files; None reads ``original`` where a folder holds several splits.
        ``image_placeholder`` is the one the model's coma config uses. Every row is parsed and every image path
        resolved under ``image_root`` (default: ``root``); bad rows raise :class:`DataCheckError` naming the
        first 20, or with ``skip_bad`` are skipped and counted in ``report``.
        """
        root = Path(root)
        image_root = Path(image_root) if image_root is not None else root
        available = list_data_subsets(root)
        if not available:
            raise DataFormatError(root, None, None, "no subset folders holding data files")
        selected = list(available if subsets is None else subsets)
        if not selected:
            raise ValueError(f"{root}: no subsets selected")
        duplicates = sorted({name for name in selected if selected.count(name) > 1})
        if duplicates:
            raise ValueError(f"{root}: subset(s) selected more than once: {', '.join(duplicates)}")
        unknown = sorted(set(selected) - set(available))
        if unknown:
            raise ValueError(
                f"{root}: unknown subset(s) {', '.join(unknown)}; available: {', '.join(available)}"
            )
        ignored = [
            f"{what} {', '.join(sorted(set(given) - set(selected)))}"
            for what, given in (("weights", weights or {}), ("caps", caps or {}))
            if set(given) - set(selected)
        ]
        weights = {name: value for name, value in (weights or {}).items() if name in selected}
        caps = {name: value for name, value in (caps or {}).items() if name in selected}
        _check_caps(caps)
        resolved_weights = _resolve_weights(selected, weights)

        report = ReadReport(set(), PlaceholderFixes(image_placeholder), ProblemLog(), {}, ignored)
        image_verdicts: dict[str, str | None] = {}
        pairs: dict[str, list[TrainPair]] = {}
        for name in tqdm(selected, desc="reading", unit="subset", disable=not show_progress):
            chosen = split
            if split is None:
                files = data_files(root / name)
                chosen = default_split(root / name, files)
                report.unread_splits.update(s for s in splits_present(files) if chosen and s != chosen)
            malformed_before = report.problems.by_dataset[name]
            rows = read_mmeb_train_subset(root / name, subset=name, split=chosen, limit=caps.get(name),
                                          problems=report.problems)  # fmt: skip
            malformed = report.problems.by_dataset[name] - malformed_before
            kept = []
            for pair in rows:
                try:
                    pair_inputs(pair, image_placeholder)
                    check_pair_images(pair, image_root, image_verdicts)
                except DataFormatError as error:
                    report.problems.add(error, name)
                    continue
                _count_fixes(pair, image_placeholder, report.placeholder_fixes)
                kept.append(pair)
            report.rows_read[name] = len(rows) + malformed
            pairs[name] = kept
        if report.problems and not skip_bad:
            raise DataCheckError(report.problems, str(root))
        for name, kept in pairs.items():
            if not kept:
                left = " left after skipping bad ones" if report.problems.by_dataset[name] else ""
                raise DataFormatError(
                    root / name, None, None, f"no rows{left}" + (f" in split '{split}'" if split else "")
                )
        return cls(root=root, pairs=pairs, weights=resolved_weights, report=report)

    @property
    def subsets(self) -> list[str]:
        return list(self.pairs)

    @property
    def subset_sizes(self) -> dict[str, int]:
        """Rows per subset (after caps): the ``subset_sizes`` of ``BlockMixtureSampler``."""
        return {name: len(rows) for name, rows in self.pairs.items()}

    def __len__(self) -> int:
        return sum(len(rows) for rows in self.pairs.values())

    def get(self, subset: str, index: int) -> TrainPair:
        rows = self.pairs.get(subset)
        if rows is None:
            raise KeyError(f"subset {subset!r} is not loaded; loaded: {', '.join(self.pairs)}")
        if not 0 <= index < len(rows):
            raise IndexError(f"index {index} out of range for subset {subset!r} ({len(rows)} rows)")
        return rows[index]

    def get_many(self, keys: Sequence[tuple[str, int]]) -> list[TrainPair]:
        """The pairs for a sampler batch of ``(subset, index)`` keys, in order."""
        return [self.get(subset, index) for subset, index in keys]


# ---------------------------------------------------------------------------------------------------------------
# Collation


class EmbedderLike(Protocol):
    """What the collator needs from an ``Embedder``: its coma config and its ``collate``."""

    @property
    def config(self) -> ComaConfig: ...

    def collate(self, items: Sequence[EncodeInput], image_root: str | os.PathLike | None = None) -> dict: ...


@dataclass(frozen=True)
class PairInputs:
    """The model inputs of a list of pairs; ``negatives`` holds one entry per row that has a hard negative."""

    queries: list[EncodeInput]
    targets: list[EncodeInput]
    negatives: list[EncodeInput]


@dataclass(frozen=True)
class PairBatch:
    """Processor batches of a list of pairs; ``negative`` is None when no row has a hard negative."""

    query: dict
    target: dict
    negative: dict | None


class PairCollator:
    """Pairs -> query / target / hard-negative inputs -> processor batches (through ``embedder.collate``).

    Image files are decoded once and kept in a byte-bounded cache (``image_cache_bytes``, 0 turns it off). With
    ``skip_bad`` a row whose image cannot be read is left out of its batch (every time it is drawn) and recorded in
    ``skipped_rows``.
    """

    def __init__(
        self,
        embedder: EmbedderLike,
        image_root: str | os.PathLike | None,
        image_cache_bytes: int = IMAGE_CACHE_BYTES,
        skip_bad: bool = False,
    ) -> None:
        self.embedder = embedder
        self.image_root = image_root
        self.skip_bad = skip_bad
        self.skipped_rows: set[tuple[str, int]] = set()
        self.placeholder = embedder.config.image_placeholder
        self.images = DecodedImageCache(image_cache_bytes) if image_cache_bytes > 0 else None
        self._resolve = self._path_cache()

    def _path_cache(self):
        # Resolving a path walks the file system (~0.2 ms) and each row's paths are resolved twice per step; the
        # bound keeps a one-epoch run over millions of rows from holding every path.
        return functools.lru_cache(maxsize=2**16)(functools.partial(resolve_image_path, root=self.image_root))

    def __getstate__(self) -> dict:
        # A spawned DataLoader worker gets a pickled copy: the path cache cannot be pickled and starts empty there.
        return {key: value for key, value in self.__dict__.items() if key != "_resolve"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._resolve = self._path_cache()

    def inputs(self, pairs: Sequence[TrainPair]) -> PairInputs:
        """Split rows into the three groups; image files are checked (and decoded) here, so errors name the row."""
        queries, targets, negatives = [], [], []
        for pair in pairs:
            query, target, negative = pair_inputs(pair, self.placeholder)
            try:
                sides = [self._checked(pair, field, item) for field, item in (
                    (QUERY_FIELDS[1], query), (TARGET_FIELDS[1], target), (NEGATIVE_FIELDS[1], negative))]  # fmt: skip
            except DataFormatError as error:
                if not self.skip_bad:
                    raise
                if (pair.source, pair.row) not in self.skipped_rows:
                    self.skipped_rows.add((pair.source, pair.row))
                    logger.warning("skipping a row (--skip-bad): %s", error)
                continue
            queries.append(sides[0])
            targets.append(sides[1])
            if sides[2] is not None:
                negatives.append(sides[2])
        if not queries:
            raise DataFormatError(
                pairs[0].source, pairs[0].row, None, "every row of this batch has a bad image"
            )
        return PairInputs(queries, targets, negatives)

    def collate(self, items: Sequence[EncodeInput]) -> dict:
        """Processor batch of some inputs: the ``collate`` that ``ContrastiveStep`` calls per chunk."""
        if self.images is not None:
            items = [self._decoded(item) for item in items]
        return self.embedder.collate(items, self.image_root)

    def _decoded(self, item: EncodeInput) -> EncodeInput:
        if item.image is None or not isinstance(item.image, (str, os.PathLike)):
            return item
        return EncodeInput(item.text, self.images.get(self._resolve(item.image)))

    def __call__(self, pairs: Sequence[TrainPair]) -> PairBatch:
        groups = self.inputs(pairs)
        return PairBatch(
            query=self.collate(groups.queries),
            target=self.collate(groups.targets),
            negative=self.collate(groups.negatives) if groups.negatives else None,
        )

    def _checked(self, pair: TrainPair, image_field: str, item: EncodeInput | None) -> EncodeInput | None:
        if item is None or item.image is None:
            return item
        try:
            path = self._resolve(item.image)
        except ImageLoadError as error:
            raise DataFormatError(pair.source, pair.row, image_field, str(error)) from None
        if not path.is_file():
            raise DataFormatError(pair.source, pair.row, image_field, f"image not found: {path}")
        if self.images is not None:
            try:
                self.images.get(path)
            except ImageLoadError as error:
                raise DataFormatError(pair.source, pair.row, image_field, str(error)) from None
        return item
