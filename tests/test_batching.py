"""Batches by cost: the budget cut, exact lengths from image headers, results independent of the batching, the
DataLoader pipeline for encode and eval, scoring dataset by dataset from the cache, and exact resume under a budget."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import yaml
from helpers import FAMILIES, random_image
from PIL import Image
from test_eval_runner import (
    MANIFEST,
    CountingCollate,
    collapsed_rows,
    expected_inputs,
    identity_rows,
    retrieval_rows,
    run_eval,
    write_images,
    write_parquet,
)

from coma.data.batching import budget_batches, image_size, padded_cost
from coma.data.images import ImageLoadError
from coma.embedder import Embedder, EncodeInput
from coma.eval.cache import EmbeddingCache
from coma.eval.registry import MMEB_V1_DATASETS
from coma.eval.runner import CollectedInputs, DatasetInputs, score_dataset, score_datasets
from coma.io import write_jsonl


def test_budget_batches_cover_every_item_once_in_order_under_budget():
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = rng.integers(1, 300, size=int(rng.integers(0, 60))).tolist()
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        budget, rows = int(rng.integers(1, 1500)), int(rng.integers(1, 12))
        batches = budget_batches(order, lengths, budget, rows)
        assert [i for batch in batches for i in batch] == order, "every item exactly once, in the given order"
        for batch in batches:
            assert 1 <= len(batch) <= rows
            assert padded_cost(batch, lengths) <= budget or len(batch) == 1, "over budget only when alone"
        # Greedy: a batch was cut only because the next item did not fit.
        for batch, following in zip(batches, batches[1:], strict=False):
            assert len(batch) == rows or padded_cost([*batch, following[0]], lengths) > budget
    assert budget_batches([0, 1, 2], [5, 500, 5], 100, 8) == [[0], [1], [2]], "a long item goes alone"
    assert budget_batches(list(range(5)), [1] * 5, None, 2) == [[0, 1], [2, 3], [4]], "None: rows only"
    with pytest.raises(ValueError, match="max_batch_tokens"):
        budget_batches([0], [1], 0, 4)


def test_image_size_reads_the_header_without_decoding(tmp_path, monkeypatch):
    random_image(0, (84, 140)).save(tmp_path / "a.png")
    random_image(1, (30, 20)).convert("RGB").save(tmp_path / "b.jpeg")
    decoded = []
    original = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self) or original(self))
    assert image_size("a.png", tmp_path) == (84, 140) and image_size(tmp_path / "b.jpeg") == (30, 20)
    assert image_size(random_image(2, (7, 9))) == (7, 9)
    assert not [image for image in decoded if image.size in {(84, 140), (30, 20)}], "pixels were decoded"
    with pytest.raises(ImageLoadError, match="image not found"):
        image_size("missing.png", tmp_path)
    with pytest.raises(ImageLoadError, match="outside the image root"):
        image_size("../a.png", tmp_path / "sub")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageLoadError, match="cannot read image"):
        image_size("bad.png", tmp_path)


def inputs(image_files) -> list[EncodeInput]:
    return [
        EncodeInput("a red circle at the top left"),
        EncodeInput("What colour is the square?", image_files[0]),
        EncodeInput(image=random_image(7, (70, 90))),
        EncodeInput("<|image_1|>\nRepresent the given image." + " Carefully." * 8, image_files[1]),
        EncodeInput("two"),
        EncodeInput(image=image_files[2]),
        EncodeInput("a much longer text that keeps going " * 6),
        EncodeInput(image=image_files[3]),
    ]


@pytest.fixture(scope="module")
def embedders(tiny_model_dirs):
    return {family: Embedder.from_pretrained(path, device="cpu") for family, path in tiny_model_dirs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_input_lengths_equal_the_collated_sequences(embedders, image_files, family):
    embedder = embedders[family]
    items = inputs(image_files)
    lengths = embedder.input_lengths(items)
    assert lengths == [int(embedder.collate([item])["attention_mask"].sum()) for item in items]
    assert len(set(lengths)) > 4, "the fixture must have varied lengths"


def test_encode_is_invariant_to_the_budget_and_batches_respect_it(embedders, image_files, monkeypatch):
    embedder = embedders["qwen2_vl"]
    items = inputs(image_files) * 2
    lengths = embedder.input_lengths(items)
    reference = embedder.encode(items, batch_size=len(items), max_batch_tokens=None, show_progress=False)
    counted = {}
    for budget in (1, max(lengths), 2 * max(lengths) + 1, 400, 10**6):
        shapes = []

        def recording(items, image_root=None, shapes=shapes):
            batch = Embedder.collate(embedder, items, image_root)
            shapes.append(tuple(batch["input_ids"].shape))
            return batch

        monkeypatch.setattr(embedder, "collate", recording)
        result = embedder.encode(items, batch_size=6, max_batch_tokens=budget, show_progress=False)
        np.testing.assert_allclose(result, reference, atol=1e-5)
        assert sum(rows for rows, _ in shapes) == len(items) and all(rows <= 6 for rows, _ in shapes)
        assert all(rows * length <= budget or rows == 1 for rows, length in shapes), (budget, shapes)
        counted[budget] = len(shapes)
    assert counted[1] == len(items) and counted[10**6] == 3, "the budget decides the batches"
    assert counted[1] > counted[400] > counted[10**6]


def test_encode_through_worker_processes_equals_in_process(embedders, image_files):
    embedder = embedders["qwen2_5_vl"]
    items = inputs(image_files)
    reference = embedder.encode(items, max_batch_tokens=200, show_progress=False)
    timings = {}
    batches = embedder.plan_batches(items, 32, 200)
    assert len(batches) > 2
    encoded = list(embedder.encode_batches(items, batches, timings=timings, num_workers=2))
    assert [batch for batch, _ in encoded] == batches, "batches come back in plan order"
    for batch, vectors in encoded:
        np.testing.assert_allclose(vectors, reference[batch], atol=1e-6)
    assert set(timings) == {"collate", "model"}
    result = embedder.encode(items, max_batch_tokens=200, show_progress=False, num_workers=2)
    np.testing.assert_allclose(result, reference, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Eval: batches by cost, scoring from the cache dataset by dataset, resume


@pytest.fixture(scope="module")
def toy_benchmark(tmp_path_factory):
    """test_eval_runner's toy benchmark: three datasets sharing images and one text input."""
    root = tmp_path_factory.mktemp("toy")
    write_images(root)
    write_parquet(root / "identity", identity_rows())
    write_parquet(root / "collapsed", collapsed_rows())
    (root / "t2i").mkdir()
    write_jsonl(root / "t2i" / "test.jsonl", retrieval_rows())
    (root / "benchmark.yaml").write_text(yaml.safe_dump(MANIFEST))
    return root


