"""Evaluation reports: ``scores.json``, a paper-style ``scores.md``, a bar chart, and side-by-side comparisons.

Percentages carry one decimal. Strict P@1 (the positive must beat every other candidate) comes first; the
reference harness's variant, where ties count as hits, is labelled "ties" everywhere it appears.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from coma.data.formats import placeholder_fix_line
from coma.io import atomic_open, atomic_write_text, write_json

SUMMARY_GROUPS = ("IND", "OOD", "overall")
STRICT_LABEL = "P@1 (strict)"
TIES_LABEL = "P@1 (ties = hit)"
MISSING = "—"


def percent(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.1f}"


def delta(a: float | None, b: float | None) -> str:
    return MISSING if a is None or b is None else f"{100 * (b - a):+.1f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str]) -> list[str]:
    """A markdown table with columns padded so it also reads well in a terminal."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [
            str(cell).rjust(width) if side == "r" else str(cell).ljust(width)
            for cell, width, side in zip(cells, widths, align, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if side == "r" else "-" * (w + 2)
            for w, side in zip(widths, align, strict=True)
        )
        + "|"
    )
    return [line(header), rule, *(line(row) for row in rows)]


def _pixels(settings: Mapping[str, Any]) -> str:
    low, high = settings.get("min_pixels"), settings.get("max_pixels")
    if low is None and high is None:
        return "the processor's pixel bounds"
    return f"pixels {low if low is not None else 'default'}..{high if high is not None else 'default'}"


