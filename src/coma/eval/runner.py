"""The MMEB evaluation runner: read every dataset, encode each distinct input once, score, report.

Phases: *reading* collects every query and candidate of every dataset as a (formatted text, image path) input and
interns it, so an input shared by queries, candidates or datasets gets one id; *encoding* embeds the ids the cache
lacks, split across ranks under ``torchrun`` and batched by cost (sequence length with visual tokens, under a padded
token budget: :meth:`Embedder.plan_batches`); *scoring* reads each dataset's embeddings from the cache in turn (never
the whole benchmark's at once), ranks each query's own candidates by dot product and aggregates P@1 per dataset,
meta-task, split and overall.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from coma.backbones.attention import PACKED_SDPA, PACKED_VISION
from coma.data.formats import (
    DataCheckError,
    DataFormatError,
    EvalQuery,
    PlaceholderFixes,
    ProblemLog,
    read_mmeb_eval_dataset,
)
from coma.data.images import ImageLoadError, resolve_image_path
from coma.embedder import DEFAULT_MAX_BATCH_TOKENS, Embedder, EncodeInput
from coma.eval.cache import EmbeddingCache, input_key, model_fingerprint
from coma.eval.formatting import query_texts
from coma.eval.metrics import aggregate, mrr, precision_at_1, recall_at_k
from coma.eval.registry import (
    MMEB_V2_INSTRUCT,
    Benchmark,
    DatasetSpec,
    FormatRule,
    load_benchmark,
    select,
)
from coma.eval.registry import format_rule as registry_format_rule
from coma.eval.report import write_reports

RECALL_K = 5


@dataclass(frozen=True)
class EvalInput:
    """One model input after formatting; ``image`` is the path as written in the data ("" = no image)."""

    text: str
    image: str = ""


@dataclass
class DatasetInputs:
    """A dataset as input ids: the query's id and its candidates' ids (candidate 0 is the positive)."""

    spec: DatasetSpec
    queries: np.ndarray
    candidates: list[np.ndarray]
    rows: list[tuple[str, int]] = field(default_factory=list)  # (data file, row) of each query


@dataclass
class CollectedInputs:
    """Every distinct input of a run, its cache key, and the datasets expressed in input ids."""

    inputs: list[EvalInput]
    keys: list[str]
    datasets: list[DatasetInputs]
    n_total: int
    placeholder_fixes: PlaceholderFixes
    problems: ProblemLog


class _Interner:
    """Gives each distinct input one id and checks it once (placeholder count, image inside its root, on disk)."""

    def __init__(self, image_root: str | os.PathLike | None, placeholder: str) -> None:
        self.image_root = image_root
        self.placeholder = placeholder
        self.ids: dict[EvalInput, int] = {}
        self.inputs: list[EvalInput] = []
        self.stats: dict[str, tuple[int, int]] = {}
        self.image_problems: dict[str, str] = {}
        self.n_total = 0

    def check(self, text: str, image: str, source: str, row: int, fields: tuple[str, str]) -> None:
        """Raise ``DataFormatError`` naming the field if this input cannot be encoded (interned ones passed)."""
        if EvalInput(text, image) in self.ids:
            return
        count = text.count(self.placeholder)
        if count > 1:
            raise DataFormatError(
                source, row, fields[0], f"text holds {count} {self.placeholder!r}; one image per input"
            )
        if not image or image in self.stats:
            return
        if image not in self.image_problems:
            try:
                path = resolve_image_path(image, self.image_root)
                stat = path.stat()
            except ImageLoadError as error:
                self.image_problems[image] = str(error)
            except OSError:
                self.image_problems[image] = f"image not found: {path}"
            else:
                self.stats[image] = (stat.st_size, stat.st_mtime_ns)
                return
        raise DataFormatError(source, row, fields[1], self.image_problems[image])

    def add(self, text: str, image: str) -> int:
        """Intern one checked input."""
        self.n_total += 1
        item = EvalInput(text, image)
        found = self.ids.get(item)
        if found is None:
            found = self.ids[item] = len(self.inputs)
            self.inputs.append(item)
        return found

    def key(self, item: EvalInput) -> str:
        return input_key(item.text, item.image, self.stats.get(item.image))


def _query_inputs(
    query: EvalQuery, spec: DatasetSpec, rule: FormatRule, fixes: PlaceholderFixes
) -> list[tuple]:
    """``(text, image, fields)`` of a query and its candidates, formatted by ``rule``, placeholders of text-only
    inputs dropped."""
    try:
        query_text, candidate_texts = query_texts(query, spec, rule)
    except ValueError as error:
        raise DataFormatError(query.source, query.row, None, str(error)) from None
    sides = [(query_text, query.qry_img_path, ("qry_text", "qry_img_path"), "queries")]
    sides += [
        (text, image, (f"tgt_text[{j}]", f"tgt_img_path[{j}]"), "candidates")
        for j, (text, image) in enumerate(zip(candidate_texts, query.tgt_img_path, strict=True))
    ]
    return [
        (fixes.fix(text, bool(image), spec.name, side), image, fields) for text, image, fields, side in sides
    ]


def dataset_rule(spec: DatasetSpec, instruct: bool, override: FormatRule | None = None) -> FormatRule:
    """The rule a dataset is formatted by: ``override`` (``--format-rule``), else ``mmeb-v2-instruct`` for
    MMEB_Test_Instruct rows and the registry's (or manifest's) rule for MMEB-eval rows."""
    if override is not None:
        return override
    return MMEB_V2_INSTRUCT if instruct else spec.format_rule


def collect_inputs(
    benchmark: Benchmark,
    data_dir: str | os.PathLike,
    image_root: str | os.PathLike | None,
    placeholder: str = "<|image_1|>",
    limit: int | None = None,
    show_progress: bool = True,
    skip_bad: bool = False,
    format_rule: str | None = None,
) -> CollectedInputs:
    """Read every dataset of ``benchmark``, format its texts and intern its inputs (first ``limit`` queries each).

    Every row is parsed and every image path checked before anything is encoded: bad rows raise
    :class:`DataCheckError` naming the first 20, or with ``skip_bad`` the query is left out and counted.
    ``format_rule`` (a registry version) overrides every dataset's rule (:func:`dataset_rule`).
    """
    override = registry_format_rule(format_rule) if format_rule is not None else None
    interner = _Interner(image_root, placeholder)
    fixes = PlaceholderFixes(placeholder)
    problems = ProblemLog()
    datasets = []
    for spec in tqdm(benchmark.datasets, desc="reading", unit="dataset", disable=not show_progress):
        folder = Path(data_dir) / spec.folder
        queries = read_mmeb_eval_dataset(folder, limit=limit, problems=problems)
        query_ids, candidate_ids, rows = [], [], []
        rule = dataset_rule(spec, bool(queries) and queries[0].qry_inst is not None, override)
        for query in queries:
            try:
                inputs = _query_inputs(query, spec, rule, fixes)
                for text, image, fields in inputs:
                    interner.check(text, image, query.source, query.row, fields)
            except DataFormatError as error:
                problems.add(error, spec.folder)
                continue
            ids = [interner.add(text, image) for text, image, _ in inputs]
            query_ids.append(ids[0])
            candidate_ids.append(np.array(ids[1:], dtype=np.int64))
            rows.append((query.source, query.row))
        if not query_ids:
            if problems.by_dataset[spec.folder]:
                continue  # every query was bad: reported with the problems, not scored
            raise DataFormatError(folder, None, None, f"dataset {spec.name!r} has no queries")
        datasets.append(DatasetInputs(replace(spec, format_rule=rule), np.array(query_ids, dtype=np.int64),
                                      candidate_ids, rows))  # fmt: skip
    if problems and not skip_bad:
        raise DataCheckError(problems, str(data_dir))
    keys = [interner.key(item) for item in interner.inputs]
    return CollectedInputs(interner.inputs, keys, datasets, interner.n_total, fixes, problems)


def encoding_order(inputs: Sequence[EvalInput]) -> list[int]:
    """Ids sorted by modality then text length (ties by content, so every rank computes the same order); ranks take
    strided shares of it, which needs no image header and gives each a similar mix."""
    return sorted(
        range(len(inputs)),
        key=lambda i: (inputs[i].image != "", len(inputs[i].text), inputs[i].text, inputs[i].image),
    )


@torch.inference_mode()
def encode_missing(
    embedder: Embedder,
    collected: CollectedInputs,
    cache: EmbeddingCache,
    image_root: str | os.PathLike | None,
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    show_progress: bool = True,
    max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS,
    timings: dict[str, float] | None = None,
    num_workers: int = 0,
) -> int:
    """Encode this rank's share (strided over the sorted ids) of the inputs the cache lacks; returns how many.

    Batches hold at most ``batch_size`` rows and ``max_batch_tokens`` padded tokens and are collated by
    ``num_workers`` processes (0: in this one); ``timings`` accumulates the seconds of ``"plan"`` (lengths from
    tokenizer and image headers), ``"collate"`` (waiting for a collated batch) and ``"model"``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    timings = timings if timings is not None else {}
    # Striding the full order (not the missing ids) keeps the split independent of what other ranks have written.
    mine = [i for i in encoding_order(collected.inputs)[rank::world_size] if collected.keys[i] not in cache]
    items = [EncodeInput(collected.inputs[i].text, collected.inputs[i].image or None) for i in mine]
    started = time.perf_counter()
    batches = embedder.plan_batches(items, batch_size, max_batch_tokens, image_root)
    timings["plan"] = timings.get("plan", 0.0) + time.perf_counter() - started
    # Evaluation may run in the middle of training (the demo does): restore the mode afterwards.
    was_training = embedder.model.training
    embedder.model.eval()
    try:
        with tqdm(total=len(mine), desc="encoding", unit="input", disable=not show_progress) as bar:
            for batch, embeddings in embedder.encode_batches(
                items, batches, image_root, timings, num_workers
            ):
                cache.add([collected.keys[mine[j]] for j in batch], embeddings)
                bar.update(len(batch))
        cache.flush()
    finally:
        embedder.model.train(was_training)
    return len(mine)


