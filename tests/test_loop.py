"""The shared training loop: schedule, checkpoints, exact resume — on a toy task with dropout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from coma.train.config import TrainSettings
from coma.train.loop import DistInfo, StepResult, latest_checkpoint, train


class ToyTask:
    """Regression with dropout; the data position is part of the state so resume must restore it."""

    def __init__(self, total_steps: int, interrupt_after: int | None = None) -> None:
        torch.manual_seed(0)
        self.module = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.Linear(16, 1))
        generator = torch.Generator().manual_seed(1)
        self.inputs = torch.randn(64, 4, generator=generator)
        self.targets = self.inputs.sum(dim=1, keepdim=True)
        self.total_steps = total_steps
        self.position = 0
        self.interrupt_after = interrupt_after
        self.steps_run = 0

    def step(self, module, no_sync) -> StepResult:
        if self.interrupt_after is not None and self.steps_run == self.interrupt_after:
            raise KeyboardInterrupt("simulated kill")
        index = torch.arange(self.position, self.position + 8) % len(self.inputs)
        self.position += 8
        loss = nn.functional.mse_loss(module(self.inputs[index]), self.targets[index])
        loss.backward()
        self.steps_run += 1
        return StepResult(loss=loss.item(), samples=8, tokens=32)

    def data_state(self) -> dict:
        return {"position": self.position}

    def load_data_state(self, state: dict) -> None:
        self.position = state["position"]

    def finish(self, out_dir: Path) -> Path:
        torch.save(self.module.state_dict(), out_dir / "final.pt")
        return out_dir

    def finish_from_checkpoint(self, checkpoint: Path, out_dir: Path) -> Path:
        raise AssertionError("only sharded runs finish from a checkpoint")

    def shard_units(self) -> list[torch.nn.Module]:
        return []


def losses(out_dir: Path) -> list[float]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


SETTINGS = dict(learning_rate=1e-2, warmup_ratio=0.2, save_every=3, show_progress=False, seed=7)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    settings = TrainSettings(**SETTINGS)
    train(ToyTask(10), settings, tmp_path / "full", dist_info=DistInfo())
    with pytest.raises(KeyboardInterrupt):
        train(ToyTask(10, interrupt_after=7), settings, tmp_path / "cut", dist_info=DistInfo())
    assert latest_checkpoint(tmp_path / "cut").name == "step-0000006"
    summary = train(ToyTask(10), settings, tmp_path / "cut", dist_info=DistInfo(), resume=True)
    assert summary["resumed_from"] == 6
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    full = torch.load(tmp_path / "full" / "final.pt", weights_only=True)
    resumed = torch.load(tmp_path / "cut" / "final.pt", weights_only=True)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_half_written_checkpoint_is_ignored_and_old_ones_pruned(tmp_path):
    train(ToyTask(10), TrainSettings(**SETTINGS, keep_checkpoints=2), tmp_path, dist_info=DistInfo())
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-0000009", "step-0000010"]  # the final step is always saved
    (tmp_path / "checkpoints" / "step-0000012.partial").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-0000010"


def test_cosine_schedule_with_warmup(tmp_path):
    train(ToyTask(10), TrainSettings(**SETTINGS), tmp_path, dist_info=DistInfo())
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # transformers' warmup of ceil(0.2 * 10) = 2 steps starts from 0, then cosine decay.
    assert lrs[:3] == pytest.approx([0.0, 1e-2 / 2, 1e-2])
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False)) and lrs[-1] < 1e-3


def test_resume_on_another_world_size_keeps_the_data_position(tmp_path, capsys):
    train(ToyTask(4), TrainSettings(**SETTINGS), tmp_path, dist_info=DistInfo())
    state_file = latest_checkpoint(tmp_path) / "trainer_state.json"
    state_file.write_text(json.dumps({"step": 4, "world_size": 2}))
    task = ToyTask(6)
    summary = train(task, TrainSettings(**SETTINGS), tmp_path, dist_info=DistInfo(), resume=True)
    # Rank 0's position after step 4, then 2 steps.
    assert summary["resumed_from"] == 4 and task.position == 6 * 8
    assert "written by 2 process(es), resumed on 1" in capsys.readouterr().out
