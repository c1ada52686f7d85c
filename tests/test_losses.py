from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from coma.losses import ContrastiveLoss, gather_with_grad, info_nce, world_size


def _unit(n: int, d: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)


def _brute_direction(rows: list[list[float]], cols: list[list[float]], temperature: float) -> float:
    """Mean over rows of -log softmax(row . cols / t)[i], with an explicit max-shifted log-sum-exp."""
    total = 0.0
    for i, row in enumerate(rows):
        scores = [sum(a * b for a, b in zip(row, col, strict=True)) / temperature for col in cols]
        top = max(scores)
        log_sum_exp = top + math.log(sum(math.exp(s - top) for s in scores))
        total += log_sum_exp - scores[i]
    return total / len(rows)


def _brute_info_nce(q, t, temperature, negatives, symmetric) -> float:
    rows, cols = q.tolist(), t.tolist()
    extra = negatives.tolist() if negatives is not None else []
    loss = _brute_direction(rows, cols + extra, temperature)
    if symmetric:
        loss = (loss + _brute_direction(cols, rows, temperature)) / 2
    return loss


@pytest.mark.parametrize("temperature", [0.03, 0.5, 2.0])
@pytest.mark.parametrize("n_negatives", [0, 3])
@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_matches_brute_force(temperature: float, n_negatives: int, symmetric: bool) -> None:
    q, t = _unit(5, 4, seed=1), _unit(5, 4, seed=2)
    negatives = _unit(n_negatives, 4, seed=3) if n_negatives else None
    got = info_nce(q, t, temperature=temperature, negatives=negatives, symmetric=symmetric)
    expected = _brute_info_nce(q, t, temperature, negatives, symmetric)
    assert got.item() == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_info_nce_positive_is_column_i() -> None:
    # Targets equal to the queries, low temperature: the diagonal dominates and the loss is ~0;
    # rolling the targets puts every positive off the diagonal and the loss becomes large.
    q = _unit(4, 8, seed=5)
    assert info_nce(q, q, temperature=0.01).item() < 1e-3
    assert info_nce(q, q.roll(1, dims=0), temperature=0.01).item() > 1.0


def test_info_nce_negatives_raise_the_loss() -> None:
    q, t = _unit(4, 8, seed=6), _unit(4, 8, seed=7)
    base = info_nce(q, t, temperature=0.1)
    harder = info_nce(q, t, temperature=0.1, negatives=q.clone())
    assert harder.item() > base.item()


def test_info_nce_gradcheck() -> None:
    q = _unit(3, 4, seed=8).requires_grad_()
    t = _unit(3, 4, seed=9).requires_grad_()
    negatives = _unit(2, 4, seed=10).requires_grad_()

    def fn(q, t, negatives):
        return info_nce(q, t, temperature=0.5, negatives=negatives, symmetric=True)

    assert torch.autograd.gradcheck(fn, (q, t, negatives), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("q_shape", "t_shape", "n_shape", "temperature", "match"),
    [
        ((3, 4), (2, 4), None, 0.1, "equal shapes"),
        ((3,), (3,), None, 0.1, r"\(N, D\)"),
        ((3, 4), (3, 4), (2, 5), 0.1, r"negatives must be \(M, 4\)"),
        ((3, 4), (3, 4), None, 0.0, "temperature"),
    ],
)
def test_info_nce_rejects_bad_input(q_shape, t_shape, n_shape, temperature, match) -> None:
    negatives = torch.zeros(n_shape) if n_shape else None
    with pytest.raises(ValueError, match=match):
        info_nce(torch.zeros(q_shape), torch.zeros(t_shape), temperature=temperature, negatives=negatives)


def test_contrastive_loss_runs_in_fp32_under_bf16_autocast() -> None:
    """Inside the training step's bf16 autocast the similarity matmul would run in bf16; the loss and its gradients
    must equal the fp32 computation."""
    torch.manual_seed(0)
    base = F.normalize(torch.randn(32, 64), dim=-1)
    queries = F.normalize(base + 2 * torch.randn(32, 64), dim=-1).requires_grad_()
    targets = F.normalize(base + 2 * torch.randn(32, 64), dim=-1)
    loss_fn = ContrastiveLoss(temperature=0.02, symmetric=True)
    expected = loss_fn(queries, targets)
    (expected_grad,) = torch.autograd.grad(expected, queries)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(queries, targets)
        in_bf16 = info_nce(queries, targets, temperature=0.02, symmetric=True)
    (grad,) = torch.autograd.grad(loss, queries)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-7)
    assert abs(in_bf16.item() - expected.item()) > 1e-3, "the check must be able to fail: bf16 logits differ"


