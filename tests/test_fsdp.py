"""``--strategy fsdp`` (FSDP2) against DDP, two gloo processes on the CPU, through the CLI: the same losses and merged
weights for both stages, LoRA and full fine-tuning, with and without GradCache; exact resume of a sharded run, and
resume on another number of processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_utils import run_distributed
from safetensors.torch import load_file

from coma import Embedder
from coma.cli import main
from coma.data.synth import generate_world

pytestmark = pytest.mark.slow
ACCELERATE_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "accelerate"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate_world(out, seed=0, size="tiny")
    return out


def compress_args(model, world, out, *extra, steps=3):
    return ["compress", "--model", str(model), "--data", str(world / "stage1" / "conversations.jsonl"),
            "--image-root", str(world / "images"), "--out", str(out), "--num-tokens", "4",
            "--max-length", "256", "--train.global-batch-size", "8", "--train.micro-batch-size", "2",
            "--train.max-steps", str(steps), "--train.save-every", "2", "--train.learning-rate", "3e-3",
            "--train.warmup-ratio", "0", "--train.show-progress", "false", "--lora.r", "8",
            "--lora.dropout", "0.0", *extra]  # fmt: skip


def match_args(model, world, out, *extra, steps=3):
    return ["match", "--model", str(model), "--data", str(world / "train"), "--image-root", str(world / "images"),
            "--out", str(out), "--block-size", "4", "--query-chunk-size", "2", "--target-chunk-size", "2",
            "--num-tokens", "4", "--train.global-batch-size", "8", "--train.max-steps", str(steps),
            "--train.save-every", "2", "--train.learning-rate", "1e-3", "--train.warmup-ratio", "0",
            "--train.show-progress", "false", "--lora.r", "4", "--lora.dropout", "0.0", *extra]  # fmt: skip


class Killed(Exception):
    pass


def _run_all(rank: int, world_size: int, runs: list[list[str]], kill: tuple[str, int] | None = None) -> None:
    """Each rank runs the CLI commands in ``runs`` one after another; ``kill = (stage, n)`` makes the first command
    die in its n-th step (after the step-2 checkpoint) on every rank, like a killed job."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    patch = pytest.MonkeyPatch()
    if kill is not None:
        from coma.train.run import stage_classes

        task_class = stage_classes(kill[0])[1]
        original, calls = task_class.step, []

        def dying_step(self, module, no_sync):
            calls.append(1)
            if len(calls) == kill[1]:
                raise Killed
            return original(self, module, no_sync)

        patch.setattr(task_class, "step", dying_step)
    try:
        for index, args in enumerate(runs):
            try:
                assert main(args) == 0, args
            except Killed:
                assert index == 0
                patch.undo()
    finally:
        patch.undo()


def read_losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run: Path, reference: Path, atol: float = 1e-5) -> None:
    np.testing.assert_allclose(read_losses(run), read_losses(reference), rtol=0, atol=atol)
    merged, expected = (
        load_file(str(run / "model.safetensors")),
        load_file(str(reference / "model.safetensors")),
    )
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=atol, msg=name)


def test_compress_fsdp_equals_ddp(tiny_model_dirs, world, tmp_path):
    model = tiny_model_dirs["qwen2_vl"]
    variants = {
        "lora": (model, []), "full": (model, ["--full"]),
        "full-checkpointed": (model, ["--full", "--gradient-checkpointing"]),
        "full-sync-each-backward": (model, ["--full", "--fsdp-defer-gradient-sync", "false"]),
        # The other families' vision towers (window attention; DeepStack features) shard the same way.
        "qwen2_5_vl-lora": (tiny_model_dirs["qwen2_5_vl"], []), "qwen3_vl-lora": (tiny_model_dirs["qwen3_vl"], []),
    }  # fmt: skip
    runs = [compress_args(path, world, tmp_path / f"{strategy}-{name}", "--strategy", strategy, *flags)
            for name, (path, flags) in variants.items() for strategy in ("ddp", "fsdp")]  # fmt: skip
    run_distributed(_run_all, 2, tmp_path, runs)
    for name in variants:
        assert_same_run(tmp_path / f"fsdp-{name}", tmp_path / f"ddp-{name}")
        checkpoint = tmp_path / f"fsdp-{name}" / "checkpoints" / "step-0000003"
        assert (checkpoint / "sharded" / ".metadata").is_file()
        assert not (checkpoint / "trainable.safetensors").exists()
    # Training moved the weights (the equality above is not two untouched copies of the base).
    base = load_file(str(model / "model.safetensors"))
    trained = load_file(str(tmp_path / "fsdp-full" / "model.safetensors"))
    assert any(not torch.equal(trained[name], base[name]) for name in base if "layers.0.mlp" in name)


def test_match_fsdp_equals_ddp_with_and_without_grad_cache(tiny_model_dir, world, tmp_path):
    variants = {
        "lora-gc": [], "lora-plain": ["--grad-cache", "false"], "full-gc": ["--full"],
        "full-plain": ["--full", "--grad-cache", "false"],
    }  # fmt: skip
    runs = [match_args(tiny_model_dir, world, tmp_path / f"{strategy}-{name}", "--strategy", strategy, *flags)
            for name, flags in variants.items() for strategy in ("ddp", "fsdp")]  # fmt: skip
    checkpointed = tmp_path / "fsdp-full-gc-checkpointed"
    runs.append(match_args(tiny_model_dir, world, checkpointed, "--strategy", "fsdp", "--full",
                           "--gradient-checkpointing"))  # fmt: skip
    synced_each = tmp_path / "fsdp-full-gc-sync-each-backward"
    runs.append(match_args(tiny_model_dir, world, synced_each, "--strategy", "fsdp", "--full",
                           "--fsdp-defer-gradient-sync", "false"))  # fmt: skip
    run_distributed(_run_all, 2, tmp_path, runs)
    assert_same_run(checkpointed, tmp_path / "ddp-full-gc")
    # Reduce-scattering after every chunk's backward accumulates the same gradients.
    assert_same_run(synced_each, tmp_path / "ddp-full-gc")
    for name in variants:
        assert_same_run(tmp_path / f"fsdp-{name}", tmp_path / f"ddp-{name}")
    # GradCache is exact under FSDP too: the replayed gradients equal the plain step's.
    assert_same_run(tmp_path / "fsdp-full-gc", tmp_path / "fsdp-full-plain")


