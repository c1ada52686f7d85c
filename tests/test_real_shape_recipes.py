"""Every paper recipe, 2 steps, on a model with Qwen2.5-VL-3B's real widths and vocabulary (2 LM layers, 2 ViT
blocks, fp32) and on the hub-layout replicas, through the CLI with only batch, step and depth overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hub_replicas import write_mmeb_eval, write_mmeb_train, write_stage1_conversations

from coma.cli import main

CONFIGS = Path(__file__).parent.parent / "configs"
SMALL = ["--max-steps", "2", "--dtype", "float32", "--show-progress", "false", "--save-every", "2"]


@pytest.mark.slow
def test_paper_recipes_on_the_3b_shape(tmp_path):
    from coma.config import ComaConfig

    data = tmp_path / "data"
    train = write_mmeb_train(data / "MMEB-train", rows=2)
    write_mmeb_eval(data, datasets=["ImageNet-1K", "WebQA", "EDIS", "CIFAR-100"], queries=2, candidates=3)
    write_stage1_conversations(data / "CoMa_3B_SFT.jsonl", train, n=4)
    base = tmp_path / "qwen2.5-vl-3b"
    assert main(["init-model", "--size", "qwen2.5-vl-3b", "--layers", "2", "--vision-layers", "2",
                 "--out", str(base)]) == 0  # fmt: skip
    runs = tmp_path / "runs"
    for size in ("3b", "7b"):
        assert main(["compress", "--config", str(CONFIGS / f"compress_qwen2_5_vl_{size}.yaml"), "--model", str(base),
                     "--data", str(data / "CoMa_3B_SFT.jsonl"), "--image-root", str(train),
                     "--out", str(runs / f"c{size}"), *SMALL, "--global-batch-size", "1",
                     "--micro-batch-size", "1"]) == 0  # fmt: skip
    assert main(["merge", "--model", str(runs / "c3b"), "--out", str(runs / "c3b-merged")]) == 0
    merged = json.loads((runs / "c3b-merged" / "config.json").read_text())
    tokenizer = json.loads((runs / "c3b-merged" / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    # The 32 compression tokens take spare rows of the real vocabulary: no embedding resize.
    assert [ids[f"<|ctoken_{i}|>"] for i in (0, 31)] == [151665, 151696]
    assert merged["text_config"]["vocab_size"] == 151936
    assert ComaConfig.load(runs / "c3b-merged").num_tokens == 32
    for size in ("3b", "7b"):
        assert main(["match", "--config", str(CONFIGS / f"match_qwen2_5_vl_{size}.yaml"),
                     "--model", str(runs / "c3b-merged"), "--data", str(train), "--image-root", str(train),
                     "--out", str(runs / f"m{size}"), *SMALL, "--global-batch-size", "2", "--block-size", "2",
                     "--query-chunk-size", "1", "--target-chunk-size", "1"]) == 0  # fmt: skip
    for run in ("c3b", "c7b", "m3b", "m7b"):
        metrics = [json.loads(line) for line in (runs / run / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 2 and all(m["loss"] == m["loss"] for m in metrics)  # two finite steps
    assert main(["eval", "--model", str(runs / "m3b"), "--data", str(data / "MMEB-eval"),
                 "--image-root", str(data / "eval_images"), "--out", str(runs / "m3b" / "mmeb"),
                 "--no-progress"]) == 0  # fmt: skip
    scores = json.loads((runs / "m3b" / "mmeb" / "scores.json").read_text())
    assert sorted(scores["datasets"]) == ["EDIS", "ImageNet-1K", "WebQA"] and scores["extra"] == ["CIFAR-100"]
