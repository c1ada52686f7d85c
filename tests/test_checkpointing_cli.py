"""``--train.gradient-checkpointing true`` through the CLI: it runs, it really recomputes, it changes no loss.

Every paper recipe turns checkpointing on, and the call that enables it differs between transformers releases
(DESIGN §4), so each stage is run with it on and off, in fp32, on both tiny families.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAMILIES, random_image

import coma.train.setup
from coma.cli import main
from coma.data.synth import generate_world
from coma.io import write_jsonl

# Non-zero LoRA dropout: the recompute must also replay the dropout masks of the forward.
COMMON = ["--num-tokens", "4", "--train.global-batch-size", "8", "--train.max-steps", "3",
          "--train.save-every", "100", "--train.learning-rate", "3e-3", "--train.warmup-ratio", "0",
          "--train.dtype", "float32", "--train.show-progress", "false", "--lora.r", "4",
          "--lora.dropout", "0.1"]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate_world(out, seed=0, size="tiny")
    return out


@pytest.fixture(scope="module")
def mmeb_train(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmeb_train")
    (root / "images").mkdir()
    rows = []
    for index, name in enumerate(["red", "green", "blue", "yellow"] * 3):
        path = f"images/{index}.png"
        random_image(index, (56, 56)).save(root / path)
        rows.append({"qry": f"Find an image that matches the given caption: a {name} picture",
                     "qry_image_path": "", "pos_text": "<|image_1|>\nRepresent the given image.",
                     "pos_image_path": path, "neg_text": "", "neg_image_path": ""})  # fmt: skip
    write_jsonl(root / "ColourT2I" / "train.jsonl", rows)
    return root


def run_counting(args: list[str], out: Path, checkpointing: bool) -> tuple[list[float], Counter[int]]:
    """Run the CLI; return its losses and, per decoder layer, the attention calls made with grad enabled."""
    calls: Counter[int] = Counter({index: 0 for index in range(2)})  # the tiny models have 2 layers
    make_trainable = coma.train.setup.make_trainable

    def counting_make_trainable(backbone, adapter, *rest, **options):
        layers = adapter.decoder_layers(backbone)
        assert len(layers) == len(calls)
        for index, layer in enumerate(layers):
            # GradCache's first pass runs without grad and is not checkpointed: only count passes with grad.
            layer.self_attn.register_forward_pre_hook(
                lambda *_, index=index: calls.update([index]) if torch.is_grad_enabled() else None
            )
        return make_trainable(backbone, adapter, *rest, **options)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(coma.train.setup, "make_trainable", counting_make_trainable)
        flag = "true" if checkpointing else "false"
        assert main([*args, "--out", str(out), "--train.gradient-checkpointing", flag]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return losses, calls


def assert_checkpointing_is_exact(args: list[str], tmp_path: Path) -> None:
    off_losses, off_calls = run_counting(args, tmp_path / "off", checkpointing=False)
    on_losses, on_calls = run_counting(args, tmp_path / "on", checkpointing=True)
    # Backward replays every checkpointed layer once, so each layer runs twice as often with grad.
    assert all(count > 0 for count in off_calls.values()), off_calls
    doubled = Counter({index: 2 * count for index, count in off_calls.items()})
    assert on_calls == doubled, (off_calls, on_calls)
    assert len(on_losses) == 3
    np.testing.assert_allclose(on_losses, off_losses, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "mask", [["bottleneck"], ["none"], ["split_layer", "--split-layer", "1"]], ids=lambda m: m[0]
)
def test_compress_with_checkpointing(tiny_model_dirs, world, tmp_path, family, mask):
    args = ["compress", "--model", str(tiny_model_dirs[family]),
            "--data", str(world / "stage1" / "conversations.jsonl"), "--image-root", str(world / "images"),
            "--max-length", "256", "--train.micro-batch-size", "4", "--mask-mode", *mask,
            *COMMON]  # fmt: skip
    assert_checkpointing_is_exact(args, tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_match_with_checkpointing_and_grad_cache(tiny_model_dirs, mmeb_train, tmp_path, family):
    args = ["match", "--model", str(tiny_model_dirs[family]), "--data", str(mmeb_train), "--block-size", "4",
            "--grad-cache", "true", "--query-chunk-size", "4", "--target-chunk-size", "4",
            *COMMON]  # fmt: skip
    assert_checkpointing_is_exact(args, tmp_path)
