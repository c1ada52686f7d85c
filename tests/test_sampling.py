"""BlockMixtureSampler: homogeneous blocks, weights, rank sharding, epochs and exact resume."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from coma.data.sampling import BlockMixtureSampler

SIZES = {"alpha": 50, "beta": 300, "gamma": 7, "delta": 120}


def make(**overrides) -> BlockMixtureSampler:
    kwargs = {"subset_sizes": SIZES, "weights": None, "global_batch_size": 32, "block_size": 8, "seed": 3}
    kwargs.update(overrides)
    return BlockMixtureSampler(**kwargs)


def stream(sampler: BlockMixtureSampler, batches: int) -> list[tuple[str, int]]:
    return [item for _ in range(batches) for item in sampler.next_batch()]


def brute_stream(sizes, block_size, length, block_choice, permutation):
    """Reference stream built item by item from the per-block choices and per-epoch permutations."""
    cursor = {name: (0, 0) for name in sizes}
    items = []
    for position in range(length):
        name = block_choice(position // block_size)
        epoch, offset = cursor[name]
        items.append((name, int(permutation(name, epoch)[offset])))
        offset += 1
        cursor[name] = (epoch + 1, 0) if offset == sizes[name] else (epoch, offset)
    return items


@pytest.mark.parametrize("global_batch_size", [32, 20])
def test_stream_matches_item_by_item_reference(global_batch_size):
    sampler = make(global_batch_size=global_batch_size)
    got = stream(sampler, 40)
    reference = make()  # fresh instance only used for its choice and permutation functions
    expected = brute_stream(SIZES, 8, len(got), reference._block_subset, reference._permutation)
    assert got == expected


@pytest.mark.parametrize("global_batch_size", [32, 20])
def test_aligned_blocks_are_homogeneous(global_batch_size):
    items = stream(make(global_batch_size=global_batch_size), 60)
    blocks = [items[i : i + 8] for i in range(0, len(items) - 7, 8)]
    assert all(len({name for name, _ in block}) == 1 for block in blocks)
    assert len({block[0][0] for block in blocks}) == len(SIZES), "every subset should be drawn"


def test_mixture_proportions_follow_weights():
    sampler = BlockMixtureSampler(
        {"a": 1000, "b": 1000}, {"a": 1.0, "b": 3.0}, global_batch_size=64, block_size=4
    )
    items = stream(sampler, 300)
    counts = Counter(items[i][0] for i in range(0, len(items), 4))
    assert abs(counts["b"] / sum(counts.values()) - 0.75) < 0.03


def test_zero_weight_subset_is_never_drawn():
    sampler = make(weights={"gamma": 0.0, "beta": 2.0})
    names = {name for name, _ in stream(sampler, 100)}
    assert names == {"alpha", "beta", "delta"}


def test_each_epoch_is_a_permutation_even_for_subsets_smaller_than_a_block():
    sizes = {"tiny": 3, "small": 5, "big": 40}
    items = stream(BlockMixtureSampler(sizes, None, global_batch_size=16, block_size=8), 50)
    for name, size in sizes.items():
        seen = [index for subset, index in items if subset == name]
        epochs = [seen[i : i + size] for i in range(0, len(seen) - size + 1, size)]
        assert len(epochs) >= 3
        assert all(sorted(epoch) == list(range(size)) for epoch in epochs)
        if size >= 5:
            assert len({tuple(epoch) for epoch in epochs}) > 1, "each epoch must be re-shuffled"


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_are_disjoint_and_union_is_the_single_process_batch(world_size):
    single = make(global_batch_size=48)
    ranks = [make(global_batch_size=48, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(10):
        shares = [sampler.next_batch() for sampler in ranks]
        assert all(len(share) == 48 // world_size for share in shares)
        assert [item for share in shares for item in share] == single.next_batch()


def test_ranks_hold_disjoint_examples_within_an_epoch():
    sizes = {"a": 10_000, "b": 10_000}
    ranks = [BlockMixtureSampler(sizes, None, 64, block_size=16, rank=r, world_size=4) for r in range(4)]
    seen = [set() for _ in ranks]
    for _ in range(20):
        for rank, sampler in enumerate(ranks):
            seen[rank].update(sampler.next_batch())
    for r in range(4):
        for s in range(r + 1, 4):
            assert not seen[r] & seen[s]


@pytest.mark.parametrize("global_batch_size", [32, 20])
def test_exact_resume_through_json(global_batch_size):
    uninterrupted = make(global_batch_size=global_batch_size)
    interrupted = make(global_batch_size=global_batch_size)
    stream(uninterrupted, 7)
    stream(interrupted, 7)
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = make(global_batch_size=global_batch_size)
    resumed.load_state_dict(state)
    assert stream(resumed, 25) == stream(uninterrupted, 25)


def test_resume_state_does_not_grow_with_history():
    sampler = make()
    stream(sampler, 2)
    early = len(json.dumps(sampler.state_dict()))
    stream(sampler, 3000)
    assert len(json.dumps(sampler.state_dict())) <= early + 16


def test_resume_with_another_world_size_continues_the_same_stream():
    single = make(global_batch_size=32)
    stream(single, 5)
    state = single.state_dict()
    ranks = [make(global_batch_size=32, rank=r, world_size=2) for r in range(2)]
    for sampler in ranks:
        sampler.load_state_dict(state)
    assert ranks[0].next_batch() + ranks[1].next_batch() == single.next_batch()


def test_load_state_refuses_a_different_stream():
    state = make().state_dict()
    with pytest.raises(ValueError, match="'seed'"):
        make(seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="'block_size'"):
        make(block_size=16).load_state_dict(state)
    with pytest.raises(ValueError, match="'weights'"):
        make(weights={"alpha": 2.0}).load_state_dict(state)
    broken = dict(state, cursors={**state["cursors"], "gamma": [0, 7]})
    with pytest.raises(ValueError, match="'cursors'"):
        make().load_state_dict(broken)


def test_determinism_by_seed_and_dict_order():
    assert stream(make(), 10) == stream(make(), 10)
    reordered = dict(reversed(list(SIZES.items())))
    assert stream(make(subset_sizes=reordered), 10) == stream(make(), 10)
    assert stream(make(seed=4), 10) != stream(make(), 10)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"global_batch_size": 30, "world_size": 4}, "divisible by world_size"),
        ({"global_batch_size": 0}, "global_batch_size must be >= 1"),
        ({"block_size": 0}, "block_size must be >= 1"),
        ({"rank": 2, "world_size": 2}, "rank must be in"),
        ({"weights": {"omega": 1.0}}, "unknown subsets"),
        ({"weights": {"alpha": -1.0}}, "non-negative"),
        ({"weights": dict.fromkeys(SIZES, 0.0)}, "positive weight"),
        ({"subset_sizes": {**SIZES, "empty": 0}}, "subset_sizes\\['empty'\\] is 0"),
        ({"subset_sizes": {**SIZES, "neg": -3}}, "subset_sizes\\['neg'\\] must be >= 0"),
        ({"subset_sizes": {}}, "at least one subset"),
        ({"seed": -1}, "seed must be >= 0"),
    ],
)
def test_invalid_arguments_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        make(**overrides)


def test_empty_subset_with_zero_weight_is_allowed_and_never_drawn():
    sampler = make(subset_sizes={**SIZES, "empty": 0}, weights={"empty": 0.0})
    assert "empty" not in {name for name, _ in stream(sampler, 20)}
