from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from coma.gradcache import RngState, grad_cache_step, split_into_chunks
from coma.losses import ContrastiveLoss, info_nce

_IN, _HIDDEN, _OUT = 6, 16, 8


class _Tower(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(_IN, _HIDDEN), nn.Dropout(dropout), nn.Linear(_HIDDEN, _OUT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


def _batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, _IN, generator=g)}


def _encoder(model: nn.Module) -> Callable[[int, Any], torch.Tensor]:
    # Groups share the tower, as queries and targets share the VLM; the scale makes the groups differ.
    return lambda g, chunk: model(chunk["x"] * (1.0 + g))


def _loss(reps: list[torch.Tensor]) -> torch.Tensor:
    return info_nce(reps[0], reps[1], temperature=0.1, negatives=reps[2] if len(reps) > 2 else None)


def _plain_step(groups: Sequence[Sequence[Any]], encode, loss_fn) -> torch.Tensor:
    """Reference: encode every chunk with grad in GradCache's order, then one loss and one backward."""
    reps = [torch.cat([encode(g, chunk) for chunk in chunks]) for g, chunks in enumerate(groups)]
    loss = loss_fn(reps)
    loss.backward()
    return loss.detach()


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_same_grads(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-5), name


def _groups(batches: list[dict[str, torch.Tensor]], chunk_size: int) -> list[list[Any]]:
    return [split_into_chunks(batch, chunk_size) for batch in batches]


def _run_both(model, groups, loss_fn, seed=7):
    """(loss, grads, RNG state afterwards) for GradCache and for the plain step, from the same seed."""
    encode = _encoder(model)
    torch.manual_seed(seed)
    cached_loss = grad_cache_step(groups, encode, loss_fn)
    cached = (cached_loss, _grads(model), torch.get_rng_state())
    torch.manual_seed(seed)
    plain_loss = _plain_step(groups, encode, loss_fn)
    return cached, (plain_loss, _grads(model), torch.get_rng_state())


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 8])
def test_matches_plain_step_with_dropout(chunk_size: int) -> None:
    model = _Tower(dropout=0.1).train()
    groups = _groups([_batch(7, seed=1), _batch(7, seed=2)], chunk_size)
    (loss, grads, rng), (plain_loss, plain_grads, plain_rng) = _run_both(model, groups, _loss)
    assert torch.allclose(loss, plain_loss, atol=1e-6)
    _assert_same_grads(grads, plain_grads)
    assert torch.equal(rng, plain_rng)


def test_dropout_is_live_so_the_match_is_not_vacuous() -> None:
    model = _Tower(dropout=0.1).train()
    groups = _groups([_batch(7, seed=1), _batch(7, seed=2)], 3)
    encode = _encoder(model)
    torch.manual_seed(1)
    _plain_step(groups, encode, _loss)
    first = _grads(model)
    torch.manual_seed(2)
    _plain_step(groups, encode, _loss)
    second = _grads(model)
    assert not torch.allclose(first["net.0.weight"], second["net.0.weight"], atol=1e-5)


def test_with_negatives_as_third_group() -> None:
    model = _Tower(dropout=0.1).train()
    groups = _groups([_batch(5, seed=1), _batch(5, seed=2), _batch(4, seed=3)], 2)
    (loss, grads, rng), (plain_loss, plain_grads, plain_rng) = _run_both(model, groups, _loss)
    assert torch.allclose(loss, plain_loss, atol=1e-6)
    _assert_same_grads(grads, plain_grads)
    assert torch.equal(rng, plain_rng)


def test_rng_after_step_accounts_for_draws_in_the_loss() -> None:
    # A loss that consumes random numbers: the final state must still be the plain step's.
    def noisy_loss(reps: list[torch.Tensor]) -> torch.Tensor:
        return _loss(reps) + 0.0 * torch.rand(())

    model = _Tower(dropout=0.1).train()
    groups = _groups([_batch(6, seed=1), _batch(6, seed=2)], 4)
    (_, grads, rng), (_, plain_grads, plain_rng) = _run_both(model, groups, noisy_loss)
    _assert_same_grads(grads, plain_grads)
    assert torch.equal(rng, plain_rng)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 16])
def test_without_dropout_matches_unchunked_batch(chunk_size: int) -> None:
    model = _Tower(dropout=0.0)
    batches = [_batch(9, seed=4), _batch(9, seed=5), _batch(3, seed=6)]
    encode = _encoder(model)
    full_loss = _loss([encode(g, batch) for g, batch in enumerate(batches)])
    full_loss.backward()
    full_grads = _grads(model)

    loss = grad_cache_step(_groups(batches, chunk_size), encode, _loss)
    assert torch.allclose(loss, full_loss.detach(), atol=1e-6)
    assert not loss.requires_grad
    _assert_same_grads(_grads(model), full_grads)


