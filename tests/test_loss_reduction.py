"""Stage 1's loss reduction (`sample` or `token`) gives the same gradient for any micro-batch size and world size."""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed

from coma.data.synth import generate_world
from coma.train.compress import CompressConfig, CompressTask
from coma.train.config import LoraSettings, TrainSettings
from coma.train.loop import DistInfo, seed_everything
from coma.train.parallel import parallelize

GLOBAL_BATCH = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate_world(out, seed=0, size="tiny")
    return out


def one_step_gradients(model, world, reduction: str, micro: int, dist_info: DistInfo) -> tuple[float, dict]:
    """Loss and trainable gradients of the first global batch (LoRA dropout 0: the runs compute the same thing)."""
    config = CompressConfig(
        model=str(model), data=[str(world / "stage1" / "conversations.jsonl")], image_root=str(world / "images"),
        out="unused", num_tokens=4, max_length=256, loss_reduction=reduction,
        train=TrainSettings(global_batch_size=GLOBAL_BATCH, micro_batch_size=micro, max_steps=1, device="cpu"),
        lora=LoraSettings(r=4, dropout=0.0),
    )  # fmt: skip
    seed_everything(0)  # LoRA init
    task = CompressTask(config, dist_info)
    parallel = parallelize(task.module, strategy="ddp", world_size=dist_info.world_size, device=dist_info.device,
                           compute_dtype=torch.float32, shard_units=task.shard_units)  # fmt: skip
    result = task.step(parallel.model, parallel.no_sync)
    grads = {name: p.grad.clone() for name, p in task.module.named_parameters() if p.grad is not None}
    return result.loss, grads


def _rank_gradients(rank, world_size, model, world, reduction):
    return one_step_gradients(model, world, reduction, GLOBAL_BATCH // world_size, DistInfo(rank, world_size))


def assert_same(a: tuple[float, dict], b: tuple[float, dict]) -> None:
    assert a[0] == pytest.approx(b[0], abs=1e-6)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        # fp32 sums in another order (per micro-batch, per rank, then all-reduced) differ by a few 1e-6 on the
        # larger entries; the wrong reduction moves gradients by percents.
        torch.testing.assert_close(a[1][name], b[1][name], atol=5e-6, rtol=1e-4)


@pytest.mark.parametrize("reduction", ["sample", "token"])
def test_micro_batch_size_does_not_change_the_gradient(tiny_model_dir, world, reduction):
    ones = one_step_gradients(tiny_model_dir, world, reduction, 1, DistInfo())
    fours = one_step_gradients(tiny_model_dir, world, reduction, GLOBAL_BATCH, DistInfo())
    assert_same(ones, fours)


def test_sample_and_token_reductions_differ(tiny_model_dir, world):
    """The data's samples have different answer lengths, so the two means weigh them differently."""
    sample = one_step_gradients(tiny_model_dir, world, "sample", 2, DistInfo())
    token = one_step_gradients(tiny_model_dir, world, "token", 2, DistInfo())
    assert abs(sample[0] - token[0]) > 1e-4


@pytest.mark.parametrize("reduction", ["sample", pytest.param("token", marks=pytest.mark.slow)])
def test_two_processes_give_the_one_process_gradient(tiny_model_dir, world, tmp_path, reduction):
    one = one_step_gradients(tiny_model_dir, world, reduction, 1, DistInfo())
    ranks = run_distributed(_rank_gradients, 2, tmp_path, tiny_model_dir, world, reduction)
    for rank_result in ranks:
        assert_same(rank_result, one)
