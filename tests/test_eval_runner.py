"""The MMEB evaluation harness: exact scores on fixtures in the hub schema, de-duplication, a resumable cache that a
changed model never reuses, reports, ``--compare`` and a two-rank run."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from dist_utils import run_distributed
from helpers import FAMILIES, random_image

from coma.cli import main
from coma.data.formats import DataFormatError
from coma.embedder import Embedder
from coma.eval.cache import EmbeddingCache
from coma.eval.metrics import aggregate, hits_at_1
from coma.eval.registry import MMEB_V1_DATASETS
from coma.eval.report import compare_table
from coma.eval.runner import DatasetInputs, evaluate, query_scores, score_dataset
from coma.io import write_json, write_jsonl

IMAGE_TEXT = "<|image_1|>\nRepresent the given image."
CLASSIFY = "<|image_1|>\nRepresent the given image for classification."
DOG = "a photo of a dog"


def image_path(index: int) -> str:
    return f"img/{index}.png"


def identity_rows() -> list[dict]:
    """Candidate 0 is exactly the query input; the rest are labels (one with a space that the format rule strips)."""
    return [
        {
            "qry_text": CLASSIFY,
            "qry_img_path": image_path(i),
            "tgt_text": [CLASSIFY, DOG, "a photo of a cat ", "a photo of a car"],
            "tgt_img_path": [image_path(i), "", "", ""],
        }
        for i in range(3)
    ]


def collapsed_rows() -> list[dict]:
    """Every candidate is the same input, so every query's scores tie."""
    return [
        {
            "qry_text": "<|image_1|>\nWhat colour is the object?",
            "qry_img_path": image_path(3 + i),
            "tgt_text": ["red", "red", "red"],
            "tgt_img_path": [None, "", ""],
        }
        for i in range(2)
    ]


def retrieval_rows() -> list[dict]:
    """Text -> image; query 0's text is also a candidate of the identity dataset (shared across datasets)."""
    captions = [DOG, "two children play football", "an airplane in the blue sky"]
    return [
        {
            "qry_text": caption,
            "qry_img_path": "",
            "tgt_text": [IMAGE_TEXT] * 3,
            "tgt_img_path": [image_path((i + k) % 3) for k in range(3)],
        }
        for i, caption in enumerate(captions)
    ]


def write_parquet(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "test-00000-of-00001.parquet")


def write_images(root: Path, count: int = 5) -> None:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        random_image(100 + index, (56, 56) if index % 2 else (84, 56)).save(root / image_path(index))


MANIFEST = {
    "name": "toy",
    "datasets": [
        {"name": "identity", "meta_task": "classification", "split": "IND"},
        {"name": "collapsed", "meta_task": "vqa", "split": "OOD"},
        {"name": "retrieval", "meta_task": "retrieval", "split": "IND", "folder": "t2i"},
    ],
}


def all_rows() -> dict[str, list[dict]]:
    return {"identity": identity_rows(), "collapsed": collapsed_rows(), "retrieval": retrieval_rows()}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """A manifest benchmark: two parquet datasets and one JSONL dataset, images under the same root."""
    root = tmp_path_factory.mktemp("toy")
    write_images(root)
    write_parquet(root / "identity", identity_rows())
    write_parquet(root / "collapsed", collapsed_rows())
    (root / "t2i").mkdir()
    write_jsonl(root / "t2i" / "test.jsonl", retrieval_rows())
    (root / "benchmark.yaml").write_text(yaml.safe_dump(MANIFEST))
    return root


def expected_inputs() -> tuple[int, set[tuple[str, str]]]:
    """Inputs before de-duplication and the distinct (stripped text, image) pairs, counted from the raw rows."""
    total, distinct = 0, set()
    for rows in all_rows().values():
        for row in rows:
            pairs = [(row["qry_text"], row["qry_img_path"])]
            pairs += list(zip(row["tgt_text"], [p or "" for p in row["tgt_img_path"]], strict=True))
            total += len(pairs)
            distinct |= {(text.strip(), image) for text, image in pairs}
    return total, distinct


@pytest.fixture(scope="module")
def embedder(tiny_model_dir) -> Embedder:
    return Embedder.from_pretrained(tiny_model_dir, device="cpu")