def query_scores(embeddings: np.ndarray, query: int, candidates: np.ndarray) -> np.ndarray:
    """Dot products of a query with its candidates, in float64.

    Each distinct candidate is scored once and the scores are copied to its repeats, so duplicated candidates tie
    exactly (a BLAS kernel may round identical rows differently depending on where they fall).
    """
    unique, inverse = np.unique(candidates, return_inverse=True)
    scores = embeddings[unique].astype(np.float64) @ embeddings[query].astype(np.float64)
    return scores[inverse]


def score_dataset(embeddings: np.ndarray, dataset: DatasetInputs) -> dict[str, Any]:
    """P@1 (strict and ties), recall@5 and MRR of one dataset, with its meta-task, split and query count."""
    rows = [
        query_scores(embeddings, int(query), candidates)
        for query, candidates in zip(dataset.queries, dataset.candidates, strict=True)
    ]
    strict, ties = precision_at_1(rows)
    return {
        "p@1": strict,
        "p@1_ties": ties,
        f"recall@{RECALL_K}": recall_at_k(rows, RECALL_K),
        "mrr": mrr(rows),
        "meta_task": dataset.spec.meta_task,
        "split": dataset.spec.split,
        "format_rule": dataset.spec.format_rule.version,
        "n": len(rows),
    }


