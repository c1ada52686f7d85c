"""Ranking metrics against brute-force Python loops."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coma.eval.metrics import aggregate, hits_at_1, mrr, pessimistic_ranks, precision_at_1, recall_at_k


def _brute(scores: list[np.ndarray]) -> tuple[list[bool], list[bool], list[int]]:
    strict, ties, ranks = [], [], []
    for row in scores:
        values = [float(x) for x in row]
        positive = values[0]
        strict.append(all(positive > other for other in values[1:]))
        first_max = 0
        for index, value in enumerate(values):
            if value > values[first_max]:
                first_max = index
        ties.append(first_max == 0)
        ranks.append(1 + sum(1 for other in values[1:] if other >= positive))
    return strict, ties, ranks


def _random_scores(seed: int, n_queries: int = 200) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(n_queries):
        n = int(rng.integers(1, 25))
        # Few distinct integer values make exact ties frequent; some queries use continuous scores.
        if rng.random() < 0.5:
            scores.append(rng.integers(0, 4, size=n).astype(np.float32))
        else:
            scores.append(rng.standard_normal(n))
    return scores


def test_tie_handling_on_hand_cases() -> None:
    scores = [np.array([1.0, 1.0, 0.0]), np.array([0.5]), np.array([0.0, 1.0]), np.array([2.0, 1.0, 1.0])]
    strict, ties = hits_at_1(scores)
    assert strict.tolist() == [False, True, False, True]
    assert ties.tolist() == [True, True, False, True]
    assert strict.dtype == bool and ties.dtype == bool
    assert precision_at_1(scores) == (0.5, 0.75)
    assert pessimistic_ranks(scores).tolist() == [2, 1, 2, 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_brute_force(seed: int) -> None:
    scores = _random_scores(seed)
    strict, ties, ranks = _brute(scores)
    got_strict, got_ties = hits_at_1(scores)
    assert got_strict.tolist() == strict
    assert got_ties.tolist() == ties
    assert any(t and not s for s, t in zip(strict, ties, strict=True)), (
        "the sample should contain ties at the top"
    )
    assert precision_at_1(scores) == pytest.approx((sum(strict) / len(scores), sum(ties) / len(scores)))
    assert pessimistic_ranks(scores).tolist() == ranks
    for k in (1, 3, 10):
        assert recall_at_k(scores, k) == pytest.approx(sum(r <= k for r in ranks) / len(ranks))
    assert mrr(scores) == pytest.approx(sum(1 / r for r in ranks) / len(ranks))


def test_ties_variant_matches_argmax() -> None:
    scores = _random_scores(7)
    _, ties = hits_at_1(scores)
    assert ties.tolist() == [int(np.argmax(row)) == 0 for row in scores]


def test_equal_length_matrix_input() -> None:
    matrix = np.array([[0.9, 0.1, 0.9], [0.2, 0.1, 0.0], [0.0, 0.3, 0.1]])
    assert precision_at_1(matrix) == pytest.approx((1 / 3, 2 / 3))
    assert pessimistic_ranks(matrix).tolist() == [2, 1, 3]
    assert recall_at_k(matrix, 2) == pytest.approx(2 / 3)


def test_recall_at_1_equals_strict_precision() -> None:
    scores = _random_scores(3)
    assert recall_at_k(scores, 1) == pytest.approx(precision_at_1(scores)[0])


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        ([], "no queries"),
        ([np.array([1.0]), np.array([])], "query 1"),
        ([np.ones((2, 2))], "query 0"),
        ([np.array([0.1, np.nan])], "NaN"),
    ],
)
def test_bad_scores_raise(scores: list[np.ndarray], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        precision_at_1(scores)


def test_recall_k_must_be_positive() -> None:
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k([np.array([1.0, 0.0])], 0)


def _entries(seed: int) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    tasks = ["classification", "vqa", "retrieval", "grounding"]
    entries = {}
    for i in range(15):
        strict = float(rng.random())
        entries[f"d{i}"] = {
            "p@1": strict,
            "p@1_ties": min(1.0, strict + float(rng.random()) * 0.1),
            "meta_task": tasks[int(rng.integers(0, 4))],
            "split": "IND" if rng.random() < 0.5 else "OOD",
        }
    return entries


@pytest.mark.parametrize("seed", [0, 5])
def test_aggregate_means_against_loops(seed: int) -> None:
    entries = _entries(seed)
    result = aggregate(entries)

    def mean_of(keep, key):
        values = [e[key] for e in entries.values() if keep(e)]
        return sum(values) / len(values), len(values)

    for task, group in result["meta_tasks"].items():
        for key in ("p@1", "p@1_ties"):
            expected, count = mean_of(lambda e, task=task: e["meta_task"] == task, key)
            assert group[key] == pytest.approx(expected)
            assert group["n_datasets"] == count
    assert sum(g["n_datasets"] for g in result["meta_tasks"].values()) == len(entries)
    for split in ("IND", "OOD"):
        expected, count = mean_of(lambda e, split=split: e["split"] == split, "p@1")
        assert result[split]["p@1"] == pytest.approx(expected) and result[split]["n_datasets"] == count
    expected, count = mean_of(lambda e: True, "p@1_ties")
    assert (
        result["overall"]["p@1_ties"] == pytest.approx(expected) and result["overall"]["n_datasets"] == count
    )


def test_aggregate_is_unweighted_and_skips_empty_groups() -> None:
    entries = {
        "A": {"p@1": 1.0, "p@1_ties": 1.0, "meta_task": "vqa", "split": "IND"},
        "B": {"p@1": 0.0, "p@1_ties": 0.5, "meta_task": "classification", "split": "IND"},
        "C": {"p@1": 0.5, "p@1_ties": 0.5, "meta_task": "vqa", "split": "IND"},
    }
    result = aggregate(entries)
    assert list(result["meta_tasks"]) == ["vqa", "classification"]
    assert result["meta_tasks"]["vqa"] == {"p@1": 0.75, "p@1_ties": 0.75, "n_datasets": 2}
    assert "OOD" not in result
    assert result["IND"] == result["overall"]
    assert math.isclose(result["overall"]["p@1"], 0.5)
    assert aggregate({}) == {"meta_tasks": {}}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"p@1": 0.5, "meta_task": "vqa", "split": "IND"}, "missing 'p@1_ties'"),
        ({"p@1": 55.0, "p@1_ties": 0.5, "meta_task": "vqa", "split": "IND"}, "not a fraction"),
        ({"p@1": 0.5, "p@1_ties": 0.5, "meta_task": "vqa", "split": "test"}, "split must be one of"),
    ],
)
def test_aggregate_rejects_bad_entries(entry: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        aggregate({"GQA": entry})
    assert "'GQA'" in str(info.value)
