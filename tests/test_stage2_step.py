"""Stage-2 step: GradCache equals the plain step, hard negatives, dummy images, DDP, and a small training run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed
from peft import LoraConfig, get_peft_model
from PIL import Image
from torch import nn

from coma import Embedder
from coma.data.sampling import BlockMixtureSampler
from coma.embedder import EncodeInput
from coma.io import write_jsonl
from coma.losses import ContrastiveLoss
from coma.train.stage2_data import PairCollator, PairDataset
from coma.train.stage2_step import ContrastiveStep, chunk_inputs, in_batch_accuracy

TEMPERATURE = 0.5
COLOURS = {
    "red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20),
    "purple": (140, 30, 160), "cyan": (30, 210, 210), "white": (245, 245, 245), "black": (10, 10, 10),
}  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core box two threads spin against other jobs (measured 25x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _image(colour: str, size: int = 56) -> Image.Image:
    return Image.new("RGB", (size, size), COLOURS[colour])


def _queries() -> list[EncodeInput]:
    """Image queries (two sizes, so chunks pad differently) and one text-only query."""
    items = [
        EncodeInput(
            "<|image_1|>\nRepresent the given image for classification", _image(c, 56 if i % 2 else 84)
        )
        for i, c in enumerate(["red", "green", "blue", "yellow", "purple"])
    ]
    return [*items, EncodeInput("Find an image caption describing a white square")]


def _targets() -> list[EncodeInput]:
    """Mostly label texts (text-only chunks need the dummy image); one image target."""
    return [
        EncodeInput("red"),
        EncodeInput("green colour"),
        EncodeInput("blue"),
        EncodeInput("<|image_1|>\nRepresent the given image.", _image("cyan")),
        EncodeInput("the colour purple"),
        EncodeInput("white"),
    ]


def _negatives() -> list[EncodeInput]:
    return [EncodeInput("black"), EncodeInput("", _image("black")), EncodeInput("orange")]


def _embedder(model_dir: Path) -> Embedder:
    embedder = Embedder.from_pretrained(model_dir)
    embedder.model.train()
    return embedder


def _with_lora(embedder: Embedder, dropout: float) -> Embedder:
    """LoRA on the LM attention plus trainable compression rows, like stage 2; random A and B so both get grads."""
    config = LoraConfig(
        target_modules=embedder.adapter.lora_target_regex,
        r=4,
        lora_alpha=8,
        lora_dropout=dropout,
        trainable_token_indices={"embed_tokens": embedder.model.token_ids.tolist()},
    )
    embedder.model.backbone = get_peft_model(embedder.model.backbone, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in embedder.model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.03)
    return embedder


def _take_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {
        name: parameter.grad.clone() if parameter.grad is not None else None
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }
    model.zero_grad(set_to_none=True)
    return grads


def _assert_same_grads(got: dict, expected: dict, atol: float = 1e-5) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] is not None and expected[name] is not None, name
        torch.testing.assert_close(got[name], expected[name], atol=atol, rtol=0, msg=name)


def _brute_force_info_nce(q: torch.Tensor, t: torch.Tensor, negatives: torch.Tensor | None) -> float:
    candidates = t.tolist() + ([] if negatives is None else negatives.tolist())
    total = 0.0
    for i, query in enumerate(q.tolist()):
        scores = [sum(a * b for a, b in zip(query, c, strict=True)) / TEMPERATURE for c in candidates]
        total += math.log(sum(math.exp(s) for s in scores)) - scores[i]
    return total / len(q)


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers


def test_in_batch_accuracy_matches_a_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    q, t, n = (F.normalize(torch.randn(size, 4, generator=generator), dim=1) for size in (7, 7, 3))
    t[5] = t[2]  # queries 2 and 5 score their positive and the duplicate equally: a tie is a miss
    q[2], q[3] = t[2], t[3]  # query 3 is a sure hit; query 2 would be one but for the tie
    for negatives in (None, n):
        candidates = t if negatives is None else torch.cat([t, negatives])
        hits = []
        for i in range(7):
            scores = [float(q[i] @ c) for c in candidates]
            hits.append(all(scores[i] > s for j, s in enumerate(scores) if j != i))
        assert hits[3] and not hits[2] and not hits[5]
        assert in_batch_accuracy(q, t, negatives) == pytest.approx(sum(hits) / 7)
    collapsed = torch.ones(3, 4)
    assert in_batch_accuracy(collapsed, collapsed) == 0.0
    with pytest.raises(ValueError, match="no queries"):
        in_batch_accuracy(q[:0], t[:0])


def test_chunk_inputs() -> None:
    items = [EncodeInput(str(i)) for i in range(5)]
    assert [len(c) for c in chunk_inputs(items, 2)] == [2, 2, 1]
    assert chunk_inputs(items, None) == [items]
    assert chunk_inputs([], 3) == [] and chunk_inputs([], None) == []
    with pytest.raises(ValueError, match="query_chunk_size must be >= 1"):
        ContrastiveStep(nn.Linear(1, 1), ContrastiveLoss(), query_chunk_size=0)


# ---------------------------------------------------------------------------------------------------------------
# GradCache equals the plain step


@pytest.fixture(scope="module")
def lora_embedder(tiny_model_dir) -> Embedder:
    return _with_lora(_embedder(tiny_model_dir), dropout=0.2)


@pytest.mark.parametrize(("query_chunk", "target_chunk"), [(2, 3), (4, 1), (None, None)])
def test_grad_cache_equals_plain_step_with_lora_dropout(lora_embedder, query_chunk, target_chunk) -> None:
    model = lora_embedder.model
    results = []
    for use_grad_cache in (True, False):
        step = ContrastiveStep(model, ContrastiveLoss(TEMPERATURE), query_chunk, target_chunk, use_grad_cache)
        # The plain step encodes the same chunks in the same order from the same seed: same dropout masks.
        torch.manual_seed(5)
        out = step(_queries(), _targets(), _negatives(), lora_embedder.collate)
        results.append((out, _take_grads(model)))
    (cached, cached_grads), (plain, plain_grads) = results
    assert cached == pytest.approx(plain, abs=1e-6)
    assert cached["n"] == 6 and cached["tokens"] > 0
    assert any(name.endswith("lora_A.default.weight") for name in cached_grads)
    assert any("trainable_tokens" in name for name in cached_grads)
    _assert_same_grads(cached_grads, plain_grads)
    assert all(bool(g.abs().sum() > 0) for g in cached_grads.values()), (
        "every trainable tensor gets a gradient"
    )


def test_lora_dropout_is_active(lora_embedder) -> None:
    """Guards the test above: with dropout really on, another seed gives another loss."""
    step = ContrastiveStep(lora_embedder.model, ContrastiveLoss(TEMPERATURE), use_grad_cache=False)
    losses = []
    for seed in (5, 6):
        torch.manual_seed(seed)
        losses.append(step(_queries(), _targets(), None, lora_embedder.collate)["loss"])
    lora_embedder.model.zero_grad(set_to_none=True)
    assert abs(losses[0] - losses[1]) > 1e-4


def test_grad_cache_chunks_equal_one_unchunked_forward_without_dropout(tiny_model_dir) -> None:
    """All parameters (vision tower included) trainable, no dropout: chunking must not change the gradient."""
    embedder = _embedder(tiny_model_dir)
    model = embedder.model
    loss_fn = ContrastiveLoss(TEMPERATURE)
    queries, targets, negatives = _queries(), _targets(), _negatives()
    # Reference written out by hand: one forward per group, one loss, one backward.
    q, t, n = (model(embedder.collate(items)) for items in (queries, targets, negatives))
    reference_loss = loss_fn(q, t, n)
    reference_loss.backward()
    reference_loss = float(reference_loss.detach())
    reference = _take_grads(model)
    reference_accuracy = in_batch_accuracy(q, t, n)
    for query_chunk, target_chunk in [(1, 2), (4, 5)]:
        step = ContrastiveStep(model, loss_fn, query_chunk, target_chunk, use_grad_cache=True)
        out = step(queries, targets, negatives, embedder.collate)
        assert out["loss"] == pytest.approx(reference_loss, abs=1e-5)
        assert out["accuracy"] == reference_accuracy
        _assert_same_grads(_take_grads(model), reference)


# ---------------------------------------------------------------------------------------------------------------
# Hard negatives


def test_hard_negatives_change_the_loss_as_brute_force_infonce_says(tiny_model_dir) -> None:
    embedder = _embedder(tiny_model_dir)
    model = embedder.model.eval()
    queries, targets, negatives = _queries(), _targets(), _negatives()
    with torch.no_grad():
        q, t, n = (model(embedder.collate(items)) for items in (queries, targets, negatives))
    step = ContrastiveStep(model, ContrastiveLoss(TEMPERATURE), 4, 2, use_grad_cache=True)
    with_negatives = step(queries, targets, negatives, embedder.collate)
    model.zero_grad(set_to_none=True)
    without = step(queries, targets, None, embedder.collate)
    empty = step(queries, targets, [], embedder.collate)
    model.zero_grad(set_to_none=True)
    assert with_negatives["loss"] == pytest.approx(_brute_force_info_nce(q, t, n), abs=1e-5)
    assert without["loss"] == pytest.approx(_brute_force_info_nce(q, t, None), abs=1e-5)
    assert empty == without
    # Extra candidates can only add to every softmax denominator.
    assert with_negatives["loss"] > without["loss"] + 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Dummy image on text-only chunks


def test_text_only_chunks_run_the_vision_tower_at_zero_weight(tiny_model_dir) -> None:
    embedder = _embedder(tiny_model_dir)
    model = embedder.model
    vision_ids = {id(p) for p in embedder.adapter.vision_tower(model.backbone).parameters()}
    vision = {name for name, parameter in model.named_parameters() if id(parameter) in vision_ids}
    assert vision and all(model.get_parameter(name).requires_grad for name in vision)
    queries = [EncodeInput(f"a {c} square") for c in ("red", "green", "blue", "white")]
    targets = [EncodeInput(c) for c in ("red", "green", "blue", "white")]
    outputs, grads = {}, {}
    for dummy in (True, False):
        step = ContrastiveStep(
            model, ContrastiveLoss(TEMPERATURE), 2, 3, use_grad_cache=True, dummy_image=dummy
        )
        outputs[dummy] = step(queries, targets, None, embedder.collate)
        grads[dummy] = _take_grads(model)

    # With the dummy every vision parameter gets a gradient, and it is exactly zero.
    for name in vision:
        assert grads[True][name] is not None, name
        assert torch.count_nonzero(grads[True][name]) == 0, name
        assert grads[False][name] is None, f"{name}: a text-only step should not reach the vision tower"
    # The dummy changes neither the loss, nor the counts, nor any other gradient.
    assert outputs[True] == pytest.approx(outputs[False], abs=1e-6)
    assert outputs[True]["tokens"] == outputs[False]["tokens"]
    _assert_same_grads({k: v for k, v in grads[True].items() if k not in vision},
                       {k: v for k, v in grads[False].items() if k not in vision})  # fmt: skip
    with torch.no_grad():
        reference = ContrastiveLoss(TEMPERATURE)(
            model(embedder.collate(queries)), model(embedder.collate(targets))
        )
    assert outputs[True]["loss"] == pytest.approx(float(reference), abs=1e-5)


def test_mismatched_groups_are_refused(tiny_model_dir) -> None:
    embedder = _embedder(tiny_model_dir)
    step = ContrastiveStep(embedder.model, ContrastiveLoss())
    with pytest.raises(ValueError, match="3 queries but 2 targets"):
        step(_queries()[:3], _targets()[:2], None, embedder.collate)
    with pytest.raises(ValueError, match="no pairs"):
        step([], [], None, embedder.collate)


# ---------------------------------------------------------------------------------------------------------------
# Two gloo ranks with unequal shares, a text-only rank and negatives on one rank only


def _rank_share(rank: int) -> tuple[list[EncodeInput], list[EncodeInput], list[EncodeInput]]:
    """Rank 0: 3 pairs with images, no negatives. Rank 1: 2 text-only pairs and 3 text negatives.

    With chunks of 2 the ranks hold (2, 2, 0) and (1, 1, 2) chunks per group, so each pads a group the other
    fills, and rank 1's last (synchronised) chunk is text-only.
    """
    if rank == 0:
        return _queries()[:3], _targets()[:3], []
    text_queries = [EncodeInput("a white square"), EncodeInput("a black square")]
    negatives = [EncodeInput("grey"), EncodeInput("orange"), EncodeInput("pink")]
    return text_queries, [EncodeInput("white"), EncodeInput("black")], negatives


def _ddp_worker(rank: int, world_size: int, model_dir: Path) -> dict:
    torch.manual_seed(0)
    embedder = _embedder(model_dir)
    ddp = nn.parallel.DistributedDataParallel(embedder.model)
    queries, targets, negatives = _rank_share(rank)
    results = {}
    for use_grad_cache in (True, False):
        step = ContrastiveStep(embedder.model, ContrastiveLoss(TEMPERATURE), 2, 2, use_grad_cache)
        out = step(queries, targets, negatives, embedder.collate, ddp.no_sync, model=ddp)
        results[use_grad_cache] = (out, _take_grads(embedder.model))
    return results


@pytest.mark.slow  # ~10 s, most of it starting two Python processes
def test_two_ranks_equal_one_process_with_the_whole_batch(tiny_model_dir, tmp_path) -> None:
    """Unequal shares, a text-only rank, negatives on one rank only: same loss and gradients as one process.

    Without the dummy image rank 1 never reaches the vision tower and DDP's gradient buckets never complete
    (a collective timeout); without the chunk-count agreement the ranks run different numbers of forwards.
    """
    ranks = run_distributed(_ddp_worker, 2, tmp_path, tiny_model_dir)
    embedder = _embedder(tiny_model_dir)
    shares = [_rank_share(rank) for rank in range(2)]
    queries, targets, negatives = ([item for share in shares for item in share[g]] for g in range(3))
    step = ContrastiveStep(embedder.model, ContrastiveLoss(TEMPERATURE), 4, 4, use_grad_cache=True)
    expected = step(queries, targets, negatives, embedder.collate)
    expected_grads = _take_grads(embedder.model)
    for use_grad_cache in (True, False):
        for rank, results in enumerate(ranks):
            out, grads = results[use_grad_cache]
            assert out["n"] == len(shares[rank][0])
            assert out["loss"] == pytest.approx(expected["loss"], abs=1e-5)
            assert out["accuracy"] == expected["accuracy"]
            _assert_same_grads(grads, expected_grads)


# ---------------------------------------------------------------------------------------------------------------
# A small training run through the real data path

PLACES = {"top_left": (0, 0), "top_right": (1, 0), "bottom_left": (0, 1), "bottom_right": (1, 1)}


def _write_fixture(root: Path) -> tuple[Path, Path]:
    """64 MMEB-train rows in 8 subsets of 8: per quadrant, image->colour name and caption->image.

    A square of one of 8 colours sits in the quadrant; every subset holds each colour once, so a batch of one
    8-row block has 8 distinct targets and in-batch accuracy is meaningful (chance: 1/8).
    """
    images, data = root / "images", root / "mmeb_train"
    images.mkdir(parents=True)
    for place, (x, y) in PLACES.items():
        classify, retrieve = [], []
        for colour, rgb in COLOURS.items():
            image = Image.new("RGB", (112, 112), (60, 60, 60))
            image.paste(rgb, (x * 56, y * 56, x * 56 + 56, y * 56 + 56))
            name = f"{place}/{colour}.png"
            (images / place).mkdir(exist_ok=True)
            image.save(images / name)
            empty = {"neg_text": "", "neg_image_path": ""}
            classify.append({"qry": "<|image_1|>\nRepresent the given image for classification",
                             "qry_image_path": name, "pos_text": colour, "pos_image_path": "", **empty})  # fmt: skip
            retrieve.append({"qry": f"Find me an everyday image that matches the given caption: a {colour} square",
                             "qry_image_path": "", "pos_text": "<|image_1|>\nRepresent the given image.",
                             "pos_image_path": name, **empty})  # fmt: skip
        write_jsonl(data / f"Colour_{place}" / "original.jsonl", classify)
        write_jsonl(data / f"Caption_{place}" / "original.jsonl", retrieve)
    return data, images


def test_training_lowers_the_loss_and_raises_in_batch_accuracy(tiny_model_dir, tmp_path) -> None:
    data_root, image_root = _write_fixture(tmp_path)
    torch.manual_seed(0)
    embedder = _embedder(tiny_model_dir)
    model = embedder.model
    data = PairDataset.from_config(data_root, image_root=image_root)
    assert len(data) == 64
    sampler = BlockMixtureSampler(data.subset_sizes, data.weights, global_batch_size=8, block_size=8, seed=0)
    collator = PairCollator(embedder, image_root)
    step = ContrastiveStep(model, ContrastiveLoss(0.1), 4, 4, use_grad_cache=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    history = []
    for _ in range(30):
        batch = collator.inputs(data.get_many(sampler.next_batch()))
        assert len(set(batch.targets)) == 8, "one block per batch: 8 distinct targets"
        optimizer.zero_grad(set_to_none=True)
        history.append(step(batch.queries, batch.targets, batch.negatives, collator.collate))
        optimizer.step()

    def mean(key: str, part: list[dict]) -> float:
        return sum(out[key] for out in part) / len(part)

    first, last = history[:5], history[-5:]
    assert mean("loss", last) < mean("loss", first) - 0.3, [round(out["loss"], 3) for out in history]
    assert mean("accuracy", last) > mean("accuracy", first) + 0.1, [out["accuracy"] for out in history]