def score_datasets(
    cache: EmbeddingCache, collected: CollectedInputs, show_progress: bool = True
) -> dict[str, dict[str, Any]]:
    """:func:`score_dataset` of every dataset, each from its own rows read from the cache: memory holds one
    dataset's embeddings at a time, not the benchmark's."""
    per_dataset = {}
    for dataset in tqdm(collected.datasets, desc="scoring", unit="dataset", disable=not show_progress):
        ids = np.unique(np.concatenate([dataset.queries, *dataset.candidates]))
        embeddings = cache.get([collected.keys[i] for i in ids])
        # Renumber into the dataset's rows; equal ids stay equal, so ties are scored exactly as before.
        local = replace(dataset, queries=np.searchsorted(ids, dataset.queries),
                        candidates=[np.searchsorted(ids, c) for c in dataset.candidates])  # fmt: skip
        per_dataset[dataset.spec.name] = score_dataset(embeddings, local)
        del embeddings  # before the next dataset's rows arrive: one dataset in memory at a time
    return per_dataset


def template_settings(embedder: Embedder) -> dict[str, Any]:
    """Everything besides the weights that changes an embedding; part of the cache key."""
    import transformers

    image_processor = embedder.processor.image_processor
    return {
        "transformers": transformers.__version__,
        "processor": f"{type(embedder.processor).__name__}/{type(image_processor).__name__}",
        **attn_implementations(embedder),
        "coma_config": embedder.config.to_dict(),
        "dtype": str(next(embedder.model.parameters()).dtype),
        "image_block": embedder.adapter.image_block,
        "image_processor_size": dict(getattr(image_processor, "size", None) or {}),
        "vocab_size": len(embedder.processor.tokenizer),
        "token_ids": embedder.model.token_ids.tolist(),
    }


