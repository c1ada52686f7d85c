"""``coma demo --study``: the data-efficiency curve of the three arms over matching budgets and seeds.

For every seed: stage 0 (cached, shared by all budgets) and one stage 1; then at every matching budget
(a) matching only, (b) CoMa and (c) matching only with extra steps worth stage 1's compute, each evaluated on the
synthetic benchmark and probed (:mod:`coma.demo.diagnostics`). ``study.md`` gives mean ± std over seeds and the
paired (b) − (a) difference with its 95 % t-interval over seeds (same seed: same stage-0 model and data order).
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from coma.demo.run import (
    ARM_LABELS,
    ARMS,
    DIAGNOSED,
    META_TASKS,
    DemoConfig,
    Phases,
    diagnose,
    diagnose_cached,
    diagnostic_references,
    diagnostics_markdown,
    ensure_base_model,
    ensure_world,
    evaluate_arm,
    mean_tree,
    stage0,
    stage1,
    stage1_variant,
    stage2,
    summary_row,
    teacher_data,
    worker_pool,
    write_outputs,
)

DEFAULT_BUDGETS = (50, 100, 200, 400, 800)
DEFAULT_SEEDS = 3


def t_quantile(probability: float, df: int) -> float:
    """Student's t quantile for ``probability`` in (0.5, 1), by integrating the density (no scipy needed)."""
    if not 0.5 < probability < 1 or df < 1:
        raise ValueError(f"need 0.5 < probability < 1 and df >= 1, got {probability}, {df}")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def mass(x: float) -> float:  # P(0 < T < x), trapezoid rule on a fine grid
        grid = np.linspace(0.0, x, 20001)
        density = np.exp(log_norm - (df + 1) / 2 * np.log1p(grid**2 / df))
        return float(np.sum((density[1:] + density[:-1]) / 2) * (grid[1] - grid[0]))

    low, high = 0.0, 1.0
    while mass(high) < probability - 0.5:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if mass(middle) < probability - 0.5 else (low, middle)
    return (low + high) / 2


def paired_interval(differences: list[float], level: float = 0.95) -> dict[str, float]:
    """Mean of paired differences with its two-sided t-interval (NaN bounds with fewer than two pairs)."""
    values = np.asarray(differences, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return {"mean": mean, "low": float("nan"), "high": float("nan"), "n": len(values)}
    half = t_quantile(0.5 + level / 2, len(values) - 1) * float(values.std(ddof=1)) / math.sqrt(len(values))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(values)}


def arm_run(config: DemoConfig, world: Path, start: Path, out: Path, seed: int, steps: int) -> dict[str, Any]:
    """One point of the curve: matching from ``start`` for ``steps`` steps, its benchmark scores and probes."""
    trained = stage2(config, world, start, out, seed, steps)
    scores = evaluate_arm(config, world, out)
    probes = diagnose(config, world, out)
    return {"steps": trained["steps"], "tokens": trained["tokens"], "summary": summary_row(scores), **probes}