class CountingCollate:
    """Wraps ``Embedder.collate``: records every input it is given and can fail after ``fail_after`` calls."""

    def __init__(self, embedder: Embedder, fail_after: int | None = None) -> None:
        # The class attribute, not ``embedder.collate``, which may already be a patched instance.
        self.original = partial(Embedder.collate, embedder)
        self.fail_after = fail_after
        self.calls = 0
        self.items: list[tuple[str, str]] = []

    def __call__(self, items, image_root=None):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated kill")
        self.calls += 1
        self.items += [(item.text, str(item.image or "")) for item in items]
        return self.original(items, image_root)


def run_eval(embedder, toy, out, image_root=None, **kwargs):
    kwargs.setdefault("batch_size", 4)
    return evaluate(embedder, toy, image_root or toy, out, show_progress=False, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Scores


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_scores_one_and_collapsed_ties(tiny_model_dirs, toy, tmp_path, family):
    scores = run_eval(Embedder.from_pretrained(tiny_model_dirs[family], device="cpu"), toy, tmp_path)
    identity, collapsed = scores["datasets"]["identity"], scores["datasets"]["collapsed"]
    assert (identity["p@1"], identity["p@1_ties"], identity["mrr"], identity["recall@5"]) == (
        1.0,
        1.0,
        1.0,
        1.0,
    )
    assert (collapsed["p@1"], collapsed["p@1_ties"]) == (0.0, 1.0)
    assert collapsed["mrr"] == pytest.approx(1 / 3)  # pessimistic rank 3 of 3
    assert {name: entry["n"] for name, entry in scores["datasets"].items()} == {
        "identity": 3,
        "collapsed": 2,
        "retrieval": 3,
    }
    assert scores["datasets"]["retrieval"]["meta_task"] == "retrieval"
    expected = aggregate(scores["datasets"])
    assert {key: scores[key] for key in expected} == expected
    assert scores["meta_tasks"]["vqa"]["p@1"] == 0.0 and scores["OOD"]["p@1_ties"] == 1.0
    assert scores["missing"] == []


def test_dataset_scores_match_brute_force():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(12, 8)).astype(np.float32)
    embeddings[5] = embeddings[4]  # two ids with the same vector: a genuine tie
    queries = np.array([0, 1, 2, 3])
    candidates = [np.array([4, 5, 6]), np.array([1, 7, 8, 9, 10, 11]), np.array([6, 6, 2]), np.array([3, 9])]
    dataset = DatasetInputs(MMEB_V1_DATASETS[0], queries, candidates)
    result = score_dataset(embeddings, dataset)
    strict, ties, ranks = [], [], []
    for query, cands in zip(queries, candidates, strict=True):
        row = [
            float(np.dot(embeddings[c].astype(np.float64), embeddings[query].astype(np.float64)))
            for c in cands
        ]
        strict.append(all(row[0] > other for other in row[1:]))
        ties.append(all(row[0] >= other for other in row[1:]))
        ranks.append(1 + sum(other >= row[0] for other in row[1:]))
        np.testing.assert_allclose(query_scores(embeddings, query, cands), row, rtol=1e-12)
    assert result["p@1"] == np.mean(strict) and result["p@1_ties"] == np.mean(ties)
    assert result["mrr"] == pytest.approx(np.mean([1 / r for r in ranks]))
    assert result["recall@5"] == np.mean([r <= 5 for r in ranks])
    assert result["p@1_ties"] > result["p@1"], "the fixture must contain a tie"


def test_repeated_candidates_tie_exactly():
    rng = np.random.default_rng(1)
    embeddings = rng.normal(size=(3, 37)).astype(np.float32)
    scores = query_scores(embeddings, 0, np.array([1] * 9 + [2]))
    assert len(set(scores[:9].tolist())) == 1
    strict, ties = hits_at_1([scores[:9]])
    assert not strict[0] and ties[0]


# ---------------------------------------------------------------------------------------------------------------
# De-duplication, cache, resume


def test_each_distinct_input_is_encoded_once(embedder, toy, tmp_path, monkeypatch):
    counter = CountingCollate(embedder)
    monkeypatch.setattr(embedder, "collate", counter)
    scores = run_eval(embedder, toy, tmp_path)
    total, distinct = expected_inputs()
    assert sorted(counter.items) == sorted(distinct), "every distinct input once, and nothing else"
    assert counter.items.count((DOG, "")) == 1, "the input shared by two datasets is encoded once"
    settings = scores["settings"]
    assert (settings["n_inputs"], settings["n_unique_inputs"], settings["n_encoded"]) == (
        total,
        len(distinct),
        len(distinct),
    )
    # Batches are sorted by modality: text-only inputs come before every input with an image.
    has_image = [bool(image) for _, image in counter.items]
    assert has_image == sorted(has_image)


