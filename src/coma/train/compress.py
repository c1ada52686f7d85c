"""Stage 1 — compression pre-training with the attention bottleneck (DESIGN §2.2).

Also the demo's "stage 0" (``layout: chat``): plain instruction tuning that turns a random tiny model into a VLM.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from coma.data.formats import Conversation, DataCheckError, DataFormatError, ProblemLog, read_conversations
from coma.data.images import image_path_problem
from coma.data.pipeline import SampledBatches, resolve_num_workers, to_device
from coma.data.sampling import BlockMixtureSampler
from coma.train.config import LoraSettings, TrainSettings
from coma.train.loop import DistInfo, StepResult, distinct_count, scale_gradients
from coma.train.setup import StageTask, load_trainable_embedder
from coma.train.stage1_data import Stage1Collator
from coma.train.stage1_model import Stage1Objective

LOSS_REDUCTIONS = ("sample", "token")


@dataclass
class CompressConfig:
    model: str = field(default="", metadata={"help": "VLM folder or hub id (compression tokens are added)"})
    data: list[str] | str = field(
        default_factory=list, metadata={"help": "conversation file(s), JSON or JSONL: a.jsonl,b.jsonl"}
    )
    data_weights: list[float] | None = field(
        default=None, metadata={"help": "mixing weight per data file: 1,0.5"}
    )
    image_root: str | None = None
    out: str = ""
    num_tokens: int | None = field(default=None, metadata={"help": "T (default 32, or the model folder's)"})
    mask_mode: str = field(default="bottleneck", metadata={"help": "bottleneck | none | split_layer"})
    split_layer: int | None = None
    bidirectional_c: bool = False
    supervise: str = field(default="answers", metadata={"help": "answers | dialogue"})
    # `sample` by default: the paper's code trains with micro-batch 1 and averages the micro-batches' token means,
    # so each sample weighs the same however long its answers are; `sample` reproduces that at any micro-batch size.
    loss_reduction: str = field(
        default="sample",
        metadata={
            "help": "sample (mean over the global batch's samples of each sample's token mean) | token (token "
            "mean over the global batch)"
        },
    )
    layout: str = field(
        default="compress", metadata={"help": "compress | chat (plain SFT, the demo's stage 0)"}
    )
    max_length: int = 8192
    min_pixels: int | None = None
    max_pixels: int | None = None
    skip_bad: bool = field(
        default=False, metadata={"help": "skip and count malformed rows and missing or unreadable images"}
    )
    train: TrainSettings = field(default_factory=TrainSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]

    def validate(self) -> None:
        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise ValueError(f"coma compress needs --{name}")
        if self.data_weights is not None and len(self.data_weights) != len(self.data):
            raise ValueError(f"{len(self.data_weights)} data weights for {len(self.data)} data files")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(
                f"unknown loss_reduction {self.loss_reduction!r}; choose one of {', '.join(LOSS_REDUCTIONS)}"
            )
        if self.train.global_batch_size % self.train.micro_batch_size:
            raise ValueError(
                "global_batch_size must be a multiple of micro_batch_size (times the process count)"
            )


def read_sources(
    paths: list[str], image_root: str | None, problems: ProblemLog
) -> dict[str, list[Conversation]]:
    """Every conversation file by its sampler name, each row parsed and each image path resolved (bad rows go to
    ``problems``), so a broken row stops the run before the model loads rather than hours in."""
    sources: dict[str, list[Conversation]] = {}
    verdicts: dict[str, str | None] = {}
    for index, path in enumerate(paths):
        kept = []
        for conv in read_conversations(path, problems=problems):
            if conv.image and conv.image not in verdicts:
                verdicts[conv.image] = image_path_problem(conv.image, image_root)
            if conv.image and verdicts[conv.image]:
                problems.add(
                    DataFormatError(conv.source, conv.row, "image", verdicts[conv.image]), Path(path).name
                )
                continue
            kept.append(conv)
        if not kept and not problems:
            raise ValueError(f"{path}: no conversation records")
        sources[source_name(index, path)] = kept
    return sources


def source_name(index: int, path: str) -> str:
    """The sampler's name for a data file. The sampler seeds its permutations by name, so the name leaves out the
    folder: the same files give the same training order wherever they are stored (and a run resumes after a move).
    """
    return f"{index}:{Path(path).name}"


class CompressTask(StageTask):
    """Stage-1 training task for :func:`coma.train.loop.train`."""

    def __init__(self, config: CompressConfig, dist_info: DistInfo, with_data: bool = True) -> None:
        self.config = config
        self.dist_info = dist_info
        if with_data:
            # Read and checked before the model loads, so a bad row fails in seconds.
            self.problems = ProblemLog()
            self.sources = read_sources(config.data, config.image_root, self.problems)
            if self.problems and not config.skip_bad:
                raise DataCheckError(self.problems, ", ".join(config.data))
        four_d_mask = config.mask_mode != "none" or config.bidirectional_c
        self.embedder = load_trainable_embedder(config, dist_info, generative=True, four_d_mask=four_d_mask)
        self.module: nn.Module = Stage1Objective(
            self.embedder.model.backbone,
            self.embedder.adapter,
            mask_mode=config.mask_mode,
            split_layer=config.split_layer,
            bidirectional_c=config.bidirectional_c,
            # Sums here; step() divides by the global batch's samples or tokens once all ranks have counted them.
            reduction="sample_sum" if config.loss_reduction == "sample" else "sum",
        )
        self.total_steps = 0
        if not with_data:
            return
        if self.problems and dist_info.is_main:
            print(f"compress: skipped {self.problems.count:,} bad record(s) (--skip-bad)")
        weights = dict(zip(self.sources, config.data_weights, strict=True)) if config.data_weights else None
        # Block size 1: each example is drawn from a file chosen by weight.
        self.sources = {name: records for name, records in self.sources.items() if records}
        if not self.sources:
            raise ValueError(f"{', '.join(config.data)}: no usable conversation records")
        self.sampler = BlockMixtureSampler(
            subset_sizes={name: len(records) for name, records in self.sources.items()},
            weights=weights,
            global_batch_size=config.train.global_batch_size,
            block_size=1,
            seed=config.train.seed,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
        )
        collator = Stage1Collator(
            self.embedder.processor,
            self.embedder.config,
            skip_bad=config.skip_bad,
            image_root=config.image_root,
            max_length=config.max_length,
            supervise=config.supervise,
            layout=config.layout,
            image_block=self.embedder.adapter.image_block,
        )
        total = sum(len(records) for records in self.sources.values())
        self.total_steps = config.train.max_steps or max(
            1, math.ceil(config.train.num_epochs * total / config.train.global_batch_size)
        )
        self.batches = SampledBatches(
            self.sampler,
            PrepareConversations(collator, config.train.micro_batch_size),
            make_job=self._records,
            steps=self.total_steps,
            num_workers=resolve_num_workers(config.train.num_workers),
        )
        self.skipped_rows: set[tuple[str, int]] = set()

    def _records(self, keys: list[tuple[str, int]]) -> list[Conversation]:
        return [self.sources[name][index] for name, index in keys]

    def step(self, module: nn.Module, no_sync: Callable[[], AbstractContextManager]) -> StepResult:
        started = time.perf_counter()
        prepared = self.batches.next()
        data_wait = time.perf_counter() - started
        self.skipped_rows |= prepared.skipped
        device = self.dist_info.device
        loss_sum, count, tokens, dropped = 0.0, 0, 0, 0
        per_sample = self.config.loss_reduction == "sample"
        for index, batch in enumerate(prepared.batches):
            dropped += int(batch.pop("dropped", 0))
            batch.pop("dropped_turns", None)
            batch = to_device(batch, device)
            last = index == len(prepared.batches) - 1
            with nullcontext() if last else no_sync():
                output = module(batch)
                output.loss.backward()
            loss_sum += float(output.loss.detach())
            count += output.supervised_samples if per_sample else output.supervised_tokens
            tokens += int(output.total_tokens)
        if self.dist_info.distributed:
            reduced = torch.tensor([loss_sum, count, dropped], dtype=torch.float64, device=device)
            dist.all_reduce(reduced)
            loss_sum, count, dropped = float(reduced[0]), int(reduced[1]), int(reduced[2])
        # The gradients hold the sum over the global batch, averaged over ranks by DDP / FSDP: rescale to the mean.
        scale_gradients(module, self.dist_info.world_size / max(count, 1))
        loss = loss_sum / max(count, 1)
        skipped = self.problems.count
        if self.config.skip_bad:
            skipped += distinct_count(self.skipped_rows, self.dist_info)
        return StepResult(
            loss=loss,
            samples=prepared.samples,
            tokens=tokens,
            extra={"dropped": dropped, "skipped_rows": skipped, "data_wait_s": data_wait},
        )


@dataclass
class Stage1Step:
    """One step's micro-batches, collated (``Stage1Collator``'s dicts), and the rows skipped so far."""

    batches: list[dict]
    samples: int
    skipped: frozenset[tuple[str, int]]


class PrepareConversations:
    """A step's conversations -> its collated micro-batches; runs in a DataLoader worker (no model)."""

    def __init__(self, collator: Stage1Collator, micro_batch_size: int) -> None:
        self.collator = collator
        self.micro_batch_size = micro_batch_size

    def __call__(self, records: list[Conversation]) -> Stage1Step:
        micro = self.micro_batch_size
        batches = [self.collator(records[start : start + micro]) for start in range(0, len(records), micro)]
        return Stage1Step(batches, len(records), frozenset(self.collator.skipped_rows))
