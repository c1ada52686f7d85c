"""``coma compress`` end to end on a tiny model: learning, exact resume, merge equivalence, 2-process DDP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from coma import Embedder
from coma.cli import main
from coma.data.synth import generate_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate_world(out, seed=0, size="tiny")
    return out


def compress_args(model, world, out, *extra, steps=6):
    return ["compress", "--model", str(model), "--data", str(world / "stage1" / "conversations.jsonl"),
            "--image-root", str(world / "images"), "--out", str(out), "--num-tokens", "4",
            "--max-length", "256", "--train.global-batch-size", "8", "--train.micro-batch-size", "4",
            "--train.max-steps", str(steps), "--train.save-every", "2", "--train.learning-rate", "3e-3",
            "--train.warmup-ratio", "0", "--train.show-progress", "false", "--lora.r", "8",
            "--lora.dropout", "0.0", *extra]  # fmt: skip


def read_losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_on_a_small_overfit_set(tiny_model_dir, world, tmp_path):
    args = compress_args(tiny_model_dir, world, tmp_path / "run", "--full", steps=24)
    assert main([*args, "--train.micro-batch-size", "8"]) == 0
    losses = read_losses(tmp_path / "run")
    assert np.mean(losses[-4:]) < 0.75 * np.mean(losses[:4]), losses


def test_resume_after_a_kill_reproduces_the_losses(tiny_model_dir, world, tmp_path):
    from coma.train.compress import CompressTask

    assert main(compress_args(tiny_model_dir, world, tmp_path / "full")) == 0
    original_step, calls = CompressTask.step, []

    def dying_step(self, module, no_sync):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated kill")
        return original_step(self, module, no_sync)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CompressTask, "step", dying_step)
        with pytest.raises(KeyboardInterrupt):
            main(compress_args(tiny_model_dir, world, tmp_path / "cut"))
    assert main(compress_args(tiny_model_dir, world, tmp_path / "cut", "--resume")) == 0
    np.testing.assert_allclose(
        read_losses(tmp_path / "cut"), read_losses(tmp_path / "full"), rtol=0, atol=1e-6
    )


def test_merged_model_equals_the_adapter_model(tiny_model_dir, world, tmp_path):
    from coma.recipes import from_dict
    from coma.train.compress import CompressConfig, CompressTask
    from coma.train.loop import DistInfo
    from coma.train.trainable import load_trainable_state

    out = tmp_path / "run"
    assert main(compress_args(tiny_model_dir, world, out, steps=4)) == 0
    config = from_dict(CompressConfig, json.loads((out / "run_config.json").read_text())["config"])
    task = CompressTask(config, DistInfo(), with_data=False)
    load_trainable_state(task.module, load_file(str(out / "checkpoints" / "step-0000004" / "trainable.safetensors")),
                         source="test")  # fmt: skip
    inputs = ["a red circle", {"text": "what is this?", "image": world / "images" / sorted(
        p.relative_to(world / "images") for p in (world / "images").rglob("*.png"))[0]}]  # fmt: skip
    task.embedder.model.eval()
    with torch.no_grad():
        adapter_out = task.embedder.encode(inputs, show_progress=False)
    merged = Embedder.from_pretrained(out)
    np.testing.assert_allclose(merged.encode(inputs, show_progress=False), adapter_out, atol=1e-5)
    assert not np.allclose(Embedder.from_pretrained(tiny_model_dir, num_tokens=4).encode(inputs, show_progress=False),
                           adapter_out, atol=1e-3), "training must have changed the model"  # fmt: skip


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(tiny_model_dir, world, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun ships with torch"
    assert main(compress_args(tiny_model_dir, world, tmp_path / "one", steps=3)) == 0
    command = [torchrun, "--nproc_per_node=2", "--master_port=29531", "-m", "coma.cli",
               *compress_args(tiny_model_dir, world, tmp_path / "two", steps=3)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(read_losses(tmp_path / "two"), read_losses(tmp_path / "one"), atol=1e-5)
    one = load_file(str(tmp_path / "one" / "checkpoints" / "step-0000003" / "trainable.safetensors"))
    two = load_file(str(tmp_path / "two" / "checkpoints" / "step-0000003" / "trainable.safetensors"))
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=0)


def test_training_order_does_not_depend_on_the_data_folder(tiny_model_dir, world, tmp_path):
    moved = tmp_path / "elsewhere" / "stage1"
    moved.mkdir(parents=True)
    shutil.copy(world / "stage1" / "conversations.jsonl", moved / "conversations.jsonl")
    args = compress_args(tiny_model_dir, world, tmp_path / "here", steps=3)
    assert main(args) == 0
    args[args.index("--data") + 1] = str(moved / "conversations.jsonl")
    args[args.index("--out") + 1] = str(tmp_path / "there")
    assert main(args) == 0
    assert read_losses(tmp_path / "here") == read_losses(tmp_path / "there")
