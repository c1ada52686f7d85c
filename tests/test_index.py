"""The faiss index (``coma.serving.index``), ``coma index`` and ``coma search``."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from coma.cli import main
from coma.embedder import Embedder, EncodeInput
from coma.serving.index import Index, Row, resolve_params

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def embedder(tiny_model_dir) -> Embedder:
    return Embedder.from_pretrained(tiny_model_dir)


def mixed_inputs(image_files) -> list:
    return [
        "a red circle",
        "a blue square next to a green triangle",
        "what is in the picture?",
        *image_files,
        {"text": "a photo of this", "image": image_files[0]},
        EncodeInput("describe it", image_files[2]),
    ]


def clustered(n: int, dim: int, seed: int, clusters: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    points = centres[rng.integers(clusters, size=n)] + 0.5 * rng.standard_normal((n, dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def recall(found: list, truth: list) -> float:
    return float(
        np.mean(
            [len({h.id for h in a} & {h.id for h in b}) / len(b) for a, b in zip(found, truth, strict=True)]
        )
    )


def test_flat_search_equals_brute_force(embedder, image_files):
    inputs = mixed_inputs(image_files)
    index = Index.build(embedder, inputs, show_progress=False, batch_size=3)
    embeddings = embedder.encode(inputs, show_progress=False)
    queries = embedder.encode(["a red square", image_files[1], "a photo"], show_progress=False)
    brute = queries @ embeddings.T
    for query_scores, hits in zip(brute, index.search(queries, k=5), strict=True):
        order = np.argsort(-query_scores, kind="stable")[:5]
        assert [hit.id for hit in hits] == [str(i) for i in order]
        np.testing.assert_allclose([hit.score for hit in hits], query_scores[order], atol=1e-5)
        assert [hit.rank for hit in hits] == [1, 2, 3, 4, 5]
    assert index.rows[3] == Row("3", "", str(image_files[0]), "")
    assert index.rows[7] == Row("7", "a photo of this", str(image_files[0]), "")


def test_build_add_search_then_reload_round_trip(embedder, image_files, tmp_path):
    index = Index.build(embedder, ["a red circle", image_files[0]], ids=["circle", "img0"],
                        sources=["mine:1", "mine:2"], show_progress=False)  # fmt: skip
    index.add(embedder, [image_files[1], "a green square"], show_progress=False)
    index.add(embedder, [image_files[2]], ids=["img2"], sources=["x"], show_progress=False)
    assert len(index) == 5
    assert [(row.id, row.source) for row in index.rows] == [
        ("circle", "mine:1"), ("img0", "mine:2"), ("2", ""), ("3", ""), ("img2", "x")
    ]  # fmt: skip
    queries = embedder.encode(["a red circle", image_files[2], image_files[0]], show_progress=False)
    before = index.search(queries, k=10)
    assert [len(hits) for hits in before] == [5, 5, 5]  # k > len gives every row
    assert [hits[0].id for hits in before] == ["circle", "img2", "img0"]
    assert before[1][0].score == pytest.approx(1.0, abs=1e-5)
    index.save(tmp_path / "ix")
    loaded = Index.load(tmp_path / "ix")
    assert (
        len(loaded) == 5 and loaded.rows == index.rows and loaded.kind == "flat" and loaded.dim == index.dim
    )
    assert loaded.search(queries, k=10) == before
    assert loaded.fingerprint == index.fingerprint and loaded.model == str(
        embedder.model.backbone.name_or_path
    )
    loaded.check_embedder(embedder)
    loaded.add(embedder, ["one more"], ids=["more"], show_progress=False)
    assert loaded.search_inputs(embedder, ["one more"], k=1)[0][0].id == "more"
    with pytest.raises(ValueError, match=r"duplicate id 'img0': input 0 and row 1 \(mine:2\)"):
        loaded.add(embedder, ["again"], ids=["img0"], show_progress=False)
    with pytest.raises(ValueError, match="k must be >= 1"):
        loaded.search(queries, k=0)
    with pytest.raises(ValueError, match=rf"queries must be a \(N, {index.dim}\) matrix"):
        loaded.search(queries[:, :3])


def test_load_refuses_files_that_disagree(embedder, tmp_path):
    Index.build(embedder, ["a", "b", "c"], show_progress=False).save(tmp_path / "ix")
    rows = tmp_path / "ix" / "rows.jsonl"
    rows.write_text("".join(rows.read_text().splitlines(keepends=True)[:2]))
    with pytest.raises(ValueError, match="rows.jsonl has 2 rows, index.faiss 3 vectors"):
        Index.load(tmp_path / "ix")
    (tmp_path / "ix" / "index.json").unlink()
    with pytest.raises(FileNotFoundError, match="index.json not found"):
        Index.load(tmp_path / "ix")


def test_cache_makes_builds_resumable_and_keys_the_instruction(embedder, image_files, tmp_path):
    inputs = mixed_inputs(image_files)
    cache = tmp_path / "cache"
    first = Index.build(embedder, inputs[:4], cache_dir=cache, show_progress=False)
    assert (first.encode_stats.encoded, first.encode_stats.cached) == (4, 0)
    resumed = Index.build(embedder, inputs, cache_dir=cache, show_progress=False)
    assert (resumed.encode_stats.encoded, resumed.encode_stats.cached) == (len(inputs) - 4, 4)
    uncached = Index.build(embedder, inputs, show_progress=False)
    queries = embedder.encode(inputs[:3], show_progress=False)
    assert [h.id for h in resumed.search(queries, 4)[0]] == [h.id for h in uncached.search(queries, 4)[0]]
    instructed = Index.build(
        embedder, inputs, cache_dir=cache, instruction="Represent it.", show_progress=False
    )
    assert instructed.encode_stats.encoded == len(inputs)
    expected = embedder.encode(inputs, instruction="Represent it.", show_progress=False)
    hits = instructed.search(expected[:1], k=1)[0]
    assert hits[0].id == "0" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].text == "a red circle"  # rows keep the text without the instruction


def test_hnsw_and_ivfpq_find_most_of_flats_neighbours(tmp_path, caplog):
    vectors = clustered(3000, 32, seed=0)
    queries = vectors[:50] + 0.05 * np.random.default_rng(1).standard_normal((50, 32)).astype(np.float32)
    truth = Index.from_embeddings(vectors).search(queries, 10)
    hnsw = Index.from_embeddings(vectors, kind="hnsw", ef_search=64)
    assert hnsw.params == {"hnsw_m": 32, "ef_construction": 200, "ef_search": 64}
    assert recall(hnsw.search(queries, 10), truth) > 0.9
    ivfpq = Index.from_embeddings(vectors[:2000], kind="ivfpq", nprobe=8)
    assert "training 256 centroids on 2000 vectors (faiss suggests 9984)" in caplog.text
    # nlist = min(4·√2000, 2000 // 39) = 51; pq_m = the largest divisor of 32 that is <= 64.
    assert ivfpq.params == {"nlist": 51, "pq_m": 32, "nbits": 8, "nprobe": 8}
    ivfpq.add_embeddings(vectors[2000:], [Row(str(i)) for i in range(2000, 3000)])  # no retraining
    found = ivfpq.search(queries, 10)
    assert recall(found, truth) > 0.5
    assert [hits[0].id for hits in found] == [str(i) for i in range(50)]
    ivfpq.save(tmp_path / "ivfpq")
    loaded = Index.load(tmp_path / "ivfpq")
    assert loaded._faiss.nprobe == 8 and loaded.params == ivfpq.params
    assert loaded.search(queries, 10) == found


def test_bad_index_parameters_are_named():
    vectors = clustered(100, 32, seed=0)
    with pytest.raises(ValueError, match="needs at least 256 vectors; got 100"):
        Index.from_embeddings(vectors, kind="ivfpq")
    with pytest.raises(ValueError, match="needs at least 150 vectors"):
        resolve_params("ivfpq", {"nlist": 150, "nbits": 4}, 100)
    with pytest.raises(ValueError, match="pq_m=5 must divide the dim 32"):
        Index.from_embeddings(clustered(300, 32, seed=0), kind="ivfpq", pq_m=5)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) nprobe for a hnsw index"):
        Index.from_embeddings(vectors, kind="hnsw", nprobe=3)
    with pytest.raises(ValueError, match="unknown index kind 'lsh'"):
        Index.from_embeddings(vectors, kind="lsh")


def test_bad_inputs_are_refused_before_encoding(embedder, tmp_path):
    with pytest.raises(ValueError, match="no inputs to index"):
        Index.build(embedder, [], show_progress=False)
    with pytest.raises(ValueError, match="duplicate id 'x': a:1 and a:3"):
        Index.build(embedder, ["p", "q", "r"], ids=["x", "y", "x"], sources=["a:1", "a:2", "a:3"])
    with pytest.raises(FileNotFoundError, match=r"input 1: image not found: .*gone\.png"):
        Index.build(embedder, ["p", {"image": str(tmp_path / "gone.png")}], show_progress=False)


# -- the command line ----------------------------------------------------------------------------------------------


def write_items(tmp_path, image_files) -> None:
    (tmp_path / "imgs").mkdir(exist_ok=True)
    for image in image_files:
        shutil.copy(image, tmp_path / "imgs" / image.name)
    lines = [
        {"id": "circle", "text": "a red circle"},
        {"id": 17, "image": "imgs/img0.png"},
        {"text": "a photo of this", "image": "imgs/img1.png"},
        {"id": "img2", "image": "imgs/img2.png"},
    ]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def index_args(tmp_path, model, *extra: str) -> list[str]:
    return ["index", "--model", str(model), "--input", str(tmp_path / "items.jsonl"),
            "--out", str(tmp_path / "ix"), "--no-progress", *extra]  # fmt: skip


def test_index_a_jsonl_file_rerun_overwrite_and_append(tiny_model_dir, image_files, tmp_path, capsys):
    write_items(tmp_path, image_files)
    assert main(index_args(tmp_path, tiny_model_dir)) == 0
    assert "indexed 4 rows" in capsys.readouterr().out
    index = Index.load(tmp_path / "ix")
    assert [(row.id, row.source) for row in index.rows] == [
        ("circle", "items.jsonl:1"), ("17", "items.jsonl:2"), ("3", "items.jsonl:3"), ("img2", "items.jsonl:4")
    ]  # fmt: skip
    assert index.rows[1].image == str(tmp_path / "imgs" / "img0.png")
    meta = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert meta["count"] == 4 and meta["metric"] == "ip" and meta["model"] == str(tiny_model_dir)

    assert main(index_args(tmp_path, tiny_model_dir)) == 1
    assert "already holds an index; pass --overwrite" in capsys.readouterr().err
    assert (
        main(index_args(tmp_path, tiny_model_dir, "--overwrite", "--kind", "hnsw", "--ef-search", "16")) == 0
    )
    assert "4 rows, dim 64, hnsw) in" in (out := capsys.readouterr().out)
    assert "0 inputs encoded, 4 from the cache" in out
    assert Index.load(tmp_path / "ix").params["ef_search"] == 16

    (tmp_path / "more.jsonl").write_text(
        '{"id": "sq", "text": "a green square"}\n{"image": "imgs/img3.png"}\n'
    )
    append = ["index", "--input", str(tmp_path / "more.jsonl"), "--out", str(tmp_path / "ix"), "--append",
              "--no-progress"]  # fmt: skip
    assert main(append) == 0
    assert "indexed 2 rows" in (out := capsys.readouterr().out) and "(6 rows, dim 64, hnsw)" in out
    assert [row.id for row in Index.load(tmp_path / "ix").rows][4:] == ["sq", "2"]
    assert main(append) == 1
    assert "duplicate id 'sq': more.jsonl:1 and row 4 (more.jsonl:1)" in capsys.readouterr().err
    assert main([*append, "--nlist", "4"]) == 1
    assert "leave out --nlist" in capsys.readouterr().err


def test_an_interrupted_index_run_encodes_only_the_rest(tiny_model_dir, image_files, tmp_path, capsys):
    write_items(tmp_path, image_files)
    lines = (tmp_path / "items.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "part.jsonl").write_text("".join(lines[:2]))
    part = ["index", "--model", str(tiny_model_dir), "--input", str(tmp_path / "part.jsonl"),
            "--out", str(tmp_path / "other"), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]  # fmt: skip
    assert main(part) == 0
    capsys.readouterr()
    assert main(index_args(tmp_path, tiny_model_dir, "--cache-dir", str(tmp_path / "cache"))) == 0
    assert "2 inputs encoded, 2 from the cache" in capsys.readouterr().out


def test_search_prints_ranked_rows(tiny_model_dir, image_files, tmp_path, capsys):
    write_items(tmp_path, image_files)
    assert main(index_args(tmp_path, tiny_model_dir)) == 0
    capsys.readouterr()
    base = ["search", "--index", str(tmp_path / "ix")]
    assert main([*base, "--image", str(image_files[2]), "--k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "score", "id", "text", "/", "image"]
    assert table[1].split()[:3] == ["1", "1.0000", "img2"] and len(table) == 4
    assert main([*base, "--text", "a red circle", "--json"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(hits) == 4 and hits[0]["id"] == "circle" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert [hit["rank"] for hit in hits] == [1, 2, 3, 4] and hits[0]["source"] == "items.jsonl:1"
    assert (
        main([*base, "--text", "a photo of this", "--image", str(image_files[1]), "--k", "1", "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["id"] == "3"
    assert main(base) == 1
    assert "pass --text, --image or both" in capsys.readouterr().err


def test_search_with_another_model_is_refused(tiny_model_dirs, image_files, tmp_path, capsys):
    write_items(tmp_path, image_files)
    assert main(index_args(tmp_path, tiny_model_dirs["qwen2_vl"])) == 0
    capsys.readouterr()
    other = [
        "search",
        "--index",
        str(tmp_path / "ix"),
        "--text",
        "x",
        "--model",
        str(tiny_model_dirs["qwen2_5_vl"]),
    ]
    assert main(other) == 1
    assert "is not the model the index was built with" in capsys.readouterr().err


def test_index_an_image_folder(tiny_model_dir, image_files, tmp_path, capsys):
    folder = image_files[0].parent
    out = tmp_path / "ix"
    assert main(["index", "--model", str(tiny_model_dir), "--input", str(folder), "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    assert "indexed 4 rows" in capsys.readouterr().out
    rows = Index.load(out).rows
    assert [row.id for row in rows] == [row.source for row in rows] == [f"img{i}.png" for i in range(4)]
    assert main(["search", "--index", str(out), "--image", str(image_files[3]), "--k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == "img3.png"


@pytest.mark.parametrize(
    ("lines", "message"),
    [(['{"id": "a", "text": "x"}', '{"text": "y"}', '{"id": "a", "text": "z"}'],
      r"items.jsonl:3: duplicate id 'a' \(also on line 1\)"),
     (['{"text": "x"}', '{"image": "imgs/gone.png"}'], r"items.jsonl:2: image not found: .*gone.png"),
     (['{"id": 1.5, "text": "x"}'], "items.jsonl:1: field 'id' must be a non-empty string or an integer"),
     ([], "items.jsonl: no inputs")],
)  # fmt: skip
def test_bad_input_files_are_named(tiny_model_dir, tmp_path, capsys, lines, message):
    import re

    (tmp_path / "items.jsonl").write_text("".join(line + "\n" for line in lines))
    assert main(index_args(tmp_path, tiny_model_dir)) == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "ix" / "index.json").exists()


def test_empty_image_folder_and_missing_faiss(tiny_model_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    args = [
        "index",
        "--model",
        str(tiny_model_dir),
        "--input",
        str(tmp_path / "empty"),
        "--out",
        str(tmp_path / "ix"),
    ]
    assert main(args) == 1
    assert "no image files in the folder" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "faiss", None)
    assert main(args) == 1
    assert "faiss-cpu is not installed: pip install 'coma[index]'" in capsys.readouterr().err