def run_study(config: DemoConfig, budgets: list[int]) -> dict[str, Any]:
    if not budgets or any(budget < 1 for budget in budgets):
        raise ValueError(f"--budgets must be positive step counts, got {budgets}")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seeds = range(config.seeds)
    with worker_pool(config.workers) as pool:
        phases = Phases(pool)
        world = phases.run("synthetic world", ensure_world, config, out)
        teacher = phases.run("stage-1 data (coma generate, scripted teacher)", teacher_data, world, out)
        data = stage1_variant(config, world, teacher, out)
        warm = {}
        for seed in seeds:
            base = ensure_base_model(config, out, seed)
            warm[seed] = phases.submit(f"seed {seed}: stage 0 (cached)", stage0, config, world, base, out, seed,
                                       threads=config.workers).result()  # fmt: skip
        compress = {seed: phases.submit(f"seed {seed}: stage 1", stage1, config, world, data, warm[seed],
                                        out / f"seed{seed}" / "stage1", seed) for seed in seeds}  # fmt: skip
        runs: dict[tuple[int, str, int], Future] = {}
        for seed in seeds:
            for budget in budgets:
                runs[seed, "match_only", budget] = phases.submit(
                    f"seed {seed}: (a) {budget} steps", arm_run, config, world, warm[seed],
                    out / f"seed{seed}" / f"match_only-{budget}", seed, budget,
                )  # fmt: skip
        diagnostics: dict[int, dict[str, Future]] = {}
        stage1_tokens = {}
        for seed in seeds:
            stage1_tokens[seed] = compress[seed].result()["tokens"]
            stage1_dir = out / f"seed{seed}" / "stage1"
            diagnostics[seed] = {
                "stage0": phases.submit(f"seed {seed}: diagnostics, stage 0", diagnose_cached, config, world,
                                        warm[seed], qa_layout="chat", zero_shot=True),
                f"stage1_{config.stage1_mask_mode}": phases.submit(
                    f"seed {seed}: diagnostics, stage 1", diagnose, config, world, stage1_dir,
                    qa_layout="compress", zero_shot=True),
            }  # fmt: skip
            for budget in budgets:
                runs[seed, "coma", budget] = phases.submit(
                    f"seed {seed}: (b) {budget} steps", arm_run, config, world, stage1_dir,
                    out / f"seed{seed}" / f"coma-{budget}", seed, budget,
                )  # fmt: skip
        extra_steps: dict[tuple[int, int], int] = {}
        for seed in seeds:
            for budget in budgets:
                matched = runs[seed, "match_only", budget].result()
                tokens_per_step = matched["tokens"] / max(matched["steps"], 1)
                extra = extra_steps[seed, budget] = math.ceil(stage1_tokens[seed] / max(tokens_per_step, 1))
                runs[seed, "match_only_compute", budget] = phases.submit(
                    f"seed {seed}: (c) {budget} + {extra} steps", arm_run, config, world, warm[seed],
                    out / f"seed{seed}" / f"match_only_compute-{budget}", seed, budget + extra,
                )  # fmt: skip
        points = {key: future.result() for key, future in runs.items()}
        stage_diagnostics = {
            seed: {name: future.result() for name, future in by_name.items()}
            for seed, by_name in diagnostics.items()
        }
    study = summarise(config, budgets, points, stage_diagnostics, extra_steps)
    study["world"] = world.name
    study.update(diagnostic_references(config, world))
    study["phase_seconds"] = phases.seconds
    study["total_seconds"] = round(time.perf_counter() - started, 1)
    write_outputs(out / "study", study, study_markdown, plot_study)
    return study


def summarise(
    config: DemoConfig,
    budgets: list[int],
    points: dict[tuple[int, str, int], dict[str, Any]],
    stage_diagnostics: dict[int, dict[str, Any]],
    extra_steps: dict[tuple[int, int], int],
) -> dict[str, Any]:
    seeds = sorted(stage_diagnostics)
    curve: dict[str, dict[str, Any]] = {arm: {} for arm in ARMS}
    paired: dict[str, dict[str, Any]] = {"coma_minus_match_only": {}, "coma_minus_match_only_compute": {}}
    for budget in budgets:
        for arm in ARMS:
            rows = [points[seed, arm, budget] for seed in seeds]
            curve[arm][str(budget)] = {
                "overall": _mean_std([row["summary"]["overall"] for row in rows]),
                "meta_tasks": {task: _mean_std([row["summary"].get(task, np.nan) for row in rows])
                               for task in META_TASKS},
                "probe": mean_tree([row["probe"] for row in rows]),
                "top_direction_share": float(np.mean([row["top_direction_share"] for row in rows])),
                "steps": [row["steps"] for row in rows],
            }  # fmt: skip
        for name, baseline in (("coma_minus_match_only", "match_only"),
                               ("coma_minus_match_only_compute", "match_only_compute")):  # fmt: skip
            differences = [points[seed, "coma", budget]["summary"]["overall"]
                           - points[seed, baseline, budget]["summary"]["overall"] for seed in seeds]  # fmt: skip
            paired[name][str(budget)] = paired_interval(differences)
    return {
        "config": asdict(config),
        "budgets": budgets,
        "seeds": seeds,
        "curve": curve,
        "paired": paired,
        "extra_steps": {f"{seed}/{budget}": steps for (seed, budget), steps in extra_steps.items()},
        "stage_diagnostics": mean_tree([stage_diagnostics[seed] for seed in seeds]),
        "stage_diagnostics_per_seed": {str(seed): stage_diagnostics[seed] for seed in seeds},
        "per_seed": {f"{seed}/{arm}/{budget}": point for (seed, arm, budget), point in points.items()},
    }


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def _percent(value: dict[str, float]) -> str:
    return f"{100 * value['mean']:.1f} ± {100 * value['std']:.1f}"


