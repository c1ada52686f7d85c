"""Every paper recipe, 2 steps, on a model with its family's real widths and vocabulary (Qwen2.5-VL-3B's for the
Qwen2.5-VL recipes, Qwen3-VL-2B's for coma's Qwen3-VL ones; 2 LM layers, 2 ViT blocks, fp32) and on the hub-layout
replicas, through the CLI with only batch, step and depth overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hub_replicas import write_mmeb_eval, write_mmeb_train, write_stage1_conversations

from coma.cli import main

CONFIGS = Path(__file__).parent.parent / "configs"
SMALL = ["--max-steps", "2", "--dtype", "float32", "--show-progress", "false", "--save-every", "2"]


# (real shape, recipe family, the two recipe sizes, ids of <|ctoken_0|> and <|ctoken_31|>): the 32 compression tokens
# take spare rows of the real vocabulary (Qwen3's tokenizer has 4 more added tokens than Qwen2.5's).
SHAPES = [("qwen2.5-vl-3b", "qwen2_5_vl", ("3b", "7b"), [151665, 151696]),
          ("qwen3-vl-2b", "qwen3_vl", ("2b", "8b"), [151669, 151700])]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("shape", "family", "sizes", "token_ids"), SHAPES, ids=[s[0] for s in SHAPES])
def test_paper_recipes_on_a_real_shape(tmp_path, shape, family, sizes, token_ids):
    from coma.config import ComaConfig

    data = tmp_path / "data"
    train = write_mmeb_train(data / "MMEB-train", rows=2)
    write_mmeb_eval(data, datasets=["ImageNet-1K", "WebQA", "EDIS", "CIFAR-100"], queries=2, candidates=3)
    write_stage1_conversations(data / "CoMa_3B_SFT.jsonl", train, n=4)
    base = tmp_path / shape
    assert main(["init-model", "--size", shape, "--layers", "2", "--vision-layers", "2",
                 "--out", str(base)]) == 0  # fmt: skip
    runs = tmp_path / "runs"
    small = sizes[0]
    for size in sizes:
        assert main(["compress", "--config", str(CONFIGS / f"compress_{family}_{size}.yaml"), "--model", str(base),
                     "--data", str(data / "CoMa_3B_SFT.jsonl"), "--image-root", str(train),
                     "--out", str(runs / f"c{size}"), *SMALL, "--global-batch-size", "1",
                     "--micro-batch-size", "1"]) == 0  # fmt: skip
    merged_dir = runs / f"c{small}-merged"
    assert main(["merge", "--model", str(runs / f"c{small}"), "--out", str(merged_dir)]) == 0
    merged = json.loads((merged_dir / "config.json").read_text())
    tokenizer = json.loads((merged_dir / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    # The 32 compression tokens take spare rows of the real vocabulary: no embedding resize.
    assert [ids[f"<|ctoken_{i}|>"] for i in (0, 31)] == token_ids
    assert merged["model_type"] == family and merged["text_config"]["vocab_size"] == 151936
    assert ComaConfig.load(merged_dir).num_tokens == 32
    for size in sizes:
        assert main(["match", "--config", str(CONFIGS / f"match_{family}_{size}.yaml"),
                     "--model", str(merged_dir), "--data", str(train), "--image-root", str(train),
                     "--out", str(runs / f"m{size}"), *SMALL, "--global-batch-size", "2", "--block-size", "2",
                     "--query-chunk-size", "1", "--target-chunk-size", "1"]) == 0  # fmt: skip
    for run in (f"{stage}{size}" for stage in "cm" for size in sizes):
        metrics = [json.loads(line) for line in (runs / run / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 2 and all(m["loss"] == m["loss"] for m in metrics)  # two finite steps
    assert main(["eval", "--model", str(runs / f"m{small}"), "--data", str(data / "MMEB-eval"),
                 "--image-root", str(data / "eval_images"), "--out", str(runs / f"m{small}" / "mmeb"),
                 "--no-progress"]) == 0  # fmt: skip
    scores = json.loads((runs / f"m{small}" / "mmeb" / "scores.json").read_text())
    assert sorted(scores["datasets"]) == ["EDIS", "ImageNet-1K", "WebQA"] and scores["extra"] == ["CIFAR-100"]
