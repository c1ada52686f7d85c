"""Weighted dataset mixture in homogeneous blocks (DESIGN §2.3 "Sampling").

The global stream of examples is a sequence of blocks of ``block_size`` consecutive examples. Block ``n``
draws one subset with probability proportional to its weight and takes the next ``block_size`` items of
that subset's own permutation; the permutation for epoch ``e`` is derived from ``(seed, subset name, e)``
and a new one starts each time the subset is exhausted (so a subset smaller than a block simply spans
several epochs inside one block). Global batch ``k`` is items ``[k * G, (k + 1) * G)`` of the stream, with
``G = global_batch_size``.

When ``G`` is a multiple of ``block_size`` every batch holds whole blocks. Otherwise the stream is not cut:
a block may straddle two batches and continues in the next one, so block homogeneity and the mixture
proportions hold over the stream rather than per batch.

Every rank computes the whole global batch (cheap index arithmetic) and keeps its contiguous share, so
ranks are disjoint and their union is exactly the single-process batch. Subset choices and permutations
are derived from counters rather than from a running generator, so the resumable state is just the stream
position and one ``(epoch, offset)`` cursor per subset, and resuming never replays history.
"""

from __future__ import annotations

import hashlib
import math
import operator
from dataclasses import dataclass, field

import numpy as np

# Subset choices for this many consecutive blocks come from one Generator; part of the stream's definition.
_CHOICE_CHUNK = 1024
# Distinct first words keep the choice and permutation streams independent for the same seed.
_CHOICE_STREAM = 0
_PERMUTATION_STREAM = 1
_STATE_FORMAT = "coma.BlockMixtureSampler/1"


def _name_key(name: str) -> int:
    # Python's hash() is salted per process; a digest keeps permutations identical across runs and ranks.
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def _integer(name: str, value: object, minimum: int) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