def test_no_sync_wraps_every_backward_but_the_last() -> None:
    inside = {"now": False, "entries": 0}

    @contextlib.contextmanager
    def no_sync() -> Iterator[None]:
        inside["now"] = True
        inside["entries"] += 1
        yield
        inside["now"] = False

    model = _Tower(dropout=0.0)
    base = _encoder(model)
    grad_calls: list[bool] = []

    def encode(g: int, chunk: Any) -> torch.Tensor:
        if torch.is_grad_enabled():
            grad_calls.append(inside["now"])
        return base(g, chunk)

    def loss_fn(reps: list[torch.Tensor]) -> torch.Tensor:
        assert inside["now"], "the cache backward must not all-reduce"
        return _loss(reps)

    groups = _groups([_batch(5, seed=1), _batch(5, seed=2)], 2)  # 3 + 3 chunks
    grad_cache_step(groups, encode, loss_fn, no_sync=no_sync)
    assert grad_calls == [True] * 5 + [False]
    assert inside["entries"] == 1 + 5


def test_rejects_empty_group_and_unused_group() -> None:
    model = _Tower(dropout=0.0)
    encode = _encoder(model)
    with pytest.raises(ValueError, match="at least one chunk"):
        grad_cache_step([split_into_chunks(_batch(2, seed=1), 1), []], encode, _loss)
    groups = _groups([_batch(3, seed=1), _batch(3, seed=2), _batch(2, seed=3)], 2)
    with pytest.raises(ValueError, match="group 2"):
        grad_cache_step(groups, encode, lambda reps: info_nce(reps[0], reps[1]))


def test_rng_state_round_trip() -> None:
    state = RngState.capture()
    first = torch.rand(4)
    state.restore()
    assert torch.equal(torch.rand(4), first)


def test_split_into_chunks() -> None:
    batch = {"x": torch.arange(5), "text": ["a", "b", "c", "d", "e"]}
    chunks = split_into_chunks(batch, 2)
    assert [c["text"] for c in chunks] == [["a", "b"], ["c", "d"], ["e"]]
    assert [c["x"].tolist() for c in chunks] == [[0, 1], [2, 3], [4]]
    assert split_into_chunks([1, 2, 3], 5) == [[1, 2, 3]]
    assert [c.tolist() for c in split_into_chunks(torch.arange(3), 1)] == [[0], [1], [2]]
    with pytest.raises(ValueError, match=r"'text': 2"):
        split_into_chunks({"x": torch.zeros(3), "text": ["a", "b"]}, 2)
    with pytest.raises(TypeError, match=r"batch\['scale'\]"):
        split_into_chunks({"x": torch.zeros(3), "scale": 1.0}, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        split_into_chunks([1], 0)


# --- 2 gloo processes, DDP with no_sync, vs one process holding the whole global batch ---

_LOCAL, _LOCAL_NEGS, _CHUNK = 4, 2, 3


def _global_batches() -> list[dict[str, torch.Tensor]]:
    return [_batch(2 * _LOCAL, seed=11), _batch(2 * _LOCAL, seed=12), _batch(2 * _LOCAL_NEGS, seed=13)]


def _ddp_worker(rank: int, n_ranks: int) -> dict:
    model = DistributedDataParallel(_Tower(dropout=0.0))
    sizes = (_LOCAL, _LOCAL, _LOCAL_NEGS)
    local = [{"x": b["x"][rank * n : (rank + 1) * n]} for b, n in zip(_global_batches(), sizes, strict=True)]
    entries = []

    def no_sync() -> contextlib.AbstractContextManager[None]:
        entries.append(1)
        return model.no_sync()

    loss_fn = ContrastiveLoss(temperature=0.1)
    loss = grad_cache_step(
        _groups(local, _CHUNK), _encoder(model), lambda reps: loss_fn(*reps), no_sync=no_sync
    )
    return {"loss": loss / n_ranks, "grads": _grads(model.module), "no_sync_entries": len(entries)}


def test_ddp_no_sync_two_ranks_match_one_process(tmp_path: Path) -> None:
    per_rank = run_distributed(_ddp_worker, 2, tmp_path)
    model = _Tower(dropout=0.0)
    encode = _encoder(model)
    full_loss = _loss([encode(g, batch) for g, batch in enumerate(_global_batches())])
    full_loss.backward()
    full_grads = _grads(model)
    for result in per_rank:
        assert torch.allclose(result["loss"], full_loss.detach(), atol=1e-5)
        _assert_same_grads(result["grads"], full_grads)
        # 2 + 2 + 1 chunks: the cache backward and the first 4 re-encodes run without sync.
        assert result["no_sync_entries"] == 1 + 4
