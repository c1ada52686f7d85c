"""The input pipeline: order, worker processes, pinned transfer, and the consumed (not prefetched) data position."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from coma.data.pipeline import BatchPipeline, SampledBatches, pin_memory, resolve_num_workers, to_device
from coma.data.sampling import BlockMixtureSampler


def _square_with_pid(job: int) -> tuple[int, int]:
    return job * job, os.getpid()


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_pipeline_keeps_job_order(workers):
    results = list(BatchPipeline(_square_with_pid, num_workers=workers, pin=False)(range(7)))
    assert [value for value, _ in results] == [job * job for job in range(7)]
    pids = {pid for _, pid in results}
    assert (pids == {os.getpid()}) == (workers == 0)


def test_starting_workers_leaves_the_global_rng_alone():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    list(BatchPipeline(_square_with_pid, num_workers=2, pin=False)(range(3)))
    assert torch.equal(torch.rand(4), expected)


@dataclass
class _Holder:
    batch: dict
    rows: int


def test_to_device_and_pin_rebuild_nested_containers():
    tree = [_Holder({"x": torch.ones(2)}, 2), (torch.zeros(1), "text")]
    moved = to_device(tree, "cpu")
    assert moved[0].rows == 2 and torch.equal(moved[0].batch["x"], torch.ones(2)) and moved[1][1] == "text"
    if torch.cuda.is_available():
        assert pin_memory(tree)[0].batch["x"].is_pinned()


def test_resolve_num_workers():
    assert resolve_num_workers(0) == 0
    assert 0 <= resolve_num_workers(None) <= 8
    with pytest.raises(ValueError):
        resolve_num_workers(-1)


def _sampler() -> BlockMixtureSampler:
    return BlockMixtureSampler({"a": 10, "b": 7}, None, global_batch_size=4, block_size=2, seed=1)


def _keys(keys: list) -> list:
    return list(keys)


@pytest.mark.parametrize("workers", [0, 2])
def test_sampled_batches_report_the_consumed_position(workers):
    reference = _sampler()
    expected = [reference.next_batch() for _ in range(6)]
    stream = SampledBatches(_sampler(), _keys, steps=6, num_workers=workers, prefetch=2, pin=False)
    got = [stream.next() for _ in range(3)]
    state = stream.state_dict()  # the workers have run ahead; the position is still after step 3
    assert state["position"] == 3 * 4
    if workers:
        assert stream.sampler.state_dict()["position"] > state["position"]  # drawn ahead for the workers
    resumed = SampledBatches(_sampler(), _keys, steps=6, num_workers=workers, pin=False)
    resumed.load_state_dict(state)
    got += [resumed.next() for _ in range(3)]
    assert got == expected
    with pytest.raises(RuntimeError, match="6 steps"):
        resumed.next()
    stream.close()
    assert stream.sampler.state_dict() == state  # closing rewinds the sampler to the consumed position
