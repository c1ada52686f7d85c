"""The README's real-data commands, flag for flag, on replicas of the hub downloads (tests/hub_replicas.py).

Each bug the first real-data trial hit has a test here: WebQA / EDIS text-only rows carrying ``<|image_1|>``,
``--subsets a,b`` read character by character, recipe caps naming subsets not downloaded, three splits read at
once, CIFAR-100 in a full MMEB-eval download, symlinked image roots, and the pre-flight check.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hub_replicas import (
    append_rows,
    corrupt_image,
    train_shard,
    write_mmeb_eval,
    write_mmeb_train,
    write_stage1_conversations,
)

from coma.cli import main

CONFIGS = Path(__file__).parent.parent / "configs"
# Only batch, step and precision overrides on top of the paper recipes (CPU: fp32; GPU-sized batches shrunk).
MATCH_OVERRIDES = ["--max-steps", "2", "--global-batch-size", "8", "--query-chunk-size", "4",
                   "--target-chunk-size", "4", "--block-size", "4", "--dtype", "float32", "--show-progress", "false"]  # fmt: skip
COMPRESS_OVERRIDES = ["--max-steps", "2", "--global-batch-size", "2", "--micro-batch-size", "1",
                      "--dtype", "float32", "--show-progress", "false"]  # fmt: skip


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """``data/`` as the README lays it out: MMEB-train, MMEB-eval + images, the stage-1 conversations."""
    data = tmp_path_factory.mktemp("hub") / "data"
    train = write_mmeb_train(data / "MMEB-train")
    write_mmeb_eval(data)
    write_stage1_conversations(data / "CoMa_3B_SFT.jsonl", train)
    return data


def losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_readme_commands_run_on_the_hub_layout(tiny_model_dir, hub, tmp_path, capsys):
    """compress -> match -> eval with the paper recipes, as the README prints them (gradient checkpointing on)."""
    runs = tmp_path / "runs"
    assert main(["compress", "--config", str(CONFIGS / "compress_qwen2_5_vl_3b.yaml"), "--model", str(tiny_model_dir),
                 "--data", str(hub / "CoMa_3B_SFT.jsonl"), "--image-root", str(hub / "MMEB-train"),
                 "--out", str(runs / "c3b"), *COMPRESS_OVERRIDES]) == 0  # fmt: skip
    assert main(["match", "--config", str(CONFIGS / "match_qwen2_5_vl_3b.yaml"), "--model", str(runs / "c3b"),
                 "--data", str(hub / "MMEB-train"), "--image-root", str(hub / "MMEB-train"),
                 "--out", str(runs / "m3b"), *MATCH_OVERRIDES]) == 0  # fmt: skip
    out = capsys.readouterr().out
    # All 20 subsets, WebQA's placeholder-carrying text-only queries among them (it used to stop at the first).
    assert "match: WebQA: 6 text-only queries carried <|image_1|>; removed" in out
    assert len(losses(runs / "m3b")) == 2
    assert main(["eval", "--model", str(runs / "m3b"), "--data", str(hub / "MMEB-eval"),
                 "--image-root", str(hub / "eval_images"), "--out", str(runs / "m3b" / "mmeb"), "--no-progress"]) == 0  # fmt: skip
    scores = json.loads((runs / "m3b" / "mmeb" / "scores.json").read_text())
    assert scores["overall"]["n_datasets"] == 36 and scores["missing"] == []
    assert scores["extra"] == ["CIFAR-100"] and "CIFAR-100" not in scores["datasets"]
    assert scores["placeholder_fixes"] == {"EDIS/queries": 3, "WebQA/queries": 3}


def test_subsets_caps_and_max_steps_as_users_type_them(tiny_model_dir, hub, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["match", "--config", str(CONFIGS / "match_qwen2_5_vl_7b.yaml"), "--model", str(tiny_model_dir),
                 "--data", str(hub / "MMEB-train"), "--out", str(out), *MATCH_OVERRIDES,
                 "--subsets", "SUN397,MSCOCO_t2i", "--max-steps", "5"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert len(losses(out)) == 5
    # The 7B recipe's caps and the hub's other 18 subsets do not stand in the way.
    assert "ignored for subsets not selected: caps A-OKVQA, CIRR" in printed
    config = json.loads((out / "run_config.json").read_text())["config"]
    assert config["subsets"] == ["SUN397", "MSCOCO_t2i"]
    assert main(["match", "--model", str(tiny_model_dir), "--data", str(hub / "MMEB-train"), "--out", str(tmp_path / "c"),
                 *MATCH_OVERRIDES, "--subsets", "[SUN397, WebQA]", "--caps", "SUN397=2,WebQA=3",
                 "--weights", "SUN397=2"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    config = json.loads((tmp_path / "c" / "run_config.json").read_text())["config"]
    assert (config["caps"], config["weights"]) == ({"SUN397": 2, "WebQA": 3}, {"SUN397": 2.0})
    # No --split: `original` only (the legacy `train-*` shard has an extra row; three splits were read before).
    assert (
        "no --split given: reading 'original' (also present, not read: diverse_instruction, train)" in printed
    )


@pytest.fixture
def broken(hub, tmp_path) -> Path:
    """A copy of two subsets with a corrupt image, a missing image and a malformed row."""
    root = write_mmeb_train(tmp_path / "MMEB-train", subsets=["SUN397", "MSCOCO_t2i"])
    sun = train_shard(root, "SUN397")
    import pyarrow.parquet as pq

    rows = pq.read_table(sun).to_pylist()
    corrupt_image(root / rows[0]["qry_image_path"])
    (root / rows[1]["qry_image_path"]).unlink()
    append_rows(sun, [{**rows[2], "pos_text": None}])
    return root


def test_check_names_corrupt_missing_and_malformed_rows(tiny_model_dir, broken, capsys):
    args = ["check", "match", "--model", str(tiny_model_dir), "--data", str(broken), "--split", "original"]
    assert main(args) == 1
    printed = capsys.readouterr().out
    assert "SUN397/original-00000-of-00001.parquet:2: field 'qry_image_path': image not found" in printed
    assert (
        "SUN397/original-00000-of-00001.parquet:7: field 'pos_text': expected a string, got null" in printed
    )
    assert "corrupt" in printed and "| SUN397 " in printed
    assert main([*args, "--images", "--workers", "2"]) == 1
    printed = capsys.readouterr().out
    assert "SUN397/original-00000-of-00001.parquet:1: field 'qry_image_path': cannot read image" in printed
    table = next(line for line in printed.splitlines() if line.startswith("| SUN397 "))
    cells = [cell.strip() for cell in table.strip("|").split("|")]
    assert cells[1:6] == ["7", "5", "3", "1", "1"]  # rows, images, bad rows, missing, corrupt
    assert cells[8] != "—" and cells[9] != "—"  # visual tokens and sequence lengths at the model's bounds


def test_match_stops_before_training_or_skips_bad_rows(tiny_model_dir, broken, tmp_path, capsys):
    args = ["match", "--model", str(tiny_model_dir), "--data", str(broken), "--out", str(tmp_path / "m"),
            *MATCH_OVERRIDES]  # fmt: skip
    assert main(args) == 1
    error = capsys.readouterr().err
    assert "2 bad row(s)" in error and "original-00000-of-00001.parquet:2: field 'qry_image_path'" in error
    assert not (tmp_path / "m" / "metrics.jsonl").exists()
    assert main([*args, "--skip-bad"]) == 0
    # The missing image and the malformed row are skipped when read; the corrupt image when its batch is built.
    assert losses(tmp_path / "m")[-1]["skipped_rows"] == 3


@pytest.mark.slow
def test_two_process_match_skips_bad_rows_on_every_rank(tiny_model_dir, broken, tmp_path):
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    command = [torchrun, "--nproc_per_node=2", "--master_port=29533", "-m", "coma.cli", "match",
               "--model", str(tiny_model_dir), "--data", str(broken), "--out", str(tmp_path / "m"),
               *MATCH_OVERRIDES, "--skip-bad"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # Rows missing or malformed are skipped when read (every rank); the corrupt one by whichever rank drew it.
    assert losses(tmp_path / "m")[-1]["skipped_rows"] == 3


def test_eval_skip_bad_counts_queries(tiny_model_dir, tmp_path):
    data, images = write_mmeb_eval(tmp_path, datasets=["VOC2007", "EDIS"])
    (images / "VOC2007").joinpath(sorted(os.listdir(images / "VOC2007"))[-1]).unlink()
    args = ["eval", "--model", str(tiny_model_dir), "--data", str(data), "--image-root", str(images),
            "--out", str(tmp_path / "e"), "--no-progress"]  # fmt: skip
    assert main(args) == 1
    assert main([*args, "--skip-bad"]) == 0
    scores = json.loads((tmp_path / "e" / "scores.json").read_text())
    assert sum(scores["skipped_queries"].values()) >= 1 and "EDIS" in scores["datasets"]


def test_symlinked_image_root_is_followed_but_dot_dot_is_refused(tiny_model_dir, hub, tmp_path):
    # Clusters mount images elsewhere and link them in: the check is on the path as written.
    root = tmp_path / "MMEB-train"
    root.mkdir()
    for child in (hub / "MMEB-train").iterdir():
        (root / child.name).symlink_to(child)
    args = ["match", "--model", str(tiny_model_dir), "--data", str(root), "--out", str(tmp_path / "m"),
            *MATCH_OVERRIDES, "--subsets", "SUN397"]  # fmt: skip
    assert main(args) == 0
    shard = tmp_path / "Escape" / "original.jsonl"
    shard.parent.mkdir()
    row = {"qry": "<|image_1|>\nq", "qry_image_path": "../outside.jpg", "pos_text": "p", "pos_image_path": ""}
    shard.write_text(json.dumps(row) + "\n")
    (root / "Escape").symlink_to(shard.parent)
    assert main([*args[:-1], "Escape", "--out", str(tmp_path / "m2")]) == 1


def test_compress_check_and_text_only_conversations(tiny_model_dir, hub, capsys):
    assert main(["check", "compress", "--config", str(CONFIGS / "compress_qwen2_5_vl_3b.yaml"),
                 "--model", str(tiny_model_dir), "--data", str(hub / "CoMa_3B_SFT.jsonl"),
                 "--image-root", str(hub / "MMEB-train"), "--images", "--workers", "1"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    table = next(line for line in printed.splitlines() if line.startswith("| CoMa_3B_SFT.jsonl "))
    cells = [cell.strip() for cell in table.strip("|").split("|")]
    assert cells[1] == "8" and cells[6] == "1" and cells[8] != "—"  # 8 records, one text-only


def test_check_eval_lists_the_extra_config(tiny_model_dir, hub, capsys):
    assert main(["check", "eval", "--model", str(tiny_model_dir), "--data", str(hub / "MMEB-eval"),
                 "--image-root", str(hub / "eval_images")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "not part of mmeb-v1, not evaluated: CIFAR-100" in printed
    assert "| EDIS " in printed and "| CIFAR-100 " not in printed
