"""The MMEB v1 benchmark as data, text formatting rules, and custom benchmarks described by ``benchmark.yaml``.

Modalities describe the content of the query and of its candidates, not counting the instruction text every
MMEB row carries (so ImageNet-1K is image -> text even though its query text holds an instruction).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from coma.data.formats import DataFormatError, list_data_subsets
from coma.eval.metrics import SPLITS

META_TASKS = ("classification", "vqa", "retrieval", "grounding")
MODALITIES = ("image", "text", "image+text")
MANIFEST_NAME = "benchmark.yaml"
MMEB_NAME = "mmeb-v1"


@dataclass(frozen=True)
class FormatRule:
    """How a query/candidate text is normalised before the model replaces ``<|image_1|>`` and adds C tokens."""

    version: str
    normalize_space_newline: bool
    strip: bool
    ensure_trailing_newline: bool
    # Join MMEB_Test_Instruct's separate instruction and text columns as VLM2Vec v2 does (coma.eval.formatting).
    instruct: bool = False


MMEB_V1 = FormatRule("mmeb-v1", normalize_space_newline=False, strip=True, ensure_trailing_newline=False)
# VLM2Vec's v2 harness rewrites " \n" to "\n" and appends "\n" to the query text "to stay consistent with v1".
VLM2VEC_V2 = FormatRule("vlm2vec-v2", normalize_space_newline=True, strip=False, ensure_trailing_newline=True)
# VLM2Vec v2's image eval on MMEB_Test_Instruct: per-task joining rules (hub-layouts §3).
MMEB_V2_INSTRUCT = FormatRule(
    "mmeb-v2-instruct",
    normalize_space_newline=False,
    strip=False,
    ensure_trailing_newline=False,
    instruct=True,
)
FORMAT_RULES: dict[str, FormatRule] = {rule.version: rule for rule in (MMEB_V1, VLM2VEC_V2, MMEB_V2_INSTRUCT)}


def format_rule(version: str) -> FormatRule:
    """Look a rule up by its version string."""
    if version not in FORMAT_RULES:
        raise ValueError(f"unknown format rule {version!r} (known: {', '.join(FORMAT_RULES)})")
    return FORMAT_RULES[version]


def apply_format_rule(text: str, rule: FormatRule | str = MMEB_V1) -> str:
    """Normalise ``text`` by ``rule``: space-newline first, then strip, then the trailing newline."""
    if isinstance(rule, str):
        rule = format_rule(rule)
    if rule.normalize_space_newline:
        text = text.replace(" \n", "\n")
    if rule.strip:
        text = text.strip()
    if rule.ensure_trailing_newline and not text.endswith("\n"):
        text += "\n"
    return text


@dataclass(frozen=True)
class DatasetSpec:
    """One evaluation dataset: where it lives under the data root and how it is scored and reported."""

    name: str
    meta_task: str
    split: str
    folder: str
    query_modality: str
    candidate_modality: str
    format_rule: FormatRule = MMEB_V1


# (name, meta_task, split, query modality, candidate modality); the hub folder is the name.
_MMEB_TABLE: tuple[tuple[str, str, str, str, str], ...] = (
    ("ImageNet-1K", "classification", "IND", "image", "text"),
    ("N24News", "classification", "IND", "image+text", "text"),
    ("HatefulMemes", "classification", "IND", "image", "text"),
    ("VOC2007", "classification", "IND", "image", "text"),
    ("SUN397", "classification", "IND", "image", "text"),
    ("Place365", "classification", "OOD", "image", "text"),
    ("ImageNet-A", "classification", "OOD", "image", "text"),
    ("ImageNet-R", "classification", "OOD", "image", "text"),
    ("ObjectNet", "classification", "OOD", "image", "text"),
    ("Country211", "classification", "OOD", "image", "text"),
    ("OK-VQA", "vqa", "IND", "image+text", "text"),
    ("A-OKVQA", "vqa", "IND", "image+text", "text"),
    ("DocVQA", "vqa", "IND", "image+text", "text"),
    ("InfographicsVQA", "vqa", "IND", "image+text", "text"),
    ("ChartQA", "vqa", "IND", "image+text", "text"),
    ("Visual7W", "vqa", "IND", "image+text", "text"),
    ("ScienceQA", "vqa", "OOD", "image+text", "text"),
    ("VizWiz", "vqa", "OOD", "image+text", "text"),
    ("GQA", "vqa", "OOD", "image+text", "text"),
    ("TextVQA", "vqa", "OOD", "image+text", "text"),
    ("VisDial", "retrieval", "IND", "text", "image"),
    ("CIRR", "retrieval", "IND", "image+text", "image"),
    ("VisualNews_t2i", "retrieval", "IND", "text", "image"),
    ("VisualNews_i2t", "retrieval", "IND", "image", "text"),
    ("MSCOCO_t2i", "retrieval", "IND", "text", "image"),
    ("MSCOCO_i2t", "retrieval", "IND", "image", "text"),
    ("NIGHTS", "retrieval", "IND", "image", "image"),
    ("WebQA", "retrieval", "IND", "text", "image+text"),
    ("FashionIQ", "retrieval", "OOD", "image+text", "image"),
    ("Wiki-SS-NQ", "retrieval", "OOD", "text", "image"),
    ("OVEN", "retrieval", "OOD", "image+text", "image+text"),
    ("EDIS", "retrieval", "OOD", "text", "image+text"),
    ("MSCOCO", "grounding", "IND", "image+text", "image"),
    ("RefCOCO", "grounding", "OOD", "image+text", "image"),
    ("RefCOCO-Matching", "grounding", "OOD", "image+text", "image+text"),
    ("Visual7W-Pointing", "grounding", "OOD", "image+text", "image"),
)

MMEB_V1_DATASETS: tuple[DatasetSpec, ...] = tuple(
    DatasetSpec(name, task, split, name, query, candidate)
    for name, task, split, query, candidate in _MMEB_TABLE
)

# Manifest defaults when a dataset leaves its modalities out (retrieval has no natural default; t2i is common).
DEFAULT_MODALITIES: dict[str, tuple[str, str]] = {
    "classification": ("image", "text"),
    "vqa": ("image+text", "text"),
    "retrieval": ("text", "image"),
    "grounding": ("image+text", "image"),
}


@dataclass
class Benchmark:
    """The datasets found under a data root; ``missing`` lists declared datasets whose folder is absent, ``extra``
    the folders holding data that the benchmark does not declare (the hub's MMEB-eval ships ``CIFAR-100``)."""

    name: str
    datasets: list[DatasetSpec]
    missing: list[str]
    manifest: Path | None
    extra: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# benchmark.yaml

_TOP_KEYS = {"name", "format_rule", "datasets"}
_DATASET_KEYS = {
    "name",
    "meta_task",
    "split",
    "folder",
    "query_modality",
    "candidate_modality",
    "format_rule",
}


def _fail(manifest: Path, field: str | None, problem: str) -> DataFormatError:
    return DataFormatError(manifest, None, field, problem)


def _string_field(
    manifest: Path, entry: Mapping[str, Any], key: str, field: str, default: str | None = None
) -> str:
    value = entry.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise _fail(manifest, field, f"expected a non-empty string, got {value!r}")
    return value


def _choice_field(
    manifest: Path,
    entry: Mapping[str, Any],
    key: str,
    field: str,
    choices: tuple[str, ...],
    default: str | None = None,
) -> str:
    value = entry.get(key, default)
    if value is None:
        raise _fail(manifest, field, f"missing (expected one of {', '.join(choices)})")
    if value not in choices:
        raise _fail(manifest, field, f"unknown {key} {value!r} (expected one of {', '.join(choices)})")
    return value


def _rule_field(manifest: Path, value: Any, field: str) -> FormatRule:
    if not isinstance(value, str) or value not in FORMAT_RULES:
        raise _fail(
            manifest, field, f"unknown format rule {value!r} (expected one of {', '.join(FORMAT_RULES)})"
        )
    return FORMAT_RULES[value]


def _check_folder(manifest: Path, folder: str, field: str) -> str:
    # The folder is joined onto the data root; keep it inside.
    parts = Path(folder).parts
    if Path(folder).is_absolute() or ".." in parts:
        raise _fail(manifest, field, f"folder must be a relative path inside the data folder, got {folder!r}")
    return folder


def _dataset_spec(manifest: Path, index: int, entry: Any, default_rule: FormatRule) -> DatasetSpec:
    where = f"datasets[{index}]"
    if not isinstance(entry, dict):
        raise _fail(manifest, where, f"expected a mapping, got {type(entry).__name__}")
    unknown = sorted(set(entry) - _DATASET_KEYS)
    if unknown:
        raise _fail(
            manifest, f"{where}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(_DATASET_KEYS))})"
        )
    name = _string_field(manifest, entry, "name", f"{where}.name")
    meta_task = _choice_field(manifest, entry, "meta_task", f"{where}.meta_task", META_TASKS)
    split = _choice_field(manifest, entry, "split", f"{where}.split", SPLITS)
    folder = _check_folder(
        manifest, _string_field(manifest, entry, "folder", f"{where}.folder", name), f"{where}.folder"
    )
    query_default, candidate_default = DEFAULT_MODALITIES[meta_task]
    return DatasetSpec(
        name=name,
        meta_task=meta_task,
        split=split,
        folder=folder,
        query_modality=_choice_field(
            manifest, entry, "query_modality", f"{where}.query_modality", MODALITIES, query_default
        ),
        candidate_modality=_choice_field(
            manifest,
            entry,
            "candidate_modality",
            f"{where}.candidate_modality",
            MODALITIES,
            candidate_default,
        ),
        format_rule=_rule_field(manifest, entry["format_rule"], f"{where}.format_rule")
        if "format_rule" in entry
        else default_rule,
    )


def read_manifest(manifest: str | os.PathLike) -> tuple[str, list[DatasetSpec]]:
    """Parse and validate a ``benchmark.yaml``; returns its name and its dataset specs in file order."""
    manifest = Path(manifest)
    try:
        data = yaml.safe_load(manifest.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise _fail(manifest, None, f"not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise _fail(manifest, None, f"expected a mapping at the top level, got {type(data).__name__}")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise _fail(manifest, unknown[0], f"unknown key (known: {', '.join(sorted(_TOP_KEYS))})")
    name = _string_field(manifest, data, "name", "name")
    default_rule = _rule_field(manifest, data.get("format_rule", MMEB_V1.version), "format_rule")
    entries = data.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise _fail(manifest, "datasets", f"expected a non-empty list of datasets, got {entries!r}")
    specs = [_dataset_spec(manifest, index, entry, default_rule) for index, entry in enumerate(entries)]
    seen: set[str] = set()
    for index, spec in enumerate(specs):
        if spec.name in seen:
            raise _fail(manifest, f"datasets[{index}].name", f"duplicate dataset name {spec.name!r}")
        seen.add(spec.name)
    return name, specs


# ---------------------------------------------------------------------------------------------------------------
# Benchmarks


def load_benchmark(data_dir: str | os.PathLike) -> Benchmark:
    """The benchmark under ``data_dir``: its ``benchmark.yaml`` if present, else the MMEB v1 registry.

    ``datasets`` holds the declared datasets whose folder exists (in declaration order); ``missing`` the rest.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: not a folder")
    manifest = data_dir / MANIFEST_NAME
    if manifest.is_file():
        name, declared = read_manifest(manifest)
    else:
        name, declared, manifest = MMEB_NAME, list(MMEB_V1_DATASETS), None
    present = [spec for spec in declared if (data_dir / spec.folder).is_dir()]
    missing = [spec.name for spec in declared if not (data_dir / spec.folder).is_dir()]
    folders = {spec.folder for spec in declared}
    extra = [name for name in list_data_subsets(data_dir) if name not in folders]
    return Benchmark(name=name, datasets=present, missing=missing, manifest=manifest, extra=extra)


def select(benchmark: Benchmark, names: list[str] | None) -> Benchmark:
    """Keep only ``names`` (benchmark order); ``None`` keeps everything. Unknown or absent names are errors."""
    if names is None:
        return benchmark
    available = [spec.name for spec in benchmark.datasets]
    absent = [name for name in names if name in benchmark.missing]
    if absent:
        raise ValueError(f"datasets not found in the data folder: {', '.join(absent)}")
    extra = [name for name in names if name in benchmark.extra]
    if extra:
        raise ValueError(
            f"{', '.join(extra)}: in the data folder but not part of benchmark {benchmark.name!r}; describe it in a "
            f"{MANIFEST_NAME} to evaluate it"
        )
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(
            f"unknown datasets for benchmark {benchmark.name!r}: {', '.join(unknown)} "
            f"(available: {', '.join(available)})"
        )
    wanted = set(names)
    return replace(
        benchmark, datasets=[spec for spec in benchmark.datasets if spec.name in wanted], missing=[]
    )
