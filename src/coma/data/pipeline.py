"""The input pipeline: batches prepared (image decode, processor) in ``DataLoader`` worker processes, in order.

The main process decides *what* goes into each batch (the training sampler, an eval/encode batch plan); workers only
*prepare* it. :class:`BatchPipeline` maps a ``prepare`` function over an ordered stream of jobs, ``num_workers``
processes running ahead of the consumer by ``prefetch`` jobs each, results coming back in job order and pinned when
CUDA is available; :func:`to_device` then copies a batch with ``non_blocking=True``. ``num_workers=0`` prepares each
job in the calling process when it is consumed (no look-ahead: the in-process path).

Eval / encode (an ordered list of ``EncodeInput`` batches)::

    collate = EncodeCollator.from_embedder(embedder, image_root)
    pipeline = BatchPipeline(collate, num_workers=resolve_num_workers(None))
    for batch in pipeline(batches):                  # batches: list[list[EncodeInput]], consumed in this order
        embeddings = embedder.model(to_device(batch, embedder.device))

``prepare`` runs in the workers: it must not touch the model or CUDA, and it must be picklable where workers are
spawned rather than forked (macOS, Windows): a module-level function, a ``functools.partial`` or an object such as
:class:`EncodeCollator` (which holds the processor, not the model).

Training (:class:`SampledBatches`): the main process draws each step's keys from the sampler (so the sampler alone
owns the order, rank by rank) and the workers collate them; the data position it reports is the sampler's state after
the last *consumed* step, not after the last prefetched one, so a checkpoint resumes exactly.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, Protocol, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from coma.compression import embedding_text
from coma.config import ComaConfig
from coma.data.images import load_image

__all__ = [
    "BatchPipeline",
    "EncodeCollator",
    "SampledBatches",
    "default_num_workers",
    "pin_memory",
    "resolve_num_workers",
    "to_device",
]

Job = TypeVar("Job")
Batch = TypeVar("Batch")
# Worker processes per rank at most: beyond this the processor is rarely the bottleneck and memory adds up.
MAX_DEFAULT_WORKERS = 8


def default_num_workers() -> int:
    """Worker processes per rank: the usable CPUs shared by the ranks of this machine, one left to each rank's main
    process, at most :data:`MAX_DEFAULT_WORKERS`."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(MAX_DEFAULT_WORKERS, cpus // max(ranks_here, 1) - 1))


def resolve_num_workers(setting: int | None) -> int:
    """``setting`` itself, or :func:`default_num_workers` for None."""
    if setting is None:
        return default_num_workers()
    if setting < 0:
        raise ValueError(f"num_workers must be >= 0, got {setting}")
    return setting


def _map_tensors(tree: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``tree`` with ``fn`` applied to every tensor inside dicts, lists, tuples and dataclasses (rebuilt, not mutated)."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return type(tree)((key, _map_tensors(value, fn)) for key, value in tree.items())
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_tensors(value, fn) for value in tree)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        changes = {
            f.name: _map_tensors(getattr(tree, f.name), fn) for f in dataclasses.fields(tree) if f.init
        }
        return dataclasses.replace(tree, **changes)
    return tree


def pin_memory(tree: Any) -> Any:
    """``tree`` with every CPU tensor in page-locked memory (so a later ``non_blocking`` copy is asynchronous)."""
    return _map_tensors(tree, lambda tensor: tensor.pin_memory() if tensor.device.type == "cpu" else tensor)


def to_device(tree: Any, device: torch.device | str) -> Any:
    """``tree`` with every tensor on ``device``, copied with ``non_blocking=True`` (asynchronous from pinned memory)."""
    return _map_tensors(tree, lambda tensor: tensor.to(device, non_blocking=True))


