"""Per family: a short ``coma compress`` or ``coma match`` run, ``coma merge`` of its checkpoint, reload, encode.

The merged folder must encode exactly like the trained model before merging (LoRA/DoRA adapter, trained compression
rows and, for matching, a learned pooling head), and differently from the untrained base.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import FAMILIES, random_image
from safetensors.torch import load_file

from coma import Embedder
from coma.cli import main
from coma.io import write_jsonl

COMMON = ["--num-tokens", "4", "--train.global-batch-size", "4", "--train.max-steps", "2",
          "--train.save-every", "2", "--train.learning-rate", "3e-3", "--train.warmup-ratio", "0",
          "--train.dtype", "float32", "--train.show-progress", "false", "--lora.r", "4",
          "--lora.dropout", "0.0"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four images, a stage-1 conversation per image and an MMEB-train subset (caption -> image)."""
    root = tmp_path_factory.mktemp("merge_data")
    (root / "images").mkdir()
    conversations, rows = [], []
    for index, name in enumerate(["red", "green", "blue", "yellow"]):
        path = f"images/{index}.png"
        random_image(index, (56, 56)).save(root / path)
        conversations.append({"id": str(index), "image": path, "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": name}]})  # fmt: skip
        rows.append({"qry": f"Find an image that matches the given caption: a {name} picture",
                     "qry_image_path": "", "pos_text": "<|image_1|>\nRepresent the given image.",
                     "pos_image_path": path, "neg_text": "", "neg_image_path": ""})  # fmt: skip
    write_jsonl(root / "conversations.jsonl", conversations)
    write_jsonl(root / "mmeb" / "ColourT2I" / "train.jsonl", rows)
    return root


def stage_args(stage: str, model, data, out) -> list[str]:
    if stage == "compress":
        extra = ["--data", str(data / "conversations.jsonl"), "--max-length", "256",
                 "--train.micro-batch-size", "4"]  # fmt: skip
    else:  # a learned head, so a pooler lost on the way would show
        extra = ["--data", str(data / "mmeb"), "--block-size", "4", "--grad-cache", "false",
                 "--pooling", "gated"]  # fmt: skip
    return [stage, "--model", str(model), "--image-root", str(data), "--out", str(out), *extra, *COMMON]


@pytest.mark.parametrize("stage", ["compress", "match"])
@pytest.mark.parametrize("family", FAMILIES)
def test_merge_reloads_to_the_trained_model(tiny_model_dirs, data, tmp_path, family, stage):
    from coma.recipes import from_dict
    from coma.train.loop import DistInfo
    from coma.train.run import stage_classes
    from coma.train.trainable import load_trainable_state

    run = tmp_path / "run"
    assert main(stage_args(stage, tiny_model_dirs[family], data, run)) == 0
    config_class, task_class = stage_classes(stage)
    config = from_dict(config_class, json.loads((run / "run_config.json").read_text())["config"])
    task = task_class(config, DistInfo(), with_data=False)
    load_trainable_state(task.module, load_file(str(run / "checkpoints" / "step-0000002" / "trainable.safetensors")),
                         source="test")  # fmt: skip
    inputs = ["a red picture", {"text": "What colour is it?", "image": data / "images" / "0.png"},
              {"image": random_image(9, (84, 56))}]  # fmt: skip
    task.embedder.model.eval()
    with torch.no_grad():
        trained = task.embedder.encode(inputs, show_progress=False)

    assert main(["merge", "--model", str(run), "--out", str(tmp_path / "merged")]) == 0
    merged = Embedder.from_pretrained(tmp_path / "merged")
    assert merged.adapter.family == family and merged.config.num_tokens == 4
    assert merged.config.pooling == ("gated" if stage == "match" else "mean")
    np.testing.assert_allclose(merged.encode(inputs, show_progress=False), trained, atol=1e-5)
    base = Embedder.from_pretrained(tiny_model_dirs[family], num_tokens=4, pooling=merged.config.pooling)
    assert not np.allclose(base.encode(inputs, show_progress=False), trained, atol=1e-3), (
        "training changed nothing"
    )
