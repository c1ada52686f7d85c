"""The training input pipeline: GradCache collates each chunk once, a frozen vision tower runs once per chunk and
gives the same gradients, workers give the same run as the in-process path, and resume stays exact with workers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_utils import run_distributed
from helpers import FAMILIES
from peft import LoraConfig, get_peft_model
from PIL import Image
from torch import nn

from coma import Embedder
from coma.cli import main
from coma.data.synth import generate_world
from coma.embedder import EncodeInput
from coma.losses import ContrastiveLoss
from coma.train.stage2_step import ContrastiveStep, needs_dummy_image, vision_frozen

TEMPERATURE = 0.5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: the box has two cores shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _image(seed: int, size: int = 56) -> Image.Image:
    return Image.new("RGB", (size, size), (40 * seed % 255, 90, 200 - 30 * seed))


def _queries() -> list[EncodeInput]:
    images = [
        EncodeInput("<|image_1|>\nRepresent the given image", _image(i, 56 if i % 2 else 84))
        for i in range(5)
    ]
    return [*images, EncodeInput("a caption without an image")]


def _targets() -> list[EncodeInput]:
    texts = [EncodeInput(f"label {i}") for i in range(5)]
    return [*texts[:3], EncodeInput("<|image_1|>\nRepresent the given image.", _image(7)), *texts[3:5]]


def _negatives() -> list[EncodeInput]:
    return [EncodeInput("label 9"), EncodeInput("", _image(8)), EncodeInput("label 10")]


def _lora_embedder(model_dir: Path, dropout: float = 0.2) -> Embedder:
    """LoRA on the LM attention plus trainable compression rows (the vision tower stays frozen), random A and B."""
    embedder = Embedder.from_pretrained(model_dir)
    embedder.model.train()
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
        name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None
    }
    model.zero_grad(set_to_none=True)
    return grads


def _assert_same_grads(got: dict, expected: dict, atol: float) -> None:
    assert got.keys() == expected.keys() and got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=atol, rtol=0, msg=name)


def _count_vision_calls(embedder: Embedder) -> list[int]:
    calls: list[int] = []
    tower = embedder.adapter.vision_tower(embedder.model.backbone)
    tower.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


@pytest.fixture(scope="module")
def lora_embedder(tiny_model_dir) -> Embedder:
    return _lora_embedder(tiny_model_dir)


def test_grad_cache_collates_each_chunk_once_and_keeps_the_gradients(lora_embedder):
    model = lora_embedder.model
    collated: list[int] = []

    def counting_collate(items):
        collated.append(len(items))
        return lora_embedder.collate(items)

    results = {}
    for use_grad_cache in (True, False):
        collated.clear()
        step = ContrastiveStep(
            model, ContrastiveLoss(TEMPERATURE), 2, 3, use_grad_cache, dummy_image=False, reuse_vision=False
        )
        torch.manual_seed(5)  # same dropout masks in both steps
        out = step(_queries(), _targets(), _negatives(), counting_collate)
        results[use_grad_cache] = (out, _take_grads(model), list(collated))
    (cached, cached_grads, cached_calls), (plain, plain_grads, plain_calls) = results[True], results[False]
    chunks = math.ceil(6 / 2) + math.ceil(6 / 3) + math.ceil(3 / 3)
    # One collation per chunk, whether the chunk is encoded once (plain) or twice (GradCache's no-grad pass + replay).
    assert cached_calls == plain_calls == [2, 2, 2, 3, 3, 3]
    assert len(cached_calls) == chunks
    assert cached == pytest.approx(plain, abs=1e-6)
    _assert_same_grads(cached_grads, plain_grads, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_vision_reuse_gives_the_recomputed_gradients(tiny_model_dirs, family):
    """fp32, LoRA dropout on: the replay fed the no-grad pass's image features (Qwen3-VL: and DeepStack features)
    gives the gradients of running the frozen tower again, and the tower runs once per image chunk instead of twice."""
    embedder = _lora_embedder(tiny_model_dirs[family])
    model = embedder.model
    assert vision_frozen(model)
    calls = _count_vision_calls(embedder)
    results = {}
    for reuse in (True, False):
        calls.clear()
        step = ContrastiveStep(
            model,
            ContrastiveLoss(TEMPERATURE),
            2,
            2,
            use_grad_cache=True,
            dummy_image=False,
            reuse_vision=reuse,
        )
        assert step.reuse_vision == reuse
        torch.manual_seed(3)
        out = step(_queries(), _targets(), _negatives(), embedder.collate)
        results[reuse] = (out, _take_grads(model), len(calls))
    (reused, reused_grads, reused_calls), (recomputed, recomputed_grads, recomputed_calls) = (
        results[True],
        results[False],
    )
    # Image chunks: queries 3 of 3, targets 1 of 3 (text-only chunks need no dummy in one process), negatives 1 of 2.
    assert reused_calls == 3 + 1 + 1 and recomputed_calls == 2 * reused_calls
    assert reused == pytest.approx(recomputed, abs=1e-6)
    _assert_same_grads(reused_grads, recomputed_grads, atol=1e-6)
    assert ContrastiveStep(model, ContrastiveLoss()).reuse_vision  # on by default with a frozen tower


def test_reuse_needs_a_frozen_tower_and_the_dummy_only_where_needed(tiny_model_dir):
    embedder = Embedder.from_pretrained(tiny_model_dir)  # nothing frozen
    model = embedder.model
    assert not vision_frozen(model) and not ContrastiveStep(model, ContrastiveLoss()).reuse_vision
    with pytest.raises(ValueError, match="frozen vision tower"):
        ContrastiveStep(model, ContrastiveLoss(), reuse_vision=True)
    assert needs_dummy_image(model, distributed=True, strategy="ddp")
    assert not needs_dummy_image(model, distributed=False, strategy="ddp")
    embedder.adapter.vision_tower(model.backbone).requires_grad_(False)
    assert not needs_dummy_image(model, distributed=True, strategy="ddp")
    # FSDP shards every vision block: each rank must run the tower as often as the others.
    assert needs_dummy_image(model, distributed=True, strategy="fsdp")


# ---------------------------------------------------------------------------------------------------------------
# Two gloo ranks, frozen vision, no dummy image


def _rank_share(rank: int) -> tuple[list[EncodeInput], list[EncodeInput]]:
    """Rank 0: image queries; rank 1: text only, so under DDP rank 1 never runs the (frozen) vision tower."""
    if rank == 0:
        return _queries()[:4], _targets()[:4]
    return [EncodeInput("a white square"), EncodeInput("a black square")], [
        EncodeInput("white"),
        EncodeInput("black"),
    ]


def _ddp_frozen_worker(rank: int, world_size: int, model_dir: Path) -> dict:
    torch.manual_seed(0)
    embedder = _lora_embedder(model_dir, dropout=0.0)
    ddp = nn.parallel.DistributedDataParallel(embedder.model)
    dummy = needs_dummy_image(embedder.model, distributed=True, strategy="ddp")
    step = ContrastiveStep(embedder.model, ContrastiveLoss(TEMPERATURE), 2, 2, dummy_image=dummy)
    out = step(*_rank_share(rank), None, embedder.collate, ddp.no_sync, model=ddp)
    return {"dummy": dummy, "reuse": step.reuse_vision, "out": out, "grads": _take_grads(embedder.model)}


@pytest.mark.slow  # ~15 s: two Python processes
def test_two_ranks_with_a_frozen_tower_need_no_dummy_image(tiny_model_dir, tmp_path):
    ranks = run_distributed(_ddp_frozen_worker, 2, tmp_path, tiny_model_dir)
    embedder = _lora_embedder(tiny_model_dir, dropout=0.0)
    shares = [_rank_share(rank) for rank in range(2)]
    step = ContrastiveStep(embedder.model, ContrastiveLoss(TEMPERATURE), 4, 4, dummy_image=False)
    expected = step(
        *([item for share in shares for item in share[g]] for g in range(2)), None, embedder.collate
    )
    expected_grads = _take_grads(embedder.model)
    for result in ranks:
        assert not result["dummy"] and result["reuse"]
        assert result["out"]["loss"] == pytest.approx(expected["loss"], abs=1e-5)
        _assert_same_grads(result["grads"], expected_grads, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Both stages through the CLI: workers change nothing, and a killed run resumes exactly


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, seed=0, size="tiny")
    return out


def _stage_args(stage: str, model: Path, world: Path, out: Path, workers: int) -> list[str]:
    common = ["--model", str(model), "--image-root", str(world / "images"), "--out", str(out), "--num-tokens", "4",
              "--train.global-batch-size", "8", "--train.max-steps", "5", "--train.save-every", "2",
              "--train.learning-rate", "2e-3", "--train.show-progress", "false", "--lora.r", "4",
              "--num-workers", str(workers)]  # fmt: skip
    if stage == "compress":
        return ["compress", *common, "--data", str(world / "stage1" / "conversations.jsonl"),
                "--max-length", "256", "--train.micro-batch-size", "4"]  # fmt: skip
    return ["match", *common, "--data", str(world / "train"), "--block-size", "4",
            "--query-chunk-size", "4", "--target-chunk-size", "4"]  # fmt: skip


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # ~40 s per stage on two shared cores
@pytest.mark.parametrize("stage", ["compress", "match"])
def test_workers_resume_exactly_after_a_kill(tiny_model_dir, world, tmp_path, stage):
    """The in-process run, and a run with 2 workers killed in step 4 (workers well ahead of it) then resumed from
    the step-2 checkpoint: the same losses step for step (LoRA dropout on, so the RNG streams must match too)."""
    from coma.train.compress import CompressTask
    from coma.train.match import MatchTask

    task = CompressTask if stage == "compress" else MatchTask
    assert main(_stage_args(stage, tiny_model_dir, world, tmp_path / "inline", workers=0)) == 0
    original_step, calls = task.step, []

    def dying_step(self, module, no_sync):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated kill")
        return original_step(self, module, no_sync)

    cut = tmp_path / "cut"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(task, "step", dying_step)
        with pytest.raises(KeyboardInterrupt):
            main(_stage_args(stage, tiny_model_dir, world, cut, workers=2))
    assert main([*_stage_args(stage, tiny_model_dir, world, cut, workers=2), "--resume"]) == 0
    inline, resumed = _metrics(tmp_path / "inline"), _metrics(cut)
    assert [record["step"] for record in resumed] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in inline], rtol=0, atol=1e-6)
    assert all(record["data_wait_s"] >= 0 for record in resumed)


def test_the_worker_side_of_both_stages_pickles(tiny_model_dir, world, tmp_path):
    """Spawned workers (macOS, Python 3.14's forkserver, processes started by mp.spawn) get pickled copies."""
    import pickle

    from coma.train.compress import CompressConfig, CompressTask
    from coma.train.config import TrainSettings
    from coma.train.loop import DistInfo
    from coma.train.match import MatchConfig, MatchTask

    def settings() -> TrainSettings:
        return TrainSettings(
            global_batch_size=8, micro_batch_size=4, max_steps=2, num_workers=2, show_progress=False
        )

    common = {"model": str(tiny_model_dir), "image_root": str(world / "images"), "num_tokens": 4}
    tasks = [
        CompressTask(CompressConfig(data=[str(world / "stage1" / "conversations.jsonl")], out=str(tmp_path / "s1"),
                                    max_length=256, train=settings(), **common), DistInfo()),
        MatchTask(MatchConfig(data=str(world / "train"), out=str(tmp_path / "s2"), block_size=4, train=settings(),
                              **common), DistInfo()),
    ]  # fmt: skip
    for task in tasks:
        prepare = task.batches.pipeline.prepare.prepare
        job = task.batches.make_job(task.sampler.next_batch())
        copy = pickle.loads(pickle.dumps(prepare))
        assert type(copy(job)) is type(prepare(job))
