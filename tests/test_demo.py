"""The embedded default end to end: ``coma demo --quick`` (what CI runs as its smoke test)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest

from coma.cli import main
from coma.demo import ARMS, COLUMNS


@pytest.mark.slow
def test_quick_demo_writes_a_complete_report(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["table"]) == set(ARMS)
    for arm in ARMS:
        assert set(report["table"][arm]) == set(COLUMNS)
        for column in COLUMNS:
            value = report["table"][arm][column]["mean"]
            assert math.isfinite(value) and 0.0 <= value <= 1.0
    assert set(report["chance"]) == set(COLUMNS) and all(0 < v < 1 for v in report["chance"].values())
    compute = report["per_seed"]["0"]["compute"]
    assert compute["extra_steps"] > 0, "arm (c) must get stage 1's compute as extra matching steps"
    assert compute["arm_tokens"]["match_only_compute"] > compute["arm_tokens"]["match_only"]
    for arm in ARMS:
        scores = json.loads((tmp_path / "seed0" / arm / "eval" / "scores.json").read_text())
        assert len(scores["datasets"]) == 10
    markdown = (tmp_path / "report.md").read_text()
    assert "chance" in markdown and "(b) compression" in markdown
    assert "Stage 1 attention mask: bottleneck." in markdown
    stage1_run = json.loads((tmp_path / "seed0" / "coma_stage1" / "run_config.json").read_text())
    assert stage1_run["config"]["mask_mode"] == "bottleneck"
    assert (tmp_path / "report.png").stat().st_size > 1000
    assert "| arm |" in capsys.readouterr().out

    # Diagnostics of every model: probes and collapse; QA with and without the image for stage 0 (whole image)
    # and both stage-1 models (through the tokens); zero-shot scores before matching.
    from coma.demo.diagnostics import PROBE_GROUPS

    diagnostics = report["diagnostics"]
    assert set(diagnostics) == {"random", "stage0", "stage1_bottleneck", "stage1_none", *ARMS}
    for name, row in diagnostics.items():
        assert set(row["probe"]) == set(PROBE_GROUPS) and all(0 <= v <= 1 for v in row["probe"].values()), (
            name
        )
        assert 0 < row["top_direction_share"] <= 1
        assert ("qa" in row) == (name in ("stage0", "stage1_bottleneck", "stage1_none"))
        assert ("zero_shot" in row) == ("qa" in row)
    for condition in ("image", "blank"):
        assert set(diagnostics["stage0"]["qa"][condition]) == {*report["qa_majority"]}
    assert "Stage 0's generative QA" in markdown and "| stage 1, no bottleneck |" in markdown
    assert list((tmp_path / "cache").glob("stage0-*/diagnostics-*.json")), "stage 0's diagnostics are cached"

    # Stage 0 is cached: a second run reuses it instead of training again.
    stage0_dirs = list((tmp_path / "cache").glob("stage0-*"))
    assert len(stage0_dirs) == 1
    stamp = (stage0_dirs[0] / "model.safetensors").stat().st_mtime_ns
    from coma.demo import DemoConfig, quick_config, stage0

    config = quick_config(DemoConfig(out=str(tmp_path), show_progress=False))
    world = next(tmp_path.glob("world-*"))
    base = next((tmp_path / "cache").glob("base-*"))
    assert stage0(config, world, base, tmp_path, 0) == stage0_dirs[0]
    # The key is the recipe, not the progress bar nor the spelling of the output folder.
    relative = Path(os.path.relpath(tmp_path))
    assert stage0(replace(config, show_progress=True), world, base, relative, 0) == relative / stage0_dirs[
        0
    ].relative_to(tmp_path)
    assert (stage0_dirs[0] / "model.safetensors").stat().st_mtime_ns == stamp

    # Stage 1 trained on what `coma generate` got from the scripted teacher over HTTP: the world's scripted
    # conversations, every image, in the world's order.
    from coma.data.formats import read_conversations

    (teacher,) = [p for p in (tmp_path / "cache").glob("stage1-teacher-*.jsonl") if ".rejects" not in p.name]
    assert not teacher.with_name(teacher.name.replace(".jsonl", ".rejects.jsonl")).read_text()
    assert stage1_run["config"]["data"] == [str(teacher)]
    scripted = read_conversations(world / "stage1" / "conversations.jsonl")
    assert [(c.image, c.turns) for c in read_conversations(teacher)] == [(c.image, c.turns) for c in scripted]

    # The study's smoke test (what CI runs of it): one budget, one seed, reusing this folder's world and stage 0.
    assert main(["demo", "--study", "--quick", "--seeds", "1", "--budgets", "10", "--out", str(tmp_path),
                 "--stage1-turns", "single", "--no-progress"]) == 0  # fmt: skip
    assert (stage0_dirs[0] / "model.safetensors").stat().st_mtime_ns == stamp
    study = json.loads((tmp_path / "study.json").read_text())
    assert study["budgets"] == [10] and study["seeds"] == [0]
    for arm in ARMS:
        point = study["per_seed"][f"0/{arm}/10"]
        assert 0 <= point["summary"]["overall"] <= 1 and set(point["probe"]) == set(PROBE_GROUPS)
    assert study["per_seed"]["0/match_only_compute/10"]["steps"] == 10 + study["extra_steps"]["0/10"]
    assert math.isnan(study["paired"]["coma_minus_match_only"]["10"]["low"])  # one seed: no interval
    single = [c for c in read_conversations(study_stage1_data(tmp_path)) if c.id.endswith("-t0")]
    assert single and all(len(c.turns) == 1 for c in single)
    study_md = (tmp_path / "study.md").read_text()
    assert "(b) − (a)" in study_md and "(one seed: no interval)" in study_md and "[+nan" not in study_md
    assert (tmp_path / "study.png").stat().st_size > 1000


def study_stage1_data(out):
    return json.loads((out / "seed0" / "stage1" / "run_config.json").read_text())["config"]["data"][0]


@pytest.mark.slow
def test_full_demo_arms_learn(tmp_path):
    """The default demo (one seed): every arm beats chance overall. ``--quick`` is too short for that, and the
    per-meta-task margins of the full run are within seed-to-seed noise (see the README), so this is the check."""
    assert main(["demo", "--out", str(tmp_path), "--no-progress"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    for arm in ARMS:
        assert report["table"][arm]["overall"]["mean"] > report["chance"]["overall"], arm
    # Stage 0 sees: its answers follow the image (colour and word questions most of all), not only the text prior.
    qa = report["diagnostics"]["stage0"]["qa"]
    assert qa["image"]["all"] > qa["blank"]["all"] + 0.15
    for kind in ("colour", "word"):
        assert qa["image"][kind] > qa["blank"][kind] + 0.2, kind


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--budgets", "10"], "--budgets is a setting of --study"),
        (["--study", "--stage2-steps", "10"], "--study sets the matching steps with --budgets"),
        (["--study", "--budgets", "0,10"], "--budgets must be positive step counts"),
        (["--seeds", "0"], "--seeds must be at least 1"),
    ],
)
def test_demo_refuses_inconsistent_flags(tmp_path, capsys, flags, message):
    assert main(["demo", "--out", str(tmp_path), *flags]) == 1
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_demo_refuses_zero_workers(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--workers", "0"]) == 1
    assert "--workers must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def _fail(message: str) -> None:
    raise ValueError(message)


@pytest.mark.parametrize("parallel", [False, True])
def test_phases_log_results_times_and_errors(parallel, capsys):
    from concurrent.futures import ThreadPoolExecutor

    from coma.demo import Phases

    pool = ThreadPoolExecutor(2) if parallel else None
    phases = Phases(pool)
    assert phases.run("square", pow, 3, 2) == 9
    assert phases.submit("cube", pow, 2, 3).result() == 8
    failing = phases.submit("broken", _fail, "bad row 7")
    with pytest.raises(ValueError, match="bad row 7"):
        failing.result()
    if pool is not None:
        pool.shutdown()
    assert set(phases.seconds) == {"square", "cube"} and all(s >= 0 for s in phases.seconds.values())
    assert "cube:" in capsys.readouterr().out


def test_pool_phases_run_on_the_torch_threads_they_ask_for():
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from coma.demo import Phases

    before = torch.get_num_threads()
    with ThreadPoolExecutor(1) as pool:
        assert Phases(pool).submit("threads", torch.get_num_threads, threads=3).result() == 3
    assert torch.get_num_threads() == before