class _Prepared:
    """A worker's result on its way back; DataLoader's pin-memory thread calls :meth:`pin_memory` on it."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def pin_memory(self) -> _Prepared:
        return _Prepared(pin_memory(self.value))


class _PrepareJobs(Dataset):
    """A "dataset" whose index is the job itself: ``dataset[job]`` prepares it (in a worker)."""

    def __init__(self, prepare: Callable[[Any], Any]) -> None:
        self.prepare = prepare

    def __getitem__(self, job: Any) -> _Prepared:
        return _Prepared(self.prepare(job))


class _JobStream(Sampler):
    """Yields the jobs themselves; DataLoader iterates it in the main process, ahead of consumption."""

    def __init__(self, jobs: Iterable[Any]) -> None:
        self.jobs = jobs

    def __iter__(self) -> Iterator[Any]:
        return iter(self.jobs)


def _unbatched(item: Any) -> Any:
    return item


class BatchPipeline(Generic[Job, Batch]):
    """``prepare`` mapped over a stream of jobs in ``num_workers`` DataLoader worker processes, results in job order.

    ``prefetch``: jobs each worker prepares ahead. ``pin``: pin results for asynchronous host-to-device copies
    (default: when CUDA is available). Iterating a pipeline draws jobs ``num_workers * prefetch`` ahead of what the
    consumer has taken; with ``num_workers=0`` a job is drawn and prepared only when it is consumed.
    """

    def __init__(
        self,
        prepare: Callable[[Job], Batch],
        num_workers: int,
        prefetch: int = 2,
        pin: bool | None = None,
    ) -> None:
        if num_workers < 0 or prefetch < 1:
            raise ValueError(f"need num_workers >= 0 and prefetch >= 1, got {num_workers} and {prefetch}")
        self.prepare = prepare
        self.num_workers = num_workers
        self.prefetch = prefetch
        self.pin = torch.cuda.is_available() if pin is None else pin

    def __call__(self, jobs: Iterable[Job]) -> Iterator[Batch]:
        if self.num_workers == 0:
            for job in jobs:
                batch = self.prepare(job)
                yield pin_memory(batch) if self.pin else batch
            return
        # A forked worker inherits a tokenizer that may have used its thread pool; without this the Rust tokenizer
        # warns in every worker (and turns its parallelism off there anyway).
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        loader = DataLoader(
            _PrepareJobs(self.prepare),
            batch_size=None,
            sampler=_JobStream(jobs),
            num_workers=self.num_workers,
            collate_fn=_unbatched,
            pin_memory=self.pin,
            prefetch_factor=self.prefetch,
            # Worker seeds come from this generator, not the global one: starting a pipeline must not move the
            # training RNG (dropout), or a resumed run would differ from the uninterrupted one.
            generator=torch.Generator().manual_seed(0),
        )
        for prepared in loader:
            yield prepared.value


class EmbedderLike(Protocol):
    """What :meth:`EncodeCollator.from_embedder` reads from an ``Embedder``."""

    processor: Any
    padding_side: str

    @property
    def config(self) -> ComaConfig: ...

    @property
    def adapter(self) -> Any: ...


@dataclasses.dataclass
class EncodeCollator:
    """``list[EncodeInput] -> processor batch``, as ``Embedder.collate`` makes it, without holding the model.

    Texts are formatted with the image block and the compression tokens (:func:`coma.compression.embedding_text`);
    images are decoded here (in the worker) from paths resolved under ``image_root``.
    """

    processor: Any
    config: ComaConfig
    image_block: str
    padding_side: str = "right"
    image_root: str | os.PathLike | None = None

    @classmethod
    def from_embedder(
        cls, embedder: EmbedderLike, image_root: str | os.PathLike | None = None
    ) -> EncodeCollator:
        return cls(
            embedder.processor,
            embedder.config,
            embedder.adapter.image_block,
            embedder.padding_side,
            image_root,
        )

    def collate(self, items: Sequence[Any], image_root: str | os.PathLike | None = None) -> dict:
        """Processor batch of ``items`` (``EncodeInput``); ``image_root`` overrides the collator's."""
        root = self.image_root if image_root is None else image_root
        texts, images = [], []
        for item in items:
            texts.append(embedding_text(item.text, item.image is not None, self.config, self.image_block))
            if item.image is not None:
                images.append(load_image(item.image, root))
        batch = self.processor(
            text=texts,
            images=images or None,
            return_tensors="pt",
            padding=True,
            padding_side=self.padding_side,
        )
        return dict(batch)

    def __call__(self, items: Sequence[Any]) -> dict:
        return self.collate(items)


class KeySampler(Protocol):
    """A resumable stream of per-step keys (:class:`coma.data.sampling.BlockMixtureSampler`)."""

    global_batch_size: int

    def next_batch(self) -> list: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class _WithState:
    """Prepares a ``(job, sampler state)`` pair, passing the state through to the consumer."""

    def __init__(self, prepare: Callable[[Any], Any]) -> None:
        self.prepare = prepare

    def __call__(self, job_and_state: tuple[Any, dict]) -> tuple[Any, dict]:
        job, state = job_and_state
        return self.prepare(job), state


class SampledBatches(Generic[Batch]):
    """One prepared training batch per step, in the sampler's order, prepared ahead in DataLoader workers.

    The main process calls ``sampler.next_batch()`` for each step and ``make_job(keys)`` on its result (e.g. looking
    the keys up in the in-memory dataset); workers run ``prepare(job)``. :meth:`state_dict` is the sampler's state
    after the last batch :meth:`next` returned, however far the workers have run ahead, so a checkpoint taken after a
    step resumes at the next one. ``steps``: how many steps the run has in all (the sampler's position says how many
    are done), so nothing is prepared past the end.
    """

    def __init__(
        self,
        sampler: KeySampler,
        prepare: Callable[[Any], Batch],
        *,
        make_job: Callable[[list], Any] = _unbatched,
        steps: int | None = None,
        num_workers: int = 0,
        prefetch: int = 2,
        pin: bool | None = None,
    ) -> None:
        self.sampler = sampler
        self.make_job = make_job
        self.steps = steps
        self.pipeline = BatchPipeline(_WithState(prepare), num_workers, prefetch, pin)
        self._state = sampler.state_dict()
        self._batches: Iterator[tuple[Batch, dict]] | None = None

    def _steps_done(self, state: dict) -> int:
        return state["position"] // self.sampler.global_batch_size

    def _jobs(self) -> Iterator[tuple[Any, dict]]:
        while self.steps is None or self._steps_done(self.sampler.state_dict()) < self.steps:
            keys = self.sampler.next_batch()
            yield self.make_job(keys), self.sampler.state_dict()

    def next(self) -> Batch:
        """The next step's prepared batch."""
        if self._batches is None:
            self._batches = self.pipeline(self._jobs())
        try:
            batch, self._state = next(self._batches)
        except StopIteration:
            self.close()
            raise RuntimeError(f"the run has {self.steps} steps; no batch left after the last one") from None
        if self.steps is not None and self._steps_done(self._state) >= self.steps:
            self.close()  # the last step: free the workers now, not when the task is collected
        return batch

    def state_dict(self) -> dict:
        """The sampler's state after the last consumed step (what a checkpoint saves)."""
        return self._state

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``: batches prepared ahead are discarded and the stream restarts there."""
        self.close()
        self.sampler.load_state_dict(state)
        self._state = self.sampler.state_dict()

    def close(self) -> None:
        """Stop the workers (a later :meth:`next` starts them again from the consumed position)."""
        if self._batches is not None:
            self._batches.close()
            self._batches = None
            self.sampler.load_state_dict(self._state)