def summary_groups(scores: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(label, group) for each meta-task, then IND, OOD and overall where present."""
    groups = [(task, group) for task, group in scores.get("meta_tasks", {}).items()]
    groups += [(name, scores[name]) for name in SUMMARY_GROUPS if scores.get(name)]
    return groups


def markdown_report(scores: Mapping[str, Any]) -> str:
    """The paper-style table: datasets grouped by meta-task, then the meta-task, IND, OOD and overall means."""
    settings = scores.get("settings", {})
    lines = [f"# Evaluation: {settings.get('benchmark', 'benchmark')}", ""]
    lines.append(
        f"Model `{settings.get('model', '?')}` (fingerprint `{str(settings.get('model_fingerprint', ''))[:12]}`), "
        f"pooling {settings.get('pooling')}, dtype {settings.get('dtype')}, template {settings.get('template_version')}, "
        f"format rule {settings.get('format_rule')}, {_pixels(settings)}."
    )
    lines += [
        "",
        f"{STRICT_LABEL}: the positive must score above every other candidate. {TIES_LABEL}: the reference "
        "harness's rule (argmax = positive), where a tie counts as a hit. Percentages.",
        "",
    ]
    by_task: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
    for name, entry in scores["datasets"].items():
        by_task.setdefault(entry["meta_task"], []).append((name, entry))
    rows = []
    for task, entries in by_task.items():
        for index, (name, entry) in enumerate(entries):
            rows.append(
                [
                    task if index == 0 else "",
                    name,
                    entry["split"],
                    str(entry["n"]),
                    percent(entry["p@1"]),
                    percent(entry["p@1_ties"]),
                    percent(entry.get("recall@5")),
                    percent(entry.get("mrr")),
                ]
            )
    header = ["Meta-task", "Dataset", "Split", "N", STRICT_LABEL, TIES_LABEL, "R@5", "MRR"]
    lines += markdown_table(header, rows, "lllrrrrr")
    lines += ["", "## Means", ""]
    summary = [
        [label, str(group["n_datasets"]), percent(group["p@1"]), percent(group["p@1_ties"])]
        for label, group in summary_groups(scores)
    ]
    lines += markdown_table(["Group", "Datasets", STRICT_LABEL, TIES_LABEL], summary, "lrrr")
    if scores.get("missing"):
        lines += ["", f"Missing datasets ({len(scores['missing'])}): {', '.join(scores['missing'])}."]
    if scores.get("extra"):
        lines += ["", f"Not part of the benchmark, not evaluated: {', '.join(scores['extra'])}."]
    fixes = scores.get("placeholder_fixes") or {}
    if fixes:
        placeholder = settings.get("image_placeholder", "<|image_1|>")
        lines += [""] + [
            placeholder_fix_line(*key.split("/", 1), count, placeholder) for key, count in fixes.items()
        ]
    if scores.get("skipped_queries"):
        skipped = ", ".join(f"{name} {count:,}" for name, count in scores["skipped_queries"].items())
        lines += ["", f"Skipped bad queries (--skip-bad): {skipped}."]
    if "n_inputs" in settings:
        lines += [
            "",
            f"Inputs: {settings['n_inputs']} before de-duplication, {settings['n_unique_inputs']} distinct; "
            f"{settings.get('n_encoded')} encoded this run, {settings.get('n_cached')} from the cache; "
            f"{settings.get('seconds')} s.",
        ]
    return "\n".join(lines) + "\n"


def plot_scores(scores: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Bar chart of the meta-task, IND, OOD and overall means (strict and ties side by side), as a PNG."""
    # The object-oriented API draws with Agg and leaves pyplot's global backend alone.
    from matplotlib.figure import Figure

    groups = summary_groups(scores)
    labels = [label for label, _ in groups]
    positions = list(range(len(groups)))
    width = 0.38
    figure = Figure(figsize=(max(6.0, 1.1 * len(groups) + 2), 4.0), dpi=100)
    axes = figure.add_subplot()
    for offset, key, label in ((-width / 2, "p@1", STRICT_LABEL), (width / 2, "p@1_ties", TIES_LABEL)):
        values = [100 * group[key] for _, group in groups]
        bars = axes.bar([p + offset for p in positions], values, width, label=label)
        axes.bar_label(bars, fmt="%.1f", fontsize=7)
    axes.set_xticks(positions, labels, rotation=20)
    axes.set_ylabel("P@1 (%)")
    axes.set_ylim(0, 118)  # headroom for the legend above 100 % bars
    axes.set_title(
        f"{scores.get('settings', {}).get('benchmark', '')} — {Path(str(scores.get('settings', {}).get('model', ''))).name}"
    )
    axes.legend(loc="upper center", ncols=2, fontsize=8)
    figure.tight_layout()
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png")


def write_reports(scores: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``scores.json``, ``scores.md`` and ``scores.png`` atomically; returns their paths."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "scores.json", "md": out_dir / "scores.md", "png": out_dir / "scores.png"}
    write_json(paths["json"], scores)
    atomic_write_text(paths["md"], markdown_report(scores))
    plot_scores(scores, paths["png"])
    return paths


def load_scores(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``scores.json``; errors name the file and the missing field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scores file not found: {path}")
    try:
        scores = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(scores, dict) or not isinstance(scores.get("datasets"), dict):
        raise ValueError(f"{path}: field 'datasets': expected a mapping of dataset name to scores")
    for name, entry in scores["datasets"].items():
        for key in ("p@1", "p@1_ties"):
            if not isinstance(entry, dict) or not isinstance(entry.get(key), (int, float)):
                raise ValueError(f"{path}: field 'datasets.{name}.{key}': expected a number")
    return scores


def _value(group: Mapping[str, Any] | None, key: str) -> float | None:
    return None if group is None else group.get(key)


def compare_table(a: Mapping[str, Any], b: Mapping[str, Any], label_a: str = "A", label_b: str = "B") -> str:
    """Side-by-side strict and ties P@1 of two score files, with deltas (B - A) in points."""
    rows = []

    def add(name: str, group_a: Mapping[str, Any] | None, group_b: Mapping[str, Any] | None) -> None:
        row = [name]
        for key in ("p@1", "p@1_ties"):
            va, vb = _value(group_a, key), _value(group_b, key)
            row += [percent(va), percent(vb), delta(va, vb)]
        rows.append(row)

    names = list(a["datasets"]) + [name for name in b["datasets"] if name not in a["datasets"]]
    for name in names:
        add(name, a["datasets"].get(name), b["datasets"].get(name))
    tasks = list(a.get("meta_tasks", {})) + [
        t for t in b.get("meta_tasks", {}) if t not in a.get("meta_tasks", {})
    ]
    for task in tasks:
        add(f"[{task}]", a.get("meta_tasks", {}).get(task), b.get("meta_tasks", {}).get(task))
    for group in SUMMARY_GROUPS:
        if a.get(group) or b.get(group):
            add(f"[{group}]", a.get(group), b.get(group))
    header = ["Dataset / group"]
    for short in ("strict", "ties"):
        header += [f"{label_a} {short}", f"{label_b} {short}", f"Δ {short}"]
    lines = [f"A = {label_a}, B = {label_b}; P@1 in %, Δ = B - A in points; 'ties' counts ties as hits.", ""]
    lines += markdown_table(header, rows, "lrrrrrr")
    return "\n".join(lines) + "\n"


def compare_labels(path_a: str | os.PathLike, path_b: str | os.PathLike) -> tuple[str, str]:
    """Short column labels for two score files: their folder names, or the full paths when those clash."""
    a, b = Path(path_a), Path(path_b)
    if a.parent.name and b.parent.name and a.parent.name != b.parent.name:
        return a.parent.name, b.parent.name
    return str(a), str(b)