@dataclass(eq=False)  # a stateful stream: identity, not field-wise equality
class BlockMixtureSampler:
    """Deterministic, resumable, rank-sharded weighted mixture of subsets in homogeneous blocks.

    ``subset_sizes`` maps subset name to the number of examples available (after any cap). ``weights`` maps a
    subset to its non-negative weight; ``None`` or an unlisted subset means weight 1.0, and a zero-weight
    subset is never drawn. Subsets are ordered by name internally, so the stream does not depend on dict
    order. A subset of size 0 is refused unless its weight is 0.
    """

    subset_sizes: dict[str, int]
    weights: dict[str, float] | None
    global_batch_size: int
    block_size: int = 64
    seed: int = 42
    rank: int = 0
    world_size: int = 1

    _names: tuple[str, ...] = field(init=False, repr=False)
    _sizes: dict[str, int] = field(init=False, repr=False)
    _resolved_weights: dict[str, float] = field(init=False, repr=False)
    _active: tuple[str, ...] = field(init=False, repr=False)
    _cdf: np.ndarray = field(init=False, repr=False)
    _position: int = field(init=False, repr=False, default=0)
    _cursors: dict[str, list[int]] = field(init=False, repr=False)
    _permutations: dict[str, tuple[int, np.ndarray]] = field(init=False, repr=False)
    _choices: tuple[int, np.ndarray] | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        self.global_batch_size = _integer("global_batch_size", self.global_batch_size, 1)
        self.block_size = _integer("block_size", self.block_size, 1)
        self.world_size = _integer("world_size", self.world_size, 1)
        self.rank = _integer("rank", self.rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if self.global_batch_size % self.world_size:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be divisible by "
                f"world_size ({self.world_size})"
            )
        self.seed = _integer("seed", self.seed, 0)
        if not self.subset_sizes:
            raise ValueError("subset_sizes is empty: the mixture needs at least one subset")
        if not all(isinstance(name, str) for name in self.subset_sizes):
            raise ValueError(f"subset_sizes: subset names must be strings, got {list(self.subset_sizes)}")
        self._names = tuple(sorted(self.subset_sizes))
        self._sizes = {
            name: _integer(f"subset_sizes[{name!r}]", self.subset_sizes[name], 0) for name in self._names
        }
        self._resolved_weights = self._resolve_weights()
        for name in self._names:
            if self._sizes[name] == 0 and self._resolved_weights[name] > 0:
                raise ValueError(
                    f"subset_sizes[{name!r}] is 0: subset {name!r} is empty but has weight "
                    f"{self._resolved_weights[name]}; give it weight 0 or remove it"
                )
        self._active = tuple(name for name in self._names if self._resolved_weights[name] > 0)
        weights = np.array([self._resolved_weights[name] for name in self._active], dtype=np.float64)
        cdf = np.cumsum(weights / weights.sum())
        cdf[-1] = 1.0  # uniforms lie in [0, 1), so searchsorted can never run past the last active subset
        self._cdf = cdf
        self._cursors = {name: [0, 0] for name in self._names}
        self._permutations = {}

    def _resolve_weights(self) -> dict[str, float]:
        given = self.weights or {}
        unknown = sorted(set(given) - set(self.subset_sizes))
        if unknown:
            raise ValueError(f"weights name unknown subsets {unknown}; known subsets: {list(self._names)}")
        resolved = {}
        for name in self._names:
            weight = float(given.get(name, 1.0))
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"weights[{name!r}] must be finite and non-negative, got {weight}")
            resolved[name] = weight
        if not any(weight > 0 for weight in resolved.values()):
            raise ValueError("weights: at least one subset needs a positive weight")
        return resolved

    def _block_subset(self, block: int) -> str:
        chunk, offset = divmod(block, _CHOICE_CHUNK)
        if self._choices is None or self._choices[0] != chunk:
            rng = np.random.default_rng([self.seed, _CHOICE_STREAM, chunk])
            self._choices = (chunk, np.searchsorted(self._cdf, rng.random(_CHOICE_CHUNK), side="right"))
        return self._active[int(self._choices[1][offset])]

    def _permutation(self, name: str, epoch: int) -> np.ndarray:
        cached = self._permutations.get(name)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, _PERMUTATION_STREAM, _name_key(name), epoch])
            cached = (epoch, rng.permutation(self._sizes[name]))
            self._permutations[name] = cached
        return cached[1]

    def _take(self, name: str, count: int) -> list[int]:
        """The next ``count`` indices of subset ``name``, advancing its cursor across epochs."""
        size = self._sizes[name]
        epoch, offset = self._cursors[name]
        taken: list[int] = []
        while count:
            n = min(count, size - offset)
            taken.extend(self._permutation(name, epoch)[offset : offset + n].tolist())
            offset += n
            count -= n
            if offset == size:
                epoch, offset = epoch + 1, 0
        self._cursors[name] = [epoch, offset]
        return taken

    def next_batch(self) -> list[tuple[str, int]]:
        """This rank's share of the next global batch, as ``(subset, index)`` pairs."""
        position, end = self._position, self._position + self.global_batch_size
        batch: list[tuple[str, int]] = []
        while position < end:
            block = position // self.block_size
            stop = min((block + 1) * self.block_size, end)
            name = self._block_subset(block)
            batch.extend((name, index) for index in self._take(name, stop - position))
            position = stop
        self._position = end
        share = self.global_batch_size // self.world_size
        return batch[self.rank * share : (self.rank + 1) * share]

    def _identity(self) -> dict:
        """Everything that defines the stream; a resumed sampler must agree on all of it."""
        return {
            "seed": self.seed,
            "block_size": self.block_size,
            "subset_sizes": dict(self._sizes),
            "weights": dict(self._resolved_weights),
        }

    def state_dict(self) -> dict:
        """JSON-serialisable position in the stream (independent of rank, world size and batch size)."""
        return {
            "format": _STATE_FORMAT,
            **self._identity(),
            "position": self._position,
            "cursors": {name: list(self._cursors[name]) for name in self._names},
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly where ``state`` was taken; refuses a state from a differently configured stream."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(
                f"sampler state: field 'format' is {state.get('format')!r}, expected {_STATE_FORMAT!r}"
            )
        for key, expected in self._identity().items():
            if state.get(key) != expected:
                raise ValueError(
                    f"sampler state: field {key!r} is {state.get(key)!r} but this sampler has {expected!r}"
                )
        position = state.get("position")
        if not isinstance(position, int) or position < 0:
            raise ValueError(
                f"sampler state: field 'position' must be a non-negative integer, got {position!r}"
            )
        cursors = state.get("cursors")
        if not isinstance(cursors, dict) or sorted(cursors) != list(self._names):
            raise ValueError(
                f"sampler state: field 'cursors' must map exactly the subsets {list(self._names)}"
            )
        for name in self._names:
            cursor = cursors[name]
            size = self._sizes[name]
            valid = (
                isinstance(cursor, list)
                and len(cursor) == 2
                and all(isinstance(value, int) for value in cursor)
                and cursor[0] >= 0
                and 0 <= cursor[1] < max(size, 1)
            )
            if not valid:
                raise ValueError(
                    f"sampler state: field 'cursors'[{name!r}] must be [epoch, offset], got {cursor!r}"
                )
        self._position = position
        self._cursors = {name: list(cursors[name]) for name in self._names}