def attn_implementations(embedder: Embedder) -> dict[str, str]:
    """The attention implementations the language model and the vision tower run with (sdpa, eager, ...)."""
    backbone = embedder.model.backbone
    vision = str(embedder.adapter.vision_tower(backbone).config._attn_implementation)
    return {
        "attn_implementation": str(getattr(backbone.config, "_attn_implementation", None)),
        "vision_attn_implementation": PACKED_SDPA if vision == PACKED_VISION else vision,
    }


def backbone_config(embedder: Embedder) -> dict[str, Any]:
    """The backbone's config without fields that name where it was loaded from."""
    config = embedder.model.backbone.config.to_dict()
    return {
        key: value
        for key, value in config.items()
        if not key.startswith("_") and key != "transformers_version"
    }


def find_benchmark(data_dir: str | os.PathLike, datasets: Sequence[str] | None = None) -> Benchmark:
    """The benchmark under ``data_dir`` restricted to ``datasets``; none of its datasets present is an error."""
    benchmark = select(load_benchmark(data_dir), list(datasets) if datasets is not None else None)
    if not benchmark.datasets:
        raise FileNotFoundError(
            f"{data_dir}: none of the {len(benchmark.missing)} datasets of benchmark {benchmark.name!r} is present "
            f"(looked for folders {', '.join(benchmark.missing[:5])}, ...)"
        )
    return benchmark


def benchmark_notes(benchmark: Benchmark, collected: CollectedInputs) -> list[str]:
    """What reading found besides the rows: placeholder fixes and folders the benchmark does not declare."""
    notes = collected.placeholder_fixes.lines()
    if benchmark.extra:
        notes.append(f"not part of {benchmark.name}, not evaluated: {', '.join(benchmark.extra)}")
    return notes