def test_sharded_run_resumes_exactly_and_on_another_number_of_processes(tiny_model_dir, world, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = [
        match_args(tiny_model_dir, world, out, "--strategy", "fsdp", "--full", steps=4) for out in (cut, full)
    ]
    run_distributed(_run_all, 2, tmp_path, [args[0], [*args[0], "--resume"], args[1]], ("match", 3))
    assert len(read_losses(cut)) == 4
    assert_same_run(cut, full, atol=1e-6)

    # The 2-process step-2 checkpoint continues in one process: same data, same steps, the same model.
    single = tmp_path / "single"
    (single / "checkpoints").mkdir(parents=True)
    shutil.copytree(cut / "checkpoints" / "step-0000002", single / "checkpoints" / "step-0000002")
    shutil.copy(cut / "run_config.json", single / "run_config.json")
    assert (
        main(
            [*match_args(tiny_model_dir, world, single, "--strategy", "fsdp", "--full", steps=4), "--resume"]
        )
        == 0
    )
    np.testing.assert_allclose(read_losses(single), read_losses(full)[2:], rtol=0, atol=1e-5)  # steps 3 and 4

    # `coma merge` reads a sharded checkpoint in one process.
    assert (
        main(["merge", "--model", str(full / "checkpoints" / "step-0000004"), "--out", str(tmp_path / "m")])
        == 0
    )
    merged, final = (
        load_file(str(tmp_path / "m" / "model.safetensors")),
        load_file(str(full / "model.safetensors")),
    )
    for name, tensor in final.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=0, msg=name)


def test_fsdp_keeps_bf16_runs_trainable_weights_in_fp32(tiny_model_dir, world, tmp_path):
    """Under bf16 the trainable shards stay fp32, so an update far below bf16's resolution is kept, not rounded away."""
    import torch.distributed.checkpoint as dcp

    out = tmp_path / "run"
    args = compress_args(tiny_model_dir, world, out, "--strategy", "fsdp", "--dtype", "bfloat16", "--full",
                         "--train.learning-rate", "1e-6", steps=1)  # fmt: skip
    run_distributed(_run_all, 2, tmp_path, [args])
    sharded = out / "checkpoints" / "step-0000001" / "sharded"
    metadata = dcp.FileSystemReader(str(sharded)).read_metadata().state_dict_metadata
    state = {"model": {name.removeprefix("model."): torch.empty(entry.size, dtype=entry.properties.dtype)
                       for name, entry in metadata.items() if name.startswith("model.")}}  # fmt: skip
    dcp.load(state, checkpoint_id=str(sharded), no_dist=True)
    weights = state["model"]
    assert weights and all(tensor.dtype == torch.float32 for tensor in weights.values())
    base = Embedder.from_pretrained(tiny_model_dir, num_tokens=4).model.state_dict()
    name = next(name for name in weights if name.endswith("layers.0.mlp.up_proj.weight"))
    before = base[name].to(torch.bfloat16).float()
    moved = (weights[name] != before).float().mean()
    assert moved > 0.9, f"only {moved:.0%} of {name} moved"
    # The same update applied to bf16 weights would have been lost in rounding.
    assert ((before + (weights[name] - before)).to(torch.bfloat16).float() != before).float().mean() < 0.1


def _return_code(rank: int, world_size: int, args: list[str]) -> int:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    return main(args)


def test_unsharded_checkpoint_does_not_resume_a_sharded_run(tiny_model_dir, world, tmp_path, capfd):
    out = tmp_path / "run"
    assert main(compress_args(tiny_model_dir, world, out, steps=2)) == 0
    args = [*compress_args(tiny_model_dir, world, out, "--strategy", "fsdp", steps=3), "--resume"]
    assert run_distributed(_return_code, 2, tmp_path, args) == [1, 1]
    assert "is an unsharded checkpoint and this run is sharded (FSDP)" in capfd.readouterr().err


@pytest.mark.parametrize("config, stage", [("fsdp", "compress"), ("ddp", "match"), ("fsdp", "match")])
def test_accelerate_launch_runs_both_stages(tiny_model_dir, world, tmp_path, config, stage):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert accelerate, "accelerate is a dependency of coma"
    out = tmp_path / "run"
    stage_args = (compress_args if stage == "compress" else match_args)(tiny_model_dir, world, out, steps=2)
    command = [accelerate, "launch", "--config_file", str(ACCELERATE_CONFIGS / f"{config}.yaml"),
               "--num_processes", "2", "--main_process_port", "0", "-m", "coma.cli", *stage_args]  # fmt: skip
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(2 process(es)" in result.stdout
    assert json.loads((out / "train_summary.json").read_text())["strategy"] == config
    assert len(read_losses(out)) == 2 and (out / "model.safetensors").is_file()