def test_single_process_gather_is_identity_and_loss_is_info_nce() -> None:
    assert world_size() == 1
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x
    q, t, negatives = _unit(4, 6, seed=11), _unit(4, 6, seed=12), _unit(2, 6, seed=13)
    loss = ContrastiveLoss(temperature=0.07, symmetric=True)
    expected = info_nce(q, t, temperature=0.07, negatives=negatives, symmetric=True)
    assert torch.equal(loss(q, t, negatives), expected)
    with pytest.raises(ValueError, match="4 queries but 3 targets"):
        loss(q, t[:3])
    with pytest.raises(ValueError, match="temperature"):
        ContrastiveLoss(temperature=-1.0)


# --- cross-rank test: 2 gloo processes with DDP vs one process holding the whole global batch ---

_IN, _OUT = 6, 5
# (local batch size per rank, hard negatives per rank, symmetric); uneven sizes and a rank without negatives.
_SCENARIOS = [((3, 3), (0, 0), False), ((3, 3), (2, 2), True), ((2, 4), (3, 0), False)]


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(_IN, _OUT)


def _encode(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(model(x), dim=-1)


def _scenario_data(sizes: tuple[int, int], negs: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(42)
    n = sum(sizes)
    return (
        torch.randn(n, _IN, generator=g),
        torch.randn(n, _IN, generator=g),
        torch.randn(sum(negs), _IN, generator=g),
    )


def _shard(x: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return x[start : start + sizes[rank]]


def _ddp_worker(rank: int, n_ranks: int) -> dict:
    results = []
    # One DDP wrapper for every scenario (its construction is the slow part); no optimizer step runs.
    model = DistributedDataParallel(_encoder())
    for sizes, negs, symmetric in _SCENARIOS:
        queries, targets, negatives = _scenario_data(sizes, negs)
        q, t, n = _shard(queries, sizes, rank), _shard(targets, sizes, rank), _shard(negatives, negs, rank)
        model.zero_grad(set_to_none=True)
        # One forward for all inputs: DDP expects a single forward per backward.
        emb = _encode(model, torch.cat([q, t, n]))
        loss = ContrastiveLoss(temperature=0.1, symmetric=symmetric)(
            emb[: len(q)], emb[len(q) : 2 * len(q)], emb[2 * len(q) :] if len(n) else None
        )
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.module.named_parameters()}
        results.append({"loss": loss.detach() / n_ranks, "grads": grads})
    x = torch.full((rank + 1, 2), float(rank), requires_grad=True)
    gathered = gather_with_grad(x)
    gathered.sum().backward()
    return {"scenarios": results, "gathered": gathered.detach(), "local_grad": x.grad}


def test_ddp_two_ranks_match_one_process(tmp_path: Path) -> None:
    per_rank = run_distributed(_ddp_worker, 2, tmp_path)

    for index, (sizes, negs, symmetric) in enumerate(_SCENARIOS):
        queries, targets, negatives = _scenario_data(sizes, negs)
        model = _encoder()
        n = len(queries)
        emb = _encode(model, torch.cat([queries, targets, negatives]))
        loss = info_nce(
            emb[:n],
            emb[n : 2 * n],
            temperature=0.1,
            negatives=emb[2 * n :] if len(negatives) else None,
            symmetric=symmetric,
        )
        loss.backward()
        for rank, result in enumerate(per_rank):
            got = result["scenarios"][index]
            assert torch.allclose(got["loss"], loss.detach(), atol=1e-5), (index, rank)
            for name, param in model.named_parameters():
                assert torch.allclose(got["grads"][name], param.grad, atol=1e-5), (index, rank, name)

    # Unequal shards come back in rank order; gradient reaches only the local shard (d sum / d x = 1).
    expected = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    for rank, result in enumerate(per_rank):
        assert torch.equal(result["gathered"], expected)
        assert torch.equal(result["local_grad"], torch.ones(rank + 1, 2))
