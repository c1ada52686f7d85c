"""``coma generate`` over real HTTP on loopback against the scripted teacher (coma.data.teacher_server)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import random_image

from coma.cli import main
from coma.data.formats import read_conversations
from coma.data.generate import parse_question_range, parse_questions
from coma.data.teacher_server import Faults, ScriptedTeacher

MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, dict[str, list[tuple[str, str]]]]:
    """Twelve distinct images and a script of 3-5 questions each."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    script = {}
    for index in range(12):
        name = f"sub/img {index}.png" if index % 3 else f"img{index}.jpg"
        random_image(200 + index, (64 + 8 * (index % 4), 48)).save(root / name)
        turns = 3 + index % 3
        script[name] = [
            (f"What is thing {k} of image {index}?", f"answer {k} of {index}") for k in range(turns)
        ]
    return root, script


def generate_args(url: str, root: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--teacher-url", url, "--teacher-model", MODEL, "--images", str(root), "--out", str(out),
            "--concurrency", "4", "--timeout", "1", "--retry-backoff", "0.01", "--no-progress", *extra]  # fmt: skip


def records(path: Path) -> dict[str, list[tuple[str, str]]]:
    return {conv.image: [tuple(turn) for turn in conv.turns] for conv in read_conversations(path)}


def test_parse_questions_is_strict():
    assert parse_questions("1. Who?\n2) What?\n 3. Where?\n") == ["Who?", "What?", "Where?"]
    for bad, reason in [("1. Who?\n2. What?", "2 questions"), ("1. Who?\n3. What?\n4. Why?", "numbered 3"),
                        ("1. Who?\n2. What\n3. Why?", "does not end"), ("Who?\nWhat?\nWhy?", "not a numbered"),
                        ("1. Who?\n2. who?\n3. Why?", "duplicate"), ("", "0 questions")]:  # fmt: skip
        with pytest.raises(ValueError, match=reason):
            parse_questions(bad)
    assert parse_question_range("3-5") == (3, 5) and parse_question_range("4") == (4, 4)


def test_output_is_the_teachers_content_for_every_image(images, tmp_path, capsys):
    root, script = images
    out = tmp_path / "qa.jsonl"
    with ScriptedTeacher(script, root, model=MODEL) as url:
        assert main(generate_args(url, root, out)) == 0
        # Images above --max-pixels are scaled down and re-encoded before sending; the teacher still knows them.
        assert main(generate_args(url, root, tmp_path / "small.jsonl", "--max-pixels", "1024")) == 0
    assert records(out) == script and records(tmp_path / "small.jsonl") == script
    meta = json.loads((tmp_path / "qa.meta.json").read_text())
    assert meta["teacher"]["model"] == MODEL and meta["counts"]["records"] == 12
    assert meta["prompts"]["version"] and meta["last_run"]["completion_tokens"] > 0
    first = json.loads(out.read_text().splitlines()[0])
    assert first["conversations"][0]["value"].startswith("<image>\n") and first["id"] == first["image"]


def test_injected_faults_give_the_same_records(images, tmp_path):
    root, script = images
    faults = Faults(error_rate=0.05, rate_limit_rate=0.05, retry_after=0.01, malformed_rate=0.05, drop_rate=0.03,
                    slow_rate=0.02, slow_seconds=1.5, seed=3)  # fmt: skip
    with ScriptedTeacher(script, root, model=MODEL, faults=faults) as url:
        assert main(generate_args(url, root, tmp_path / "faulty.jsonl", "--max-retries", "8")) == 0
    assert records(tmp_path / "faulty.jsonl") == script
    meta = json.loads((tmp_path / "faulty.meta.json").read_text())
    assert meta["last_run"]["retries"] > 0 and meta["counts"]["rejects"] == 0


