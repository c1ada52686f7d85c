"""The MMEB v1 registry, format rules, benchmark.yaml manifests and dataset selection."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from coma.data.formats import DataFormatError
from coma.eval.registry import (
    MMEB_V1,
    MMEB_V1_DATASETS,
    MODALITIES,
    VLM2VEC_V2,
    Benchmark,
    DatasetSpec,
    FormatRule,
    apply_format_rule,
    format_rule,
    load_benchmark,
    read_manifest,
    select,
)

# DESIGN §2.4, written out independently of the registry table.
EXPECTED = {
    ("classification", "IND"): "ImageNet-1K N24News HatefulMemes VOC2007 SUN397",
    ("classification", "OOD"): "Place365 ImageNet-A ImageNet-R ObjectNet Country211",
    ("vqa", "IND"): "OK-VQA A-OKVQA DocVQA InfographicsVQA ChartQA Visual7W",
    ("vqa", "OOD"): "ScienceQA VizWiz GQA TextVQA",
    ("retrieval", "IND"): "VisDial CIRR VisualNews_t2i VisualNews_i2t MSCOCO_t2i MSCOCO_i2t NIGHTS WebQA",
    ("retrieval", "OOD"): "FashionIQ Wiki-SS-NQ OVEN EDIS",
    ("grounding", "IND"): "MSCOCO",
    ("grounding", "OOD"): "RefCOCO RefCOCO-Matching Visual7W-Pointing",
}


def test_registry_matches_the_mmeb_table() -> None:
    assert len(MMEB_V1_DATASETS) == 36
    assert len({spec.name for spec in MMEB_V1_DATASETS}) == 36
    by_group = {key: [s.name for s in MMEB_V1_DATASETS if (s.meta_task, s.split) == key] for key in EXPECTED}
    assert by_group == {key: names.split() for key, names in EXPECTED.items()}
    tasks = Counter(spec.meta_task for spec in MMEB_V1_DATASETS)
    assert tasks == {"classification": 10, "vqa": 10, "retrieval": 12, "grounding": 4}
    splits = Counter(spec.split for spec in MMEB_V1_DATASETS)
    assert splits == {"IND": 20, "OOD": 16}
    pairs = Counter((spec.meta_task, spec.split) for spec in MMEB_V1_DATASETS)
    assert [pairs[(task, "IND")] for task in ("classification", "vqa", "retrieval", "grounding")] == [
        5,
        6,
        8,
        1,
    ]
    assert [pairs[(task, "OOD")] for task in ("classification", "vqa", "retrieval", "grounding")] == [
        5,
        4,
        4,
        3,
    ]


def test_registry_fields() -> None:
    for spec in MMEB_V1_DATASETS:
        assert spec.folder == spec.name
        assert spec.query_modality in MODALITIES and spec.candidate_modality in MODALITIES
        assert spec.format_rule == MMEB_V1
    by_name = {spec.name: spec for spec in MMEB_V1_DATASETS}
    assert (by_name["MSCOCO_t2i"].query_modality, by_name["MSCOCO_t2i"].candidate_modality) == (
        "text",
        "image",
    )
    assert (by_name["MSCOCO_i2t"].query_modality, by_name["MSCOCO_i2t"].candidate_modality) == (
        "image",
        "text",
    )
    assert all(by_name[n].candidate_modality == "text" for n in EXPECTED[("vqa", "IND")].split())


# ---------------------------------------------------------------------------------------------------------------
# Format rules


@pytest.mark.parametrize(
    ("text", "v1", "v2"),
    [
        ("<|image_1|>\nRepresent the given image for classification", None, None),
        ("  <|image_1|> \nWhat is it? ", "<|image_1|> \nWhat is it?", "  <|image_1|>\nWhat is it? \n"),
        ("Find me an image: a dog\n", "Find me an image: a dog", "Find me an image: a dog\n"),
        ("", "", "\n"),
    ],
)
def test_format_rules(text: str, v1: str | None, v2: str | None) -> None:
    assert apply_format_rule(text) == (text if v1 is None else v1)
    assert apply_format_rule(text, MMEB_V1) == apply_format_rule(text, "mmeb-v1")
    assert apply_format_rule(text, VLM2VEC_V2) == (text + "\n" if v2 is None else v2)
    assert apply_format_rule(text, "vlm2vec-v2") == apply_format_rule(text, VLM2VEC_V2)


def test_format_rule_lookup_and_custom_rule() -> None:
    assert format_rule("vlm2vec-v2") is VLM2VEC_V2
    with pytest.raises(ValueError, match="unknown format rule 'v9'"):
        format_rule("v9")
    rule = FormatRule("all", normalize_space_newline=True, strip=True, ensure_trailing_newline=True)
    assert apply_format_rule("  a \nb \n", rule) == "a\nb\n"


# ---------------------------------------------------------------------------------------------------------------
# Manifests


MANIFEST = """\
name: coma-synth
format_rule: mmeb-v1
datasets:
  - {name: SynthColors, meta_task: classification, split: IND}
  - {name: SynthVQA-OOD, meta_task: vqa, split: OOD, folder: vqa_ood, query_modality: image+text, candidate_modality: text}
  - {name: SynthRet, meta_task: retrieval, split: OOD, format_rule: vlm2vec-v2}