def test_killed_run_resumes_from_the_cache(embedder, toy, tmp_path, monkeypatch):
    reference = run_eval(embedder, toy, tmp_path / "uninterrupted", batch_size=2)
    dying = CountingCollate(embedder, fail_after=3)
    monkeypatch.setattr(embedder, "collate", dying)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_eval(embedder, toy, tmp_path / "run", batch_size=2, flush_every=1)
    shards = list((tmp_path / "run" / "cache").glob("*/*.npz"))
    assert len(shards) == 3 and not (tmp_path / "run" / "scores.json").exists()

    resumed = CountingCollate(embedder)
    monkeypatch.setattr(embedder, "collate", resumed)
    scores = run_eval(embedder, toy, tmp_path / "run", batch_size=2, flush_every=1)
    n_unique = scores["settings"]["n_unique_inputs"]
    assert scores["settings"]["n_cached"] == 6 and scores["settings"]["n_encoded"] == n_unique - 6
    assert len(resumed.items) == n_unique - 6
    assert not set(resumed.items) & set(dying.items), "rows written before the kill are not encoded again"
    assert scores["datasets"] == reference["datasets"]

    again = CountingCollate(embedder)
    monkeypatch.setattr(embedder, "collate", again)
    assert run_eval(embedder, toy, tmp_path / "run")["datasets"] == reference["datasets"]
    assert again.calls == 0, "a complete cache needs no encoding"


