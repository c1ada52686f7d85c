"""scripts/bench_gpu.py: skips cleanly without a GPU, and its FLOP count agrees with torch's own counter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FAMILIES, random_image
from torch.utils.flop_counter import FlopCounterMode

from coma import Embedder
from coma.embedder import EncodeInput

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from bench_gpu import FlopCounter, token_counts  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_skips_cleanly_without_a_gpu():
    result = subprocess.run([sys.executable, str(SCRIPTS / "bench_gpu.py")], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no CUDA device; skipping" in result.stdout


def test_cpu_smoke_runs_every_case():
    """The whole script on a small model (not a measurement): it must stay runnable for the next GPU session."""
    args = ["--cpu-smoke", "--items", "16", "--batch-size", "8", "--repeats", "1", "--train-steps", "2",
            "--train-batch", "16"]  # fmt: skip
    result = subprocess.run([sys.executable, str(SCRIPTS / "bench_gpu.py"), *args], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    for case in ("encode-image (items/s)", "encode-text (items/s)", "train-match (pairs/s)"):
        assert f"| {case} |" in result.stdout
    assert "vision attention: transformers' SDPA loop" in result.stdout
    assert "default (packed_sdpa)" in result.stdout


@pytest.mark.parametrize("family", FAMILIES)
def test_linear_flops_equal_torchs_count(tiny_model_dirs, family):
    """The matmuls of linear layers (addmm / mm) that torch counts in a real forward, image and text inputs (one per
    batch: padding costs FLOPs but is not useful work, so the estimate leaves it out)."""
    embedder = Embedder.from_pretrained(tiny_model_dirs[family])
    counter = FlopCounter(embedder.model.backbone)
    for item in (
        EncodeInput("<|image_1|>\nWhat is shown?", random_image(0, (112, 84))),
        EncodeInput("a red circle"),
    ):
        batch = embedder.collate([item])
        with FlopCounterMode(display=False) as mode, torch.no_grad():
            embedder.model(batch)
        counted = mode.get_flop_counts()["Global"]
        matmuls = sum(count for op, count in counted.items() if str(op) in ("aten.addmm", "aten.mm"))
        assert counter.linear(*token_counts(batch)) == pytest.approx(
            matmuls, rel=0.01
        )  # no LM head: coma pools