"""


def _data_dir(tmp_path: Path, manifest: str | None, folders: tuple[str, ...] = ()) -> Path:
    for folder in folders:
        (tmp_path / folder).mkdir(parents=True)
    if manifest is not None:
        (tmp_path / "benchmark.yaml").write_text(manifest)
    return tmp_path


def test_manifest_parsing_and_defaults(tmp_path: Path) -> None:
    data_dir = _data_dir(tmp_path, MANIFEST, ("SynthColors", "vqa_ood"))
    benchmark = load_benchmark(data_dir)
    assert benchmark.name == "coma-synth"
    assert benchmark.manifest == data_dir / "benchmark.yaml"
    assert benchmark.datasets == [
        DatasetSpec("SynthColors", "classification", "IND", "SynthColors", "image", "text", MMEB_V1),
        DatasetSpec("SynthVQA-OOD", "vqa", "OOD", "vqa_ood", "image+text", "text", MMEB_V1),
    ]
    assert benchmark.missing == ["SynthRet"]
    _, specs = read_manifest(data_dir / "benchmark.yaml")
    assert specs[2].format_rule == VLM2VEC_V2


def test_manifest_default_format_rule(tmp_path: Path) -> None:
    manifest = (
        "name: x\nformat_rule: vlm2vec-v2\ndatasets:\n  - {name: A, meta_task: grounding, split: OOD}\n"
    )
    _, (spec,) = read_manifest(_data_dir(tmp_path, manifest) / "benchmark.yaml")
    assert spec.format_rule == VLM2VEC_V2
    assert (spec.query_modality, spec.candidate_modality) == ("image+text", "image")


GOOD = "{name: A, meta_task: vqa, split: IND}"


@pytest.mark.parametrize(
    ("manifest", "field", "problem"),
    [
        (
            f"name: x\ndatasets:\n  - {GOOD}\n  - {{name: B, meta_task: ranking, split: IND}}\n",
            "datasets[1].meta_task",
            "unknown meta_task 'ranking'",
        ),
        (
            "name: x\ndatasets:\n  - {name: B, meta_task: vqa, split: test}\n",
            "datasets[0].split",
            "unknown split 'test'",
        ),
        (
            "name: x\ndatasets:\n  - {name: B, meta_task: vqa}\n",
            "datasets[0].split",
            "missing (expected one of IND, OOD)",
        ),
        (
            f"name: x\ndatasets:\n  - {GOOD}\n  - {{name: B, metatask: vqa, split: IND}}\n",
            "datasets[1].metatask",
            "unknown key",
        ),
        (
            "name: x\ndatasets:\n  - {name: B, meta_task: vqa, split: IND, query_modality: audio}\n",
            "datasets[0].query_modality",
            "unknown query_modality 'audio'",
        ),
        (
            "name: x\ndatasets:\n  - {name: B, meta_task: vqa, split: IND, format_rule: v3}\n",
            "datasets[0].format_rule",
            "unknown format rule 'v3'",
        ),
        (
            "name: x\ndatasets:\n  - {name: B, meta_task: vqa, split: IND, folder: ../elsewhere}\n",
            "datasets[0].folder",
            "relative path",
        ),
        (
            "name: x\ndatasets:\n  - {name: 3, meta_task: vqa, split: IND}\n",
            "datasets[0].name",
            "non-empty string",
        ),
        (f"name: x\ndatasets:\n  - {GOOD}\n  - {GOOD}\n", "datasets[1].name", "duplicate dataset name 'A'"),
        ("name: x\ndatasets:\n  - just-a-name\n", "datasets[0]", "expected a mapping"),
        ("name: x\ndatasets: []\n", "datasets", "non-empty list"),
        (f"datasets:\n  - {GOOD}\n", "name", "non-empty string"),
        (f"name: x\nformat_rule: v0\ndatasets:\n  - {GOOD}\n", "format_rule", "unknown format rule"),
        (f"name: x\nextra: 1\ndatasets:\n  - {GOOD}\n", "extra", "unknown key"),
    ],
)
def test_manifest_errors_name_file_index_and_field(
    tmp_path: Path, manifest: str, field: str, problem: str
) -> None:
    data_dir = _data_dir(tmp_path, manifest)
    with pytest.raises(DataFormatError) as info:
        load_benchmark(data_dir)
    assert info.value.path == data_dir / "benchmark.yaml"
    assert info.value.field == field
    assert str(info.value).startswith(f"{data_dir / 'benchmark.yaml'}: field '{field}': ")
    assert problem in str(info.value)


@pytest.mark.parametrize(
    ("manifest", "problem"), [("- a\n- b\n", "mapping at the top level"), ("name: [x\n", "YAML")]
)
def test_manifest_file_level_errors(tmp_path: Path, manifest: str, problem: str) -> None:
    with pytest.raises(DataFormatError, match=problem) as info:
        load_benchmark(_data_dir(tmp_path, manifest))
    assert info.value.path == tmp_path / "benchmark.yaml"


# ---------------------------------------------------------------------------------------------------------------
# MMEB fallback and selection


def test_mmeb_fallback_reports_missing(tmp_path: Path) -> None:
    data_dir = _data_dir(tmp_path, None, ("VisDial", "ImageNet-1K", "RefCOCO", "not-a-dataset"))
    (data_dir / "GQA").write_text("a file, not a folder")
    benchmark = load_benchmark(data_dir)
    assert benchmark.name == "mmeb-v1" and benchmark.manifest is None
    assert [spec.name for spec in benchmark.datasets] == ["ImageNet-1K", "VisDial", "RefCOCO"]
    assert len(benchmark.missing) == 33
    assert "GQA" in benchmark.missing and "VisDial" not in benchmark.missing
    with pytest.raises(FileNotFoundError):
        load_benchmark(tmp_path / "absent")


def test_select(tmp_path: Path) -> None:
    benchmark = load_benchmark(_data_dir(tmp_path, None, ("VisDial", "ImageNet-1K", "RefCOCO")))
    assert select(benchmark, None) is benchmark
    chosen = select(benchmark, ["RefCOCO", "ImageNet-1K"])
    assert isinstance(chosen, Benchmark)
    assert [spec.name for spec in chosen.datasets] == ["ImageNet-1K", "RefCOCO"]
    assert chosen.missing == [] and chosen.name == "mmeb-v1"
    assert len(benchmark.datasets) == 3
    with pytest.raises(ValueError, match=r"Imagenet.*available: ImageNet-1K, VisDial, RefCOCO"):
        select(benchmark, ["Imagenet"])
    with pytest.raises(ValueError, match="not found in the data folder: GQA"):
        select(benchmark, ["GQA", "VisDial"])