def test_changed_model_does_not_reuse_the_cache(embedder, toy, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = run_eval(embedder, toy, tmp_path / "a", cache_dir=cache)
    changed = Embedder.from_pretrained(embedder.model.backbone.name_or_path, device="cpu")
    with torch.no_grad():
        changed.model.backbone.get_input_embeddings().weight[0, 0] += 0.5
    changed.save_pretrained(tmp_path / "changed_model")
    reloaded = Embedder.from_pretrained(tmp_path / "changed_model", device="cpu")
    counter = CountingCollate(reloaded)
    monkeypatch.setattr(reloaded, "collate", counter)
    second = run_eval(reloaded, toy, tmp_path / "b", cache_dir=cache)
    assert second["settings"]["model_fingerprint"] != first["settings"]["model_fingerprint"]
    assert second["settings"]["cache"] != first["settings"]["cache"]
    assert second["settings"]["n_encoded"] == second["settings"]["n_unique_inputs"] == len(counter.items)

    same = Embedder.from_pretrained(embedder.model.backbone.name_or_path, device="cpu")
    third = run_eval(same, toy, tmp_path / "c", cache_dir=cache)
    assert third["settings"]["model_fingerprint"] == first["settings"]["model_fingerprint"]
    assert third["settings"]["n_encoded"] == 0


def test_changed_image_file_is_re_encoded(embedder, tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_images(root)
    write_parquet(root / "identity", identity_rows())
    (root / "benchmark.yaml").write_text(
        yaml.safe_dump({"name": "one", "datasets": [MANIFEST["datasets"][0]]})
    )
    run_eval(embedder, root, tmp_path / "out")
    random_image(999, (84, 84)).save(root / image_path(1))
    counter = CountingCollate(embedder)
    monkeypatch.setattr(embedder, "collate", counter)
    run_eval(embedder, root, tmp_path / "out")
    assert sorted(counter.items) == [(CLASSIFY, image_path(1))]


def test_cache_ignores_temporary_files_and_sees_other_writers(tmp_path):
    template = {"t": 1}
    writer = EmbeddingCache(tmp_path, "f" * 64, template, rank=1, flush_every=2)
    reader = EmbeddingCache(tmp_path, "f" * 64, template, rank=0)
    (writer.folder / ".r001-half.npz.x1y2.tmp").write_bytes(b"PK\x03\x04 truncated")
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    writer.add(["a", "b"], rows[:2])
    assert len(list(writer.folder.glob("*.npz"))) == 0, "one batch stays buffered until flush_every"
    writer.add(["c"], rows[2:])
    reader.refresh()
    assert len(reader) == 3 and reader.missing(["a", "z"]) == ["z"]
    np.testing.assert_array_equal(reader.get(["c", "a"]), rows[[2, 0]])
    other = EmbeddingCache(tmp_path, "e" * 64, template)
    assert other.folder != writer.folder and len(other) == 0


# ---------------------------------------------------------------------------------------------------------------
# Benchmarks, errors, reports, CLI


def test_mmeb_registry_layout_and_missing_datasets(embedder, tmp_path):
    write_images(tmp_path)
    write_parquet(tmp_path / "ImageNet-1K", identity_rows())
    write_parquet(tmp_path / "MSCOCO_t2i", retrieval_rows())
    scores = run_eval(embedder, tmp_path, tmp_path / "out")
    assert scores["settings"]["benchmark"] == "mmeb-v1"
    assert list(scores["datasets"]) == ["ImageNet-1K", "MSCOCO_t2i"]
    assert scores["datasets"]["MSCOCO_t2i"]["meta_task"] == "retrieval"
    assert scores["datasets"]["ImageNet-1K"]["p@1"] == 1.0
    expected_missing = [
        spec.name for spec in MMEB_V1_DATASETS if spec.name not in {"ImageNet-1K", "MSCOCO_t2i"}
    ]
    assert scores["missing"] == expected_missing and len(expected_missing) == 34
    assert "Missing datasets (34)" in (tmp_path / "out" / "scores.md").read_text()


def test_bad_inputs_name_file_row_and_field(embedder, tmp_path):
    write_images(tmp_path)
    rows = identity_rows()
    rows[1]["tgt_img_path"][0] = "../outside.png"
    write_parquet(tmp_path / "ImageNet-1K", rows)
    with pytest.raises(
        DataFormatError, match=r"ImageNet-1K.*:2: field 'tgt_img_path\[0\]'.*outside the image root"
    ):
        run_eval(embedder, tmp_path, tmp_path / "out")
    rows = retrieval_rows()
    rows[2]["qry_text"], rows[2]["qry_img_path"] = "<|image_1|> a <|image_1|> caption", image_path(0)
    rows[0]["tgt_img_path"][1] = "missing.png"
    write_parquet(tmp_path / "ImageNet-1K", rows)
    with pytest.raises(DataFormatError, match=r"2 bad row\(s\)[^\n]*\n.*:1: field 'tgt_img_path\[1\]'.*missing.png"
                       r".*\n.*:3: field 'qry_text'.*holds 2 '<\|image_1\|>'"):  # fmt: skip
        run_eval(embedder, tmp_path, tmp_path / "out")
    scores = run_eval(embedder, tmp_path, tmp_path / "out", skip_bad=True)
    assert scores["skipped_queries"] == {"ImageNet-1K": 2}
    assert scores["datasets"]["ImageNet-1K"]["n"] == len(rows) - 2


def test_text_only_placeholders_are_dropped_and_counted(embedder, tmp_path):
    # Real EDIS / WebQA text-only queries carry "<|image_1|>\n" (hub-layouts §2).
    write_images(tmp_path)
    rows = retrieval_rows()
    write_parquet(tmp_path / "plain" / "ImageNet-1K", rows)
    for row in rows:
        row["qry_text"] = "<|image_1|>\n" + row["qry_text"]
    write_parquet(tmp_path / "fixed" / "ImageNet-1K", rows)
    plain, fixed = (run_eval(embedder, tmp_path / name, tmp_path / f"out-{name}", image_root=tmp_path)
                    for name in ("plain", "fixed"))  # fmt: skip
    assert (
        fixed["placeholder_fixes"] == {"ImageNet-1K/queries": len(rows)} and plain["placeholder_fixes"] == {}
    )
    assert fixed["datasets"]["ImageNet-1K"] == plain["datasets"]["ImageNet-1K"]
    assert (
        "ImageNet-1K: 3 text-only queries carried <|image_1|>; removed"
        in (tmp_path / "out-fixed" / "scores.md").read_text()
    )


def test_reports_are_written(embedder, toy, tmp_path):
    embedder.model.train()
    scores = run_eval(embedder, toy, tmp_path)
    assert embedder.model.training, "evaluation restores the training mode it found"
    embedder.model.eval()
    assert json.loads((tmp_path / "scores.json").read_text()) == json.loads(json.dumps(scores))
    markdown = (tmp_path / "scores.md").read_text()
    assert "P@1 (strict)" in markdown and "P@1 (ties = hit)" in markdown
    assert "| collapsed " in markdown and "0.0" in markdown and "100.0" in markdown
    for group in ("classification", "vqa", "retrieval", "IND", "OOD", "overall"):
        assert f"| {group} " in markdown
    assert markdown.index("| identity") < markdown.index("| collapsed") < markdown.index("## Means")
    assert (tmp_path / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    settings = scores["settings"]
    for key in ("pooling", "min_pixels", "max_pixels", "dtype", "template_version", "format_rule", "seconds"):
        assert key in settings
    assert settings["format_rule"] == "mmeb-v1" and settings["dtype"] == "float32"


def fake_scores(p_identity: float, p_overall: float) -> dict:
    datasets = {
        "identity": {
            "p@1": p_identity,
            "p@1_ties": 1.0,
            "meta_task": "classification",
            "split": "IND",
            "n": 3,
        }
    }
    return {
        "datasets": datasets,
        **aggregate(datasets),
        "overall": {"p@1": p_overall, "p@1_ties": 1.0, "n_datasets": 1},
    }


def test_compare_prints_both_columns_and_deltas(tmp_path, capsys):
    write_json(tmp_path / "base" / "scores.json", fake_scores(0.5, 0.5))
    write_json(tmp_path / "new" / "scores.json", fake_scores(0.75, 0.625))
    assert (
        main(
            [
                "eval",
                "--compare",
                str(tmp_path / "base" / "scores.json"),
                str(tmp_path / "new" / "scores.json"),
            ]
        )
        == 0
    )
    output = capsys.readouterr().out
    assert "base strict" in output and "new strict" in output and "Δ strict" in output
    identity = next(line for line in output.splitlines() if line.startswith("| identity"))
    assert [cell.strip() for cell in identity.strip("|").split("|")] == [
        "identity", "50.0", "75.0", "+25.0", "100.0", "100.0", "+0.0",
    ]  # fmt: skip
    assert "+12.5" in next(line for line in output.splitlines() if "[overall]" in line)
    assert "—" in compare_table(fake_scores(0.5, 0.5), {"datasets": {}}), "a dataset absent from one file"


def test_cli_runs_end_to_end(tiny_model_dir, toy, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(toy),
        "--image-root",
        str(toy),
        "--out",
        str(out),
    ]
    assert (
        main(
            [*argv, "--datasets", "identity,collapsed", "--limit", "2", "--no-progress", "--batch-size", "3"]
        )
        == 0
    )
    scores = json.loads((out / "scores.json").read_text())
    assert list(scores["datasets"]) == ["identity", "collapsed"] and scores["datasets"]["identity"]["n"] == 2
    assert scores["settings"]["model"] == str(tiny_model_dir) and (out / "cache").is_dir()
    assert "| identity" in capsys.readouterr().out
    assert main(["eval", "--data", str(toy)]) == 1, "a run without --model fails with a message"


# ---------------------------------------------------------------------------------------------------------------
# torchrun


def _two_rank_worker(rank: int, world_size: int, model_dir: str, toy: str, out: str) -> dict:
    collate_calls = []
    embedder = Embedder.from_pretrained(model_dir, device="cpu")
    original = embedder.collate

    def counting(items, image_root=None):
        collate_calls.extend((item.text, str(item.image or "")) for item in items)
        return original(items, image_root)

    embedder.collate = counting
    scores = evaluate(embedder, toy, toy, out, batch_size=4, show_progress=False)
    return {"scores": scores, "encoded": collate_calls}


@pytest.mark.slow
def test_two_ranks_split_the_encoding_and_agree(tiny_model_dir, toy, tmp_path, embedder):
    single = run_eval(embedder, toy, tmp_path / "single")
    per_rank = run_distributed(
        _two_rank_worker, 2, tmp_path, str(tiny_model_dir), str(toy), str(tmp_path / "dist")
    )
    encoded = [set(result["encoded"]) for result in per_rank]
    _, distinct = expected_inputs()
    assert encoded[0] and encoded[1] and not encoded[0] & encoded[1] and encoded[0] | encoded[1] == distinct
    shards = {path.name[:4] for path in (tmp_path / "dist" / "cache").glob("*/*.npz")}
    assert shards == {"r000", "r001"}
    assert per_rank[0]["scores"] == per_rank[1]["scores"]
    assert per_rank[0]["scores"]["datasets"] == single["datasets"]
    assert per_rank[0]["scores"]["settings"]["world_size"] == 2
    assert (tmp_path / "dist" / "scores.json").is_file()