def test_eval_batches_by_cost_and_resumes_exactly(embedders, toy_benchmark, tmp_path, monkeypatch):
    embedder = embedders["qwen2_vl"]
    reference = run_eval(
        embedder, toy_benchmark, tmp_path / "reference", batch_size=64, max_batch_tokens=None
    )
    budget = 100  # two rows of the toy inputs (33-48 tokens) per batch
    dying = CountingCollate(embedder, fail_after=2)
    monkeypatch.setattr(embedder, "collate", dying)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_eval(
            embedder, toy_benchmark, tmp_path / "run", batch_size=64, max_batch_tokens=budget, flush_every=1
        )
    resumed = CountingCollate(embedder)
    monkeypatch.setattr(embedder, "collate", resumed)
    scores = run_eval(
        embedder, toy_benchmark, tmp_path / "run", batch_size=64, max_batch_tokens=budget, flush_every=1
    )
    _, distinct = expected_inputs()
    assert sorted(dying.items + resumed.items) == sorted(distinct), "each input encoded once across the kill"
    assert scores["settings"]["n_cached"] == len(dying.items) > 0
    assert scores["datasets"] == reference["datasets"]
    assert scores["settings"]["max_batch_tokens"] == budget
    assert resumed.calls > 1, "the budget split the remaining inputs into several batches"

    # The cached vectors do not depend on the batching either.
    def cached(folder):
        cache = next((tmp_path / folder / "cache").iterdir())
        return {k: v for shard in cache.glob("*.npz") for k, v in zip(*np.load(shard).values(), strict=True)}

    small, large = cached("run"), cached("reference")
    assert small.keys() == large.keys()
    np.testing.assert_allclose(np.stack([small[k] for k in large]), np.stack(list(large.values())), atol=1e-5)


