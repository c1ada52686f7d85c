"""Stage 2 — contrastive matching on MMEB-train pairs (DESIGN §2.3)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from coma.config import ComaConfig
from coma.data.formats import TrainPair
from coma.data.pipeline import EncodeCollator, SampledBatches, resolve_num_workers
from coma.data.sampling import BlockMixtureSampler
from coma.losses import ContrastiveLoss
from coma.train.config import LoraSettings, TrainSettings
from coma.train.loop import DistInfo, StepResult, distinct_count
from coma.train.parallel import resolve_strategy
from coma.train.setup import StageTask, load_trainable_embedder
from coma.train.stage2_data import IMAGE_CACHE_BYTES, PairCollator, PairDataset
from coma.train.stage2_step import ChunkPlan, ContrastiveStep, PreparedStep, needs_dummy_image


@dataclass
class MatchConfig:
    model: str = field(default="", metadata={"help": "merged stage-1 folder, or any VLM folder / hub id"})
    data: str = field(default="", metadata={"help": "MMEB-train root: one folder per subset"})
    image_root: str | None = field(
        default=None, metadata={"help": "root of the image paths (default: --data)"}
    )
    out: str = ""
    subsets: list[str] | None = field(
        default=None, metadata={"help": "subset folders to train on: a,b,c (default: every subset of --data)"}
    )
    weights: dict[str, float] | None = field(
        default=None, metadata={"help": "mixing weight per subset: a=2,b=0.5 (default 1 each)"}
    )
    caps: dict[str, int] | None = field(
        default=None, metadata={"help": "num_sample_per_subset: first N rows, a=10000,b=20000"}
    )
    split: str | None = field(
        default=None,
        metadata={"help": "original | diverse_instruction | train (default: original where present)"},
    )
    skip_bad: bool = field(
        default=False, metadata={"help": "skip and count rows whose image is missing or unreadable"}
    )
    block_size: int = 64
    temperature: float = 0.03
    symmetric: bool = False
    hard_negatives: bool = False
    grad_cache: bool = True
    query_chunk_size: int | None = 8
    target_chunk_size: int | None = 8
    num_tokens: int | None = None
    pooling: str | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    train: TrainSettings = field(
        default_factory=lambda: TrainSettings(global_batch_size=1024, max_steps=1500)
    )
    lora: LoraSettings = field(default_factory=LoraSettings)

    def validate(self) -> None:
        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise ValueError(f"coma match needs --{name}")


class MatchTask(StageTask):
    """Stage-2 training task for :func:`coma.train.loop.train`."""

    def __init__(self, config: MatchConfig, dist_info: DistInfo, with_data: bool = True) -> None:
        self.config = config
        self.dist_info = dist_info
        self.total_steps = 0
        image_root = config.image_root or config.data
        if with_data:
            # The data is read and checked before the model loads: a bad row fails in seconds, not after 7B weights.
            saved = ComaConfig.load(config.model) if Path(config.model).is_dir() else None
            self.dataset = PairDataset.from_config(
                config.data, subsets=config.subsets, weights=config.weights, caps=config.caps, split=config.split,
                image_placeholder=(saved or ComaConfig()).image_placeholder, image_root=image_root,
                skip_bad=config.skip_bad, show_progress=config.train.show_progress and dist_info.is_main,
            )  # fmt: skip
            if dist_info.is_main:
                report = self.dataset.report
                for line in [*report.lines(), *([report.problems.skip_note()] if report.problems else [])]:
                    print(f"match: {line}")
        self.embedder = load_trainable_embedder(config, dist_info, pooling=config.pooling)
        self.module: nn.Module = self.embedder.model
        if not with_data:
            return
        self.sampler = BlockMixtureSampler(
            subset_sizes=self.dataset.subset_sizes,
            weights=self.dataset.weights,
            global_batch_size=config.train.global_batch_size,
            block_size=config.block_size,
            seed=config.train.seed,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
        )
        self.step_fn = ContrastiveStep(
            self.module,
            ContrastiveLoss(temperature=config.temperature, symmetric=config.symmetric),
            query_chunk_size=config.query_chunk_size,
            target_chunk_size=config.target_chunk_size,
            use_grad_cache=config.grad_cache,
            dummy_image=needs_dummy_image(
                self.module, dist_info.distributed, resolve_strategy(config.train.strategy)
            ),
        )
        self.total_steps = config.train.max_steps or math.ceil(
            config.train.num_epochs * len(self.dataset) / config.train.global_batch_size
        )
        workers = resolve_num_workers(config.train.num_workers)
        # The decoded-image cache lives in each worker: one budget shared among them.
        collator = PairCollator(
            EncodeCollator.from_embedder(self.embedder, image_root),
            image_root,
            image_cache_bytes=IMAGE_CACHE_BYTES // max(workers, 1),
            skip_bad=config.skip_bad,
        )
        self.batches = SampledBatches(
            self.sampler,
            PreparePairs(collator, self.step_fn.plan, config.hard_negatives),
            make_job=self.dataset.get_many,
            steps=self.total_steps,
            num_workers=workers,
        )
        self.skipped_rows: set[tuple[str, int]] = set()

    def step(self, module: nn.Module, no_sync: Callable[[], AbstractContextManager]) -> StepResult:
        started = time.perf_counter()
        prepared, skipped = self.batches.next()
        data_wait = time.perf_counter() - started
        result = self.step_fn.run(prepared, no_sync, model=module)
        self.skipped_rows |= skipped
        skipped_rows = distinct_count(self.skipped_rows, self.dist_info) if self.config.skip_bad else 0
        return StepResult(
            loss=float(result["loss"]),
            samples=int(result["n"]),
            tokens=int(result.get("tokens", 0)),
            extra={
                "accuracy": float(result["accuracy"]),
                "skipped_rows": self.dataset.report.problems.count + skipped_rows,
                "data_wait_s": data_wait,
            },
        )


class PreparePairs:
    """A step's pairs -> its collated chunks (:meth:`ChunkPlan.prepare`) and the rows skipped so far; runs in a
    DataLoader worker, so it holds the collator (processor, image cache), never the model."""

    def __init__(self, collator: PairCollator, plan: ChunkPlan, hard_negatives: bool) -> None:
        self.collator = collator
        self.plan = plan
        self.hard_negatives = hard_negatives

    def __call__(self, pairs: list[TrainPair]) -> tuple[PreparedStep, frozenset[tuple[str, int]]]:
        inputs = self.collator.inputs(pairs)
        negatives = inputs.negatives if self.hard_negatives else None
        prepared = self.plan.prepare(inputs.queries, inputs.targets, negatives, self.collator.collate)
        return prepared, frozenset(self.collator.skipped_rows)