def test_killed_run_resumes_every_image_exactly_once(images, tmp_path):
    root, script = images
    out = tmp_path / "qa.jsonl"
    faults = Faults(slow_rate=1.0, slow_seconds=0.15)  # every request slow, none past the timeout
    with ScriptedTeacher(script, root, model=MODEL, faults=faults) as url:
        command = [sys.executable, "-m", "coma.cli", *generate_args(url, root, out)]
        process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        partial = len(out.read_text().splitlines())
        assert 3 <= partial < 12, "killed half-way"
        assert main(generate_args(url, root, out)) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 12 and all(json.loads(line) for line in lines)
    assert sorted(json.loads(line)["id"] for line in lines) == sorted(script)
    assert records(out) == script


def test_rejects_are_kept_with_reasons_and_not_retried(images, tmp_path):
    root, script = images
    out = tmp_path / "qa.jsonl"
    with ScriptedTeacher(script, root, model=MODEL, faults=Faults(malformed_rate=1.0)) as url:
        assert main(generate_args(url, root, out, "--max-retries", "1")) == 0
        rejects = [json.loads(line) for line in (tmp_path / "qa.rejects.jsonl").read_text().splitlines()]
        assert sorted(r["id"] for r in rejects) == sorted(script)
        assert all("malformed teacher output after 2 attempts" in r["reason"] for r in rejects)
        assert main(generate_args(url, root, out)) == 0  # nothing left to do: rejects are not retried
        assert len((tmp_path / "qa.rejects.jsonl").read_text().splitlines()) == 12
    with ScriptedTeacher(script, root, model=MODEL) as url:
        assert main(generate_args(url, root, out, "--retry-rejects")) == 0
    assert records(out) == script


def test_a_401_stops_with_the_servers_message(images, tmp_path, capsys):
    root, script = images
    with ScriptedTeacher(script, root, model=MODEL, api_key="right") as url:
        assert main(generate_args(url, root, tmp_path / "qa.jsonl", "--api-key", "wrong")) == 1
    error = capsys.readouterr().err
    assert "401" in error and "Incorrect API key provided" in error
    assert not (tmp_path / "qa.jsonl").read_text()


def test_compress_trains_on_the_generated_file(images, tiny_model_dir, tmp_path):
    root, script = images
    out = tmp_path / "qa.jsonl"
    with ScriptedTeacher(script, root, model=MODEL) as url:
        assert main(generate_args(url, root, out)) == 0
    assert main(["check", "compress", "--model", str(tiny_model_dir), "--data", str(out), "--image-root", str(root),
                 "--images", "--workers", "1"]) == 0  # fmt: skip
    assert main(["compress", "--model", str(tiny_model_dir), "--data", str(out), "--image-root", str(root),
                 "--out", str(tmp_path / "c"), "--num-tokens", "4", "--max-steps", "2", "--global-batch-size", "4",
                 "--micro-batch-size", "4", "--show-progress", "false"]) == 0  # fmt: skip


def test_mmeb_train_images_are_sampled_as_the_paper_did(tmp_path):
    from hub_replicas import write_mmeb_train

    from coma.data.generate import PAPER_SUBSETS, mmeb_train_images

    root = write_mmeb_train(tmp_path / "MMEB-train", subsets=["MSCOCO_i2t", "MSCOCO_t2i", "NIGHTS", "SUN397"])
    images = mmeb_train_images(root, ["MSCOCO_i2t", "MSCOCO_t2i", "NIGHTS"], per_subset=4, seed=42)
    assert len(images) == len(set(images)) and all(path.startswith("images/") for path in images)
    assert all((root / path).is_file() for path in images)
    assert len(images) == 12  # 4 per subset (NIGHTS has query, positive and negative images)
    assert images == mmeb_train_images(root, ["MSCOCO_i2t", "MSCOCO_t2i", "NIGHTS"], per_subset=4, seed=42)
    assert images != mmeb_train_images(root, ["MSCOCO_i2t", "MSCOCO_t2i", "NIGHTS"], per_subset=4, seed=1)
    assert "SUN397" in PAPER_SUBSETS and "ImageNet_1K" not in PAPER_SUBSETS