def test_eval_with_worker_processes_equals_in_process(embedders, toy_benchmark, tmp_path):
    embedder = embedders["qwen2_vl"]
    reference = run_eval(embedder, toy_benchmark, tmp_path / "a")
    scores = run_eval(embedder, toy_benchmark, tmp_path / "b", num_workers=1, max_batch_tokens=200)
    assert scores["datasets"] == reference["datasets"] and scores["settings"]["num_workers"] == 1
    for key in ("prepare_seconds", "model_seconds"):
        assert scores["settings"][key] > 0


def test_eval_reads_one_dataset_at_a_time_from_the_cache(embedders, toy_benchmark, tmp_path, monkeypatch):
    embedder = embedders["qwen2_vl"]
    requested = []
    original = EmbeddingCache.get

    def recording(self, keys):
        requested.append(len(keys))
        return original(self, keys)

    monkeypatch.setattr(EmbeddingCache, "get", recording)
    scores = run_eval(embedder, toy_benchmark, tmp_path)
    assert len(requested) == len(scores["datasets"]) == 3
    assert max(requested) < scores["settings"]["n_unique_inputs"], "never every embedding at once"


def synthetic_benchmark(tmp_path, n_datasets=8, per_dataset=120, dim=2048):
    """``n_datasets`` datasets of disjoint inputs in one cache shard: (cache, collected, all embeddings)."""
    rng = np.random.default_rng(0)
    n = n_datasets * per_dataset
    keys = [f"k{i}" for i in range(n)]
    embeddings = rng.normal(size=(n, dim)).astype(np.float32)
    cache = EmbeddingCache(tmp_path, "f" * 64, {}, flush_every=1)
    cache.add(keys, embeddings)
    datasets = []
    for d in range(n_datasets):
        ids = np.arange(d * per_dataset, (d + 1) * per_dataset)
        queries, pool = ids[:20], ids[20:]
        candidates = [np.roll(pool, -q)[:30] for q in range(len(queries))]
        spec = MMEB_V1_DATASETS[d]
        datasets.append(DatasetInputs(spec, queries, candidates))
    collected = CollectedInputs([], keys, datasets, n, None, None)
    return EmbeddingCache(tmp_path, "f" * 64, {}), collected, embeddings


def test_scoring_holds_one_dataset_not_the_benchmark(tmp_path):
    cache, collected, embeddings = synthetic_benchmark(tmp_path)
    expected = {d.spec.name: score_dataset(embeddings, d) for d in collected.datasets}
    del embeddings
    tracemalloc.start()
    try:
        scores = score_datasets(cache, collected, show_progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert scores == expected
    everything = len(collected.keys) * 2048 * 4
    # One dataset's rows are 1/8 of the benchmark; loading every row (or a whole shard) would be all of it.
    assert peak < everything / 3, f"scoring peaked at {peak / 2**20:.1f} MiB of {everything / 2**20:.1f} MiB"


def test_cli_batching_flags():
    import argparse

    from coma.commands.encode import add_batching_arguments, batching_options

    parser = argparse.ArgumentParser()
    add_batching_arguments(parser)
    parser.add_argument("--device", default=None)
    options = batching_options(parser.parse_args(["--device", "cpu"]))
    assert options == {"batch_size": 32, "max_batch_tokens": 16384, "num_workers": 0}, (
        "CPU: collate in-process"
    )
    options = batching_options(parser.parse_args(["--max-batch-tokens", "0", "--num-workers", "3"]))
    assert (options["max_batch_tokens"], options["num_workers"]) == (None, 3)
    with pytest.raises(ValueError, match="--max-batch-tokens"):
        batching_options(parser.parse_args(["--max-batch-tokens", "-1"]))
