"""Ranking metrics for MMEB-style evaluation, in plain numpy.

Every query has its own candidate list (its length varies: 2 labels for HatefulMemes, 1000 for ImageNet-1K), so
scores come as one 1-D array per query, and the positive is always candidate 0. Because the positive sits at a
fixed index, how ties are broken decides the score of a collapsed model: the reference harness takes
``argmax == 0`` and so credits every tie to the positive. We report that number as ``p@1_ties`` next to the
strict one, where the positive must score above every other candidate. Ranks are pessimistic for the same reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SPLITS = ("IND", "OOD")


def _check(scores: Sequence[np.ndarray]) -> list[np.ndarray]:
    rows = [np.asarray(row) for row in scores]
    if not rows:
        raise ValueError("no queries to score")
    for index, row in enumerate(rows):
        if row.ndim != 1 or row.size == 0:
            raise ValueError(f"query {index}: expected a non-empty 1-D score array, got shape {row.shape}")
        if np.issubdtype(row.dtype, np.floating) and np.isnan(row).any():
            raise ValueError(f"query {index}: scores contain NaN")
    return rows


def _beaten_by(scores: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per query: how many other candidates score >= the positive, and how many score > it."""
    rows = _check(scores)
    at_least = np.array([np.count_nonzero(row[1:] >= row[0]) for row in rows], dtype=np.int64)
    above = np.array([np.count_nonzero(row[1:] > row[0]) for row in rows], dtype=np.int64)
    return at_least, above


def hits_at_1(scores: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-query hits as boolean arrays ``(strict, ties)``; ties = the reference harness's ``argmax == 0``."""
    at_least, above = _beaten_by(scores)
    return at_least == 0, above == 0


def precision_at_1(scores: Sequence[np.ndarray]) -> tuple[float, float]:
    """Mean Precision@1 ``(strict, ties)`` over queries, as fractions in [0, 1]."""
    strict, ties = hits_at_1(scores)
    return float(strict.mean()), float(ties.mean())


def pessimistic_ranks(scores: Sequence[np.ndarray]) -> np.ndarray:
    """1-based rank of the positive, counting every tie against it: 1 + #(others with score >= positive)."""
    at_least, _ = _beaten_by(scores)
    return at_least + 1


def recall_at_k(scores: Sequence[np.ndarray], k: int) -> float:
    """Fraction of queries whose positive has pessimistic rank <= k."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return float((pessimistic_ranks(scores) <= k).mean())


def mrr(scores: Sequence[np.ndarray]) -> float:
    """Mean reciprocal pessimistic rank of the positive."""
    return float((1.0 / pessimistic_ranks(scores)).mean())


def _group(entries: list[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "p@1": float(np.mean([entry["p@1"] for entry in entries])),
        "p@1_ties": float(np.mean([entry["p@1_ties"] for entry in entries])),
        "n_datasets": len(entries),
    }


def _check_entry(name: str, entry: Mapping[str, Any]) -> None:
    for key in ("p@1", "p@1_ties", "meta_task", "split"):
        if key not in entry:
            raise ValueError(f"dataset {name!r}: missing {key!r}")
    for key in ("p@1", "p@1_ties"):
        value = entry[key]
        if not 0.0 <= value <= 1.0:
            # Catches percentages (0-100) mixed with fractions before they skew a mean.
            raise ValueError(f"dataset {name!r}: {key} = {value} is not a fraction in [0, 1]")
    if entry["split"] not in SPLITS:
        raise ValueError(
            f"dataset {name!r}: split must be one of {', '.join(SPLITS)}, got {entry['split']!r}"
        )


def aggregate(per_dataset: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Unweighted means per meta-task, per split (IND/OOD) and overall.

    Returns ``{"meta_tasks": {task: group}, "IND": group, "OOD": group, "overall": group}`` where each group is
    ``{"p@1", "p@1_ties", "n_datasets"}``. Meta-tasks keep the order of first appearance in the input; a split or
    the overall group is left out when no dataset falls in it.
    """
    for name, entry in per_dataset.items():
        _check_entry(name, entry)
    by_task: dict[str, list[Mapping[str, Any]]] = {}
    for entry in per_dataset.values():
        by_task.setdefault(entry["meta_task"], []).append(entry)
    result: dict[str, Any] = {"meta_tasks": {task: _group(entries) for task, entries in by_task.items()}}
    for split in SPLITS:
        entries = [entry for entry in per_dataset.values() if entry["split"] == split]
        if entries:
            result[split] = _group(entries)
    if per_dataset:
        result["overall"] = _group(list(per_dataset.values()))
    return result
