"""Mixed precision without FSDP (fp32 trainable weights under bf16 autocast), the stage-2 LM head, per-rank RNG."""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed
from safetensors import safe_open
from torch import nn

from coma import Embedder
from coma.data.synth import generate_world
from coma.train.compress import CompressConfig, CompressTask
from coma.train.config import LoraSettings, TrainSettings
from coma.train.loop import DistInfo, StepResult, train
from coma.train.parallel import parallelize
from coma.train.trainable import make_trainable


def _bf16_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1)).to(torch.bfloat16)
    model[0].requires_grad_(False)
    with torch.no_grad():
        model[1].weight.fill_(1.0)
    return model


def test_float16_training_is_refused_for_want_of_loss_scaling():
    with pytest.raises(ValueError, match="float16 would need loss scaling"):
        TrainSettings(dtype="float16")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        TrainSettings(dtype="fp8")


def test_single_process_keeps_trainable_weights_in_fp32_and_computes_under_autocast():
    model = _bf16_model()
    parallel = parallelize(model, strategy="ddp", world_size=1, device=torch.device("cpu"),
                           compute_dtype=torch.bfloat16, shard_units=list)  # fmt: skip
    assert model[0].weight.dtype == torch.bfloat16, "frozen weights stay as loaded"
    assert model[1].weight.dtype == torch.float32
    optimizer = torch.optim.AdamW(model[1].parameters(), lr=1e-6, weight_decay=0.0)
    with parallel.autocast():
        output = parallel.model(torch.ones(2, 8, dtype=torch.bfloat16))
        assert output.dtype == torch.bfloat16, "matmuls run in bf16"
        output.float().sum().backward()
    optimizer.step()
    # 1 + 1e-6 rounds back to 1 in bf16 (resolution 2^-7 near 1): the update survives only in fp32.
    assert (model[1].weight != 1.0).all()


def test_fp32_runs_do_not_autocast():
    parallel = parallelize(nn.Linear(2, 2), strategy="ddp", world_size=1, device=torch.device("cpu"),
                           compute_dtype=torch.float32, shard_units=list)  # fmt: skip
    with parallel.autocast():
        assert not torch.is_autocast_enabled("cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate_world(out, seed=0, size="tiny")
    return out


@pytest.mark.parametrize("full_finetune", [False, True])
def test_bf16_stage1_trains_fp32_weights_and_saves_bf16(tiny_model_dir, world, tmp_path, full_finetune):
    """The whole stage-1 path under CPU bf16 autocast: masks in bf16, fp32 master weights, a bf16 model saved."""
    config = CompressConfig(
        model=str(tiny_model_dir), data=[str(world / "stage1" / "conversations.jsonl")],
        image_root=str(world / "images"), out=str(tmp_path / "run"), num_tokens=4, max_length=256,
        train=TrainSettings(global_batch_size=2, micro_batch_size=1, max_steps=2, device="cpu", dtype="bfloat16",
                            learning_rate=1e-3, show_progress=False),
        lora=LoraSettings(r=4, full_finetune=full_finetune),
    )  # fmt: skip
    summary = train(CompressTask(config, DistInfo()), config.train, config.out, dist_info=DistInfo())
    assert summary["final_loss"] == pytest.approx(summary["final_loss"])  # finite, not NaN
    run = tmp_path / "run"
    assert dtypes(run / "checkpoints" / "step-0000002" / "trainable.safetensors") == {"F32"}
    assert dtypes(run / "model.safetensors") == {"BF16"}


def dtypes(path) -> set[str]:
    with safe_open(str(path), "pt") as handle:
        return {handle.get_slice(name).get_dtype() for name in handle.keys()}  # noqa: SIM118


def test_stage2_full_finetune_leaves_an_untied_lm_head_frozen(tiny_model_dir):
    embedder = Embedder.from_pretrained(tiny_model_dir, num_tokens=4)
    backbone = embedder.model.backbone
    backbone.lm_head.weight = nn.Parameter(backbone.lm_head.weight.detach().clone())  # untie
    token_ids = embedder.model.token_ids.tolist()
    full = LoraSettings(full_finetune=True)
    make_trainable(backbone, embedder.adapter, token_ids, full, train_lm_head=False)
    assert not backbone.lm_head.weight.requires_grad
    assert backbone.get_input_embeddings().weight.requires_grad
    make_trainable(backbone, embedder.adapter, token_ids, full, train_lm_head=True)
    assert backbone.lm_head.weight.requires_grad


def test_stage2_full_finetune_trains_a_tied_embedding(tiny_model_dir):
    embedder = Embedder.from_pretrained(tiny_model_dir, num_tokens=4)
    backbone = embedder.model.backbone
    assert backbone.get_output_embeddings().weight is backbone.get_input_embeddings().weight
    make_trainable(backbone, embedder.adapter, embedder.model.token_ids.tolist(),
                   LoraSettings(full_finetune=True), train_lm_head=False)  # fmt: skip
    assert backbone.get_input_embeddings().weight.requires_grad


class DropoutTask:
    """Records the dropout masks each rank draws; the weights must start identical on every rank."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.module = nn.Sequential(nn.Linear(4, 64), nn.Dropout(0.5))
        self.total_steps = 1
        self.masks: list[torch.Tensor] = []

    def step(self, module, no_sync) -> StepResult:
        output = module(torch.ones(1, 4))
        self.masks.append(output != 0)
        output.sum().backward()
        return StepResult(loss=0.0, samples=1)

    def data_state(self) -> dict:
        return {}

    def load_data_state(self, state: dict) -> None:
        pass

    def finish(self, out_dir):
        return out_dir

    def shard_units(self) -> list[nn.Module]:
        return []


def _dropout_masks(rank, world_size, out_dir):
    task = DropoutTask()
    weights = task.module[0].weight.detach().clone()
    settings = TrainSettings(max_steps=1, show_progress=False, save_every=100, device="cpu")
    train(task, settings, out_dir, dist_info=DistInfo(rank, world_size))
    return weights, task.masks[0]


def test_dropout_differs_per_rank(tmp_path):
    (w0, mask0), (w1, mask1) = run_distributed(_dropout_masks, 2, tmp_path, tmp_path / "run")
    assert torch.equal(w0, w1), "initial weights must not depend on the rank"
    assert not torch.equal(mask0, mask1), "every rank drew the same dropout mask"
