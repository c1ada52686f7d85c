"""The hub replicas themselves, checked with pyarrow/PIL only (not through coma's readers)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hub_replicas import (
    EVAL_CONFIGS,
    TRAIN_SUBSETS,
    append_rows,
    corrupt_image,
    eval_shard,
    train_shard,
    write_mmeb_eval,
    write_mmeb_train,
    write_stage1_conversations,
)
from PIL import Image, UnidentifiedImageError

IMG = "<|image_1|>"
ALL_TRAIN = [
    "A-OKVQA",
    "CIRR",
    "ChartQA",
    "DocVQA",
    "HatefulMemes",
    "ImageNet_1K",
    "InfographicsVQA",
    "MSCOCO",
    "MSCOCO_i2t",
    "MSCOCO_t2i",
    "N24News",
    "NIGHTS",
    "OK-VQA",
    "SUN397",
    "VOC2007",
    "VisDial",
    "Visual7W",
    "VisualNews_i2t",
    "VisualNews_t2i",
    "WebQA",
]
CLS = [
    "ImageNet-1K",
    "N24News",
    "HatefulMemes",
    "VOC2007",
    "SUN397",
    "Place365",
    "ImageNet-A",
    "ImageNet-R",
    "ObjectNet",
    "Country211",
]
VQA = [
    "OK-VQA",
    "A-OKVQA",
    "DocVQA",
    "InfographicsVQA",
    "ChartQA",
    "Visual7W",
    "ScienceQA",
    "VizWiz",
    "GQA",
    "TextVQA",
]
# (query, candidates) modalities, written out independently of the helper's table.
MODALITY = {
    **{c: ("image", "text") for c in CLS},
    "N24News": ("image+text", "text"),
    **{c: ("image+text", "text") for c in VQA},
    "VisDial": ("text", "image"),
    "CIRR": ("image+text", "image"),
    "VisualNews_t2i": ("text", "image"),
    "VisualNews_i2t": ("image", "text"),
    "MSCOCO_t2i": ("text", "image"),
    "MSCOCO_i2t": ("image", "text"),
    "NIGHTS": ("image", "image"),
    "WebQA": ("text", "image+text"),
    "FashionIQ": ("image+text", "image"),
    "Wiki-SS-NQ": ("text", "image"),
    "OVEN": ("image+text", "image+text"),
    "EDIS": ("text", "image+text"),
    "MSCOCO": ("image+text", "image"),
    "RefCOCO": ("image+text", "image"),
    "Visual7W-Pointing": ("image+text", "image"),
    "RefCOCO-Matching": ("image+text", "image+text"),
    "CIFAR-100": ("image", "text"),
}


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _decodes(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except (UnidentifiedImageError, OSError):
        return False


@pytest.fixture(scope="module")
def train_root(tmp_path_factory) -> Path:
    return write_mmeb_train(tmp_path_factory.mktemp("hub") / "MMEB-train")


@pytest.fixture(scope="module")
def eval_dirs(tmp_path_factory) -> tuple[Path, Path]:
    return write_mmeb_eval(tmp_path_factory.mktemp("hub_eval"))


def test_train_folders_files_and_root_extras(train_root: Path) -> None:
    assert list(TRAIN_SUBSETS) == ALL_TRAIN
    subsets = sorted(
        p.name for p in train_root.iterdir() if p.is_dir() and p.name not in {"images", "images_zip"}
    )
    assert subsets == sorted(ALL_TRAIN)
    for subset in ALL_TRAIN:
        assert sorted(p.name for p in (train_root / subset).iterdir()) == [
            "diverse_instruction-00000-of-00001.parquet",
            "original-00000-of-00001.parquet",
            "train-00000-of-00001.parquet",
        ]
    assert {"README.md", "unzip_file.py", "images_zip"} <= {p.name for p in train_root.iterdir()}
    assert (train_root / "images_zip" / "ImageNet_1K.zip").is_file()


def test_train_columns_and_row_counts(train_root: Path) -> None:
    full = ["qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path"]
    for subset in ALL_TRAIN:
        for split in ("original", "diverse_instruction", "train"):
            schema = pq.read_schema(train_shard(train_root, subset, split))
            assert schema.names == (full[:4] if subset == "CIRR" else full), (subset, split)
            assert all(t == pa.string() for t in schema.types)
        n = [pq.read_metadata(train_shard(train_root, subset, s)).num_rows for s in ("original", "train")]
        assert n == [6, 7]  # the legacy shard has one extra row


def test_train_text_conventions(train_root: Path) -> None:
    rows = {s: _rows(train_shard(train_root, s)) for s in ALL_TRAIN}
    assert all(r["qry"].endswith("\n") for s in ALL_TRAIN for r in rows[s])
    assert rows["ImageNet_1K"][0]["qry"] == f"{IMG}\nRepresent the given image for classification\n"
    assert rows["OK-VQA"][0]["qry"].startswith(
        f"{IMG}\nRepresent the given image with the following question: "
    )
    mscoco = rows["MSCOCO"][0]
    assert (
        mscoco["qry"]
        == f'{IMG}\nSelect the portion of the image that isolates the object labeled as "hot dog"\n'
    )
    assert mscoco["pos_text"] == f"{IMG}\nRepresent the given cropped image of the object"
    assert mscoco["pos_image_path"] == "images/MSCOCO/Train/558840_object_hot dog.jpg"
    for s in ("CIRR", "NIGHTS", "MSCOCO_t2i", "VisualNews_t2i"):
        assert rows[s][0]["pos_text"] == f"{IMG}\nRepresent the given image.\n"
    visdial = rows["VisDial"][0]
    assert visdial["qry"].startswith("Represent the given dialogue about an image") and visdial[
        "qry"
    ].endswith("\n\n")
    assert "Q:" in visdial["qry"] and "\nA:" in visdial["qry"] and visdial["qry_image_path"] == ""
    assert visdial["pos_text"] == f"{IMG}\nRepresent the given image\n"
    assert visdial["neg_text"] == "" and visdial["neg_image_path"].startswith("images/VisDial/Train/")
    for r in rows["WebQA"]:  # placeholder without an image
        assert r["qry"].startswith(f"{IMG}\nFind a Wikipedia image") and r["qry_image_path"] == ""
    for s in ("MSCOCO_t2i", "VisualNews_t2i"):
        assert all(IMG not in r["qry"] and r["qry_image_path"] == "" for r in rows[s])
    assert any(r["pos_text"].endswith(" ") for r in rows["ChartQA"])
    nulls = [(s, c) for s in ALL_TRAIN for r in rows[s] for c, v in r.items() if v is None]
    assert nulls and all(c.startswith("neg_") for _, c in nulls)


def test_train_diverse_instruction_split(train_root: Path) -> None:
    orig = _rows(train_shard(train_root, "ImageNet_1K"))
    div = _rows(train_shard(train_root, "ImageNet_1K", "diverse_instruction"))
    assert div[0]["qry"] == "Represent <|image_1|> for classification."
    assert [r["qry_image_path"] for r in div] == [r["qry_image_path"] for r in orig]
    for subset in ALL_TRAIN:
        qrys = [r["qry"] for r in _rows(train_shard(train_root, subset, "diverse_instruction"))]
        assert f"{IMG}\n" not in qrys[0]
    webqa = _rows(train_shard(train_root, "WebQA", "diverse_instruction"))[0]
    assert IMG in webqa["qry"] and webqa["qry_image_path"] == ""
    assert _rows(train_shard(train_root, "OK-VQA", "diverse_instruction"))[0]["qry"].endswith(
        _rows(train_shard(train_root, "OK-VQA"))[0]["qry"].split(": ", 1)[1]
    )


def test_train_image_paths_resolve_and_decode(train_root: Path) -> None:
    paths = set()
    for subset in ALL_TRAIN:
        for split in ("original", "diverse_instruction", "train"):
            for r in _rows(train_shard(train_root, subset, split)):
                for col in ("qry_image_path", "pos_image_path", "neg_image_path"):
                    if r.get(col):
                        assert r[col].startswith(f"images/{subset}/Train/")
                        paths.add(r[col])
    assert "images/InfographicsVQA/Train/20471.jpeg" in paths
    assert "images/ImageNet_1K/Train/image_0.jpg" in paths
    assert "images/VisDial/Train/VisDial_image_0.jpg" in paths
    assert any(" " in p for p in paths)
    assert all(_decodes(train_root / p) for p in paths)
    sizes = {Image.open(train_root / p).size for p in paths}
    assert len(sizes) >= 3
    junk = list((train_root / "images").rglob("._*"))
    assert junk and not any(_decodes(p) for p in junk)


def test_eval_configs_schema_and_modalities(eval_dirs: tuple[Path, Path]) -> None:
    data_dir, image_dir = eval_dirs
    configs = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    assert len(configs) == 37 and "CIFAR-100" in configs and sorted(EVAL_CONFIGS) == configs
    assert sorted(MODALITY) == configs
    for config in configs:
        assert [p.name for p in (data_dir / config).iterdir()] == ["test-00000-of-00001.parquet"]
        schema = pq.read_schema(eval_shard(data_dir, config))
        assert schema.names == ["qry_text", "qry_img_path", "tgt_text", "tgt_img_path"]
        assert (
            schema.field("tgt_text").type == pa.list_(pa.string())
            and schema.field("qry_text").type == pa.string()
        )
        rows = _rows(eval_shard(data_dir, config))
        assert len(rows) == 3
        qmod, cmod = MODALITY[config]
        assert len({(r["qry_text"], r["qry_img_path"]) for r in rows}) == 3
        for r in rows:
            assert bool(r["qry_img_path"]) == ("image" in qmod), config
            assert len(r["tgt_text"]) == len(r["tgt_img_path"]) >= 2
            assert len(set(zip(r["tgt_text"], r["tgt_img_path"], strict=True))) == len(r["tgt_text"])
            assert all(bool(p) == ("image" in cmod) for p in r["tgt_img_path"]), config
            if cmod == "text":
                assert not any(IMG in t for t in r["tgt_text"])
            for p in [r["qry_img_path"], *r["tgt_img_path"]]:
                if p:
                    assert p.startswith(f"{config}/") and _decodes(image_dir / p)


def test_eval_text_quirks(eval_dirs: tuple[Path, Path]) -> None:
    data_dir, image_dir = eval_dirs

    def first(config: str) -> dict:
        return _rows(eval_shard(data_dir, config))[0]

    assert first("ImageNet-1K")["qry_text"] == f"{IMG}\nRepresent the given image for classification\n"
    for config in ("EDIS", "WebQA"):
        r = first(config)
        assert r["qry_text"].startswith(f"{IMG}\n") and r["qry_img_path"] == ""
        assert all(t.startswith(f"{IMG}\n") and len(t) > 60 for t in r["tgt_text"])
    assert first("MSCOCO_t2i")["tgt_text"][0] == f"{IMG}\nRepresent the given image.\n"
    assert "Crop the image to to isolate" in first("MSCOCO")["qry_text"]
    for config in ("MSCOCO", "RefCOCO", "Visual7W-Pointing"):
        assert set(first(config)["tgt_text"]) == {f"{IMG}\nRepresent the given cropped image of the object"}
    assert "expressions. " in first("RefCOCO")["qry_text"]
    assert "expressions: " in first("RefCOCO-Matching")["qry_text"]
    assert first("VisualNews_i2t")["tgt_img_path"] == ["", "", "", ""]
    assert first("ScienceQA")["qry_img_path"].endswith(".png")
    assert list(image_dir.rglob("._*"))
    assert (data_dir / "images.zip").is_file()


def test_stage1_reuses_train_images(train_root: Path, tmp_path: Path) -> None:
    path = write_stage1_conversations(tmp_path / "s1.jsonl", train_root, n=8)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 8 and len({r["id"] for r in records}) == 8
    for r in records:
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2) and 3 <= len(conv) // 2 <= 5
        tokens = [t["value"].count("<image>") for t in conv]
        if r["image"] is None:
            assert sum(tokens) == 0
        else:
            assert tokens[0] == 1 and sum(tokens) == 1 and conv[0]["value"].startswith("<image>\n")
            assert r["image"].startswith("images/") and _decodes(train_root / r["image"])
    assert sum(r["image"] is None for r in records) == 1


def test_stage1_writes_images_when_root_is_bare(tmp_path: Path) -> None:
    path = write_stage1_conversations(tmp_path / "s1.jsonl", tmp_path / "bare", n=4, text_only=False)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert all(_decodes(tmp_path / "bare" / r["image"]) for r in records)


def test_deterministic_and_seeded(tmp_path: Path) -> None:
    a = write_mmeb_train(tmp_path / "a", subsets=["OK-VQA"], rows=3, seed=0)
    b = write_mmeb_train(tmp_path / "b", subsets=["OK-VQA"], rows=3, seed=0)
    c = write_mmeb_train(tmp_path / "c", subsets=["OK-VQA"], rows=3, seed=1)
    assert _rows(train_shard(a, "OK-VQA")) == _rows(train_shard(b, "OK-VQA"))
    assert _rows(train_shard(a, "OK-VQA")) != _rows(train_shard(c, "OK-VQA"))
    img = "images/OK-VQA/Train/OK-VQA_image_0.jpg"
    assert (a / img).read_bytes() == (b / img).read_bytes() != (c / img).read_bytes()
    assert sorted(p.name for p in a.iterdir() if p.is_dir()) == ["OK-VQA", "images", "images_zip"]


def test_negative_helpers(tmp_path: Path) -> None:
    root = write_mmeb_train(tmp_path / "t", subsets=["CIRR"], rows=2)
    shard = train_shard(root, "CIRR")
    row = _rows(shard)[0]
    append_rows(shard, [{**row, "qry_image_path": "images/CIRR/Train/missing.jpg"}])
    rows = _rows(shard)
    assert len(rows) == 3 and not (root / rows[-1]["qry_image_path"]).exists()
    for how in ("garbage", "truncated"):
        victim = corrupt_image(root / rows[0 if how == "garbage" else 1]["pos_image_path"], how=how)
        assert not _decodes(victim)
