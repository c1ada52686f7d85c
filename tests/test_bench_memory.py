"""scripts/bench_memory.py on a tiny model: one fake-tensor step of coma's own training code per configuration, and
breakdowns that behave as memory must (categories add up to the peak, FSDP shards, checkpointing saves)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from bench_memory import FIELDS, Memory, Setup, combine, format_table, measure  # noqa: E402


def _setup(folder: Path, **kwargs) -> Setup:
    # 4 LM layers so that checkpointing has layers to save; 16 visual tokens (112 px) on the tiny ViT.
    return Setup(model=str(folder), stage=1, full=True, layers=4, visual_tokens=16, **kwargs)


def _check_adds_up(memory: Memory) -> None:
    parts = memory.params + memory.grads + memory.optimizer + memory.activations
    assert memory.peak == pytest.approx(parts, rel=1e-9)  # every category of the tracker lands in a column
    assert memory.params > 0 and memory.activations > 0
    assert memory.phase in ("forward", "backward", "optimizer")


def test_stage1_breakdowns(tiny_model_dirs):
    """Full fine-tuning of a tiny Qwen2.5-VL: DDP with and without checkpointing, FSDP over 8 fake ranks."""
    folder = tiny_model_dirs["qwen2_5_vl"]
    ddp = measure(_setup(folder, strategy="ddp"))
    ddp_no_ckpt = measure(_setup(folder, strategy="ddp", checkpointing=False))
    fsdp = measure(_setup(folder, strategy="fsdp"))
    for memory in (ddp, ddp_no_ckpt, fsdp):
        _check_adds_up(memory)
    # The same sequence went through (1024 visual tokens would be 64 x more).
    assert ddp.tokens == ddp_no_ckpt.tokens == fsdp.tokens > 2 * 16
    # DDP: the fp32 gradients of every trainable weight, held as views of the reducer's buckets (one copy, for the
    # whole step), and AdamW's two moments of each.
    assert ddp.grads > 0
    assert ddp.optimizer == pytest.approx(2 * ddp.grads, rel=0.01)
    # FSDP holds an eighth of the optimizer state and fewer weights per rank.
    assert fsdp.optimizer == pytest.approx(ddp.optimizer / 8, rel=0.05)
    assert fsdp.params < ddp.params
    # Checkpointing keeps layer inputs instead of every intermediate.
    assert ddp.activations < ddp_no_ckpt.activations
    assert ddp.peak < ddp_no_ckpt.peak


def test_stage2_grad_cache_step(tiny_model_dirs):
    """Stage 2 (GradCache over 2 + 2 chunks) under FSDP with LoRA: adapters and their AdamW state are a sliver."""
    memory = measure(
        Setup(model=str(tiny_model_dirs["qwen2_5_vl"]), stage=2, strategy="fsdp", layers=2, visual_tokens=16,
              chunk_size=2)
    )  # fmt: skip
    _check_adds_up(memory)
    assert memory.phase == "backward"
    assert memory.optimizer < memory.params / 10


def test_combine_and_table():
    """The linear extrapolation is per category, and the table prints one row per result in GiB."""
    gib = 2**30
    a = Memory(params=1 * gib, grads=0, optimizer=0, activations=1 * gib, peak=2 * gib)
    b = Memory(params=2 * gib, grads=0, optimizer=0, activations=1.5 * gib, peak=3.5 * gib)
    extrapolated = combine(a, (4, a, b))
    assert [getattr(extrapolated, name) / gib for name in FIELDS] == [5, 0, 0, 3, 8]
    row = {"size": "3b", "stage": 2, "full": False, "strategy": "fsdp", "checkpointing": True}
    table = format_table([{"row": row, "result": vars(extrapolated)}])
    assert table.splitlines()[-1] == "| 3B DoRA | 2 match | FSDP x8 | on | 5.0 | 0.0 | 0.0 | 3.0 | **8.0** |"