def prepare_benchmark(
    data_dir: str | os.PathLike,
    image_root: str | os.PathLike | None,
    datasets: Sequence[str] | None = None,
    placeholder: str = "<|image_1|>",
    *,
    limit: int | None = None,
    skip_bad: bool = False,
    show_progress: bool = True,
    format_rule: str | None = None,
) -> tuple[Benchmark, CollectedInputs]:
    """Find the benchmark's datasets, read and check every row (:func:`collect_inputs`) and say what was fixed,
    skipped or left out; needs no model."""
    benchmark = find_benchmark(data_dir, datasets)
    main_rank = _distributed()[0] == 0
    collected = collect_inputs(benchmark, data_dir, image_root, placeholder, limit,
                               show_progress=show_progress and main_rank, skip_bad=skip_bad,
                               format_rule=format_rule)  # fmt: skip
    if main_rank:
        notes = benchmark_notes(benchmark, collected)
        if collected.problems:
            notes.append(collected.problems.skip_note("quer(ies)"))
        for line in notes:
            print(f"eval: {line}")
    return benchmark, collected


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def evaluate(
    embedder: Embedder,
    data_dir: str | os.PathLike,
    image_root: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    datasets: Sequence[str] | None = None,
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    *,
    max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS,
    num_workers: int = 0,
    limit: int | None = None,
    flush_every: int = 8,
    model_path: str | os.PathLike | None = None,
    skip_bad: bool = False,
    prepared: tuple[Benchmark, CollectedInputs] | None = None,
    format_rule: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``embedder`` on the benchmark under ``data_dir`` and write ``scores.{json,md,png}`` to ``out_dir``.

    Returns the scores dict (every rank gets it under ``torchrun``; only rank 0 writes the reports). Encode batches
    hold at most ``batch_size`` rows and ``max_batch_tokens`` padded tokens (``None``: rows only), collated by
    ``num_workers`` DataLoader worker processes (0: in this process). ``limit``
    keeps the first queries of each dataset; ``flush_every`` is how many encoded batches go into one cache shard;
    ``model_path`` is only recorded in the settings. Every row is checked before encoding; ``skip_bad`` leaves out
    (and counts) queries whose row or images are bad instead of stopping. Dataset folders under ``data_dir`` that
    the benchmark does not declare (the hub's ``CIFAR-100``) are listed as extra, not evaluated. ``prepared`` is
    :func:`prepare_benchmark`'s result when the caller read the data already (``coma eval`` does, before it loads
    the model).
    """
    started = time.perf_counter()
    rank, world_size = _distributed()
    progress = show_progress and rank == 0
    out_dir = Path(out_dir)
    if prepared is None:
        prepared = prepare_benchmark(data_dir, image_root, datasets, embedder.config.image_placeholder, limit=limit,
                                     skip_bad=skip_bad, show_progress=progress, format_rule=format_rule)  # fmt: skip
    benchmark, collected = prepared
    rules = sorted({d.spec.format_rule.version for d in collected.datasets})
    fingerprint = model_fingerprint(embedder.model, backbone_config(embedder))
    cache = EmbeddingCache(
        Path(cache_dir) if cache_dir is not None else out_dir / "cache",
        fingerprint,
        {**template_settings(embedder), "format_rules": rules},
        rank=rank,
        flush_every=flush_every,
    )
    n_missing = len(cache.missing(collected.keys))
    # Every rank has read the cache before any rank writes to it, so n_missing agrees across ranks.
    _barrier(world_size)
    encode_started = time.perf_counter()
    timings: dict[str, float] = {}
    encode_missing(embedder, collected, cache, image_root, batch_size, rank, world_size, show_progress=progress,
                   max_batch_tokens=max_batch_tokens, timings=timings, num_workers=num_workers)  # fmt: skip
    encode_seconds = time.perf_counter() - encode_started
    _barrier(world_size)
    scores: dict[str, Any] = {}
    if rank == 0:
        cache.refresh()
        per_dataset = score_datasets(cache, collected, show_progress=progress)
        config = embedder.config
        settings = {
            "pooling": config.pooling,
            "image_placeholder": config.image_placeholder,
            "min_pixels": config.min_pixels,
            "max_pixels": config.max_pixels,
            "dtype": str(next(embedder.model.parameters()).dtype).removeprefix("torch."),
            "template_version": config.template_version,
            **attn_implementations(embedder),
            "format_rule": ",".join(rules),
            "model_fingerprint": fingerprint,
            "model": str(model_path or embedder.model.backbone.name_or_path),
            "benchmark": benchmark.name,
            "data_dir": str(data_dir),
            "limit": limit,
            "batch_size": batch_size,
            "max_batch_tokens": max_batch_tokens,
            "num_workers": num_workers,
            "world_size": world_size,
            "n_inputs": collected.n_total,
            "n_unique_inputs": len(collected.inputs),
            "n_encoded": n_missing,
            "n_cached": len(collected.inputs) - n_missing,
            "encode_seconds": round(encode_seconds, 3),
            # Rank 0's split of its encode time: data preparation (plan + collate) against the model.
            "prepare_seconds": round(timings.get("plan", 0.0) + timings.get("collate", 0.0), 3),
            "model_seconds": round(timings.get("model", 0.0), 3),
            "seconds": round(time.perf_counter() - started, 3),
            "cache": str(cache.folder),
        }
        scores = {
            "datasets": per_dataset,
            **aggregate(per_dataset),
            "settings": settings,
            "missing": benchmark.missing,
            "extra": benchmark.extra,
            "placeholder_fixes": {f"{name}/{side}": count
                                  for (name, side), count in sorted(collected.placeholder_fixes.counts.items())},
            "skipped_queries": dict(sorted(collected.problems.by_dataset.items())),
        }  # fmt: skip
        write_reports(scores, out_dir)
    if world_size == 1:
        return scores
    box = [scores]
    dist.broadcast_object_list(box, src=0)
    return box[0]