def _difference(interval: dict[str, float]) -> str:
    if math.isnan(interval["low"]):
        return f"{100 * interval['mean']:+.1f} (one seed: no interval)"
    return f"{100 * interval['mean']:+.1f} [{100 * interval['low']:+.1f}, {100 * interval['high']:+.1f}]"


def study_markdown(study: dict[str, Any]) -> str:
    config = study["config"]
    budgets = study["budgets"]
    seeds = len(study["seeds"])
    curve, paired = study["curve"], study["paired"]
    extra = sorted(set(study["extra_steps"].values()))
    lines = [
        f"# coma demo --study — synthetic world ({study['world']}), {seeds} seed(s)",
        "",
        f"Stage 1: mask {config['stage1_mask_mode']}, supervise {config['stage1_supervise']}, "
        f"{config['stage1_turns']}-turn {config['stage1_data']} data, T = {config['num_tokens']}. "
        f"Arm (c) runs each budget plus stage 1's compute in steps ({', '.join(map(str, extra))}).",
        "",
        "Overall strict P@1 (%), mean ± std over seeds, and the paired difference (b) − (a) and (b) − (c) in points",
        "with its 95 % t-interval over seeds:",
        "",
        "| matching steps | " + " | ".join(ARM_LABELS[arm] for arm in ARMS) + " | (b) − (a) | (b) − (c) |",
        "|" + "---|" * (len(ARMS) + 3),
    ]
    for budget in map(str, budgets):
        cells = [_percent(curve[arm][budget]["overall"]) for arm in ARMS]
        for name in ("coma_minus_match_only", "coma_minus_match_only_compute"):
            cells.append(_difference(paired[name][budget]))
        lines.append(f"| {budget} | " + " | ".join(cells) + " |")
    largest = str(budgets[-1])
    diagnostics = {**study["stage_diagnostics"], **{arm: curve[arm][largest] for arm in ARMS}}
    labels = {**DIAGNOSED, **{arm: f"{ARM_LABELS[arm]}, {largest} steps" for arm in ARMS}}
    lines += ["", *diagnostics_markdown(diagnostics, study, labels)]
    lines += ["", f"Total: {study['total_seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def plot_study(study: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=110)
    axes = figure.subplots()
    budgets = study["budgets"]
    for arm in ARMS:
        means = np.array([100 * study["curve"][arm][str(b)]["overall"]["mean"] for b in budgets])
        stds = np.array([100 * study["curve"][arm][str(b)]["overall"]["std"] for b in budgets])
        line = axes.plot(budgets, means, marker="o", label=ARM_LABELS[arm])[0]
        axes.fill_between(budgets, means - stds, means + stds, color=line.get_color(), alpha=0.2)
    axes.set_xscale("log")
    axes.minorticks_off()
    axes.set_xticks(budgets, [str(b) for b in budgets])
    axes.set_xlabel("matching steps ((c): plus stage 1's compute)")
    axes.set_ylabel("overall Precision@1 (%)")
    axes.set_title(f"coma demo --study: {len(study['seeds'])} seed(s), bands ± std")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
