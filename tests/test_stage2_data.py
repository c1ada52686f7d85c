"""Stage-2 data: subset selection, caps, weights, row validation, and the pair collator's processor batches."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from coma import Embedder
from coma.data.formats import DataFormatError, TrainPair
from coma.data.sampling import BlockMixtureSampler
from coma.io import write_jsonl
from coma.train.stage2_data import PairCollator, PairDataset, pair_inputs

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def _row(i: int, **overrides: str) -> dict:
    colour = list(COLOURS)[i % len(COLOURS)]
    row = {
        "qry": "<|image_1|>\nRepresent the given image for classification",
        "qry_image_path": f"colours/{colour}.png",
        "pos_text": f"{colour} {i}",
        "pos_image_path": "",
        "neg_text": "",
        "neg_image_path": "",
    }
    row.update(overrides)
    return row


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "colours").mkdir(parents=True)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (56, 56), rgb).save(root / "colours" / f"{name}.png")
    return root


@pytest.fixture
def train_root(tmp_path: Path) -> Path:
    """Three subsets: JSONL, parquet, and one with hard negatives (text for some rows, an image for one)."""
    root = tmp_path / "mmeb_train"
    write_jsonl(root / "ColourCls" / "original.jsonl", [_row(i) for i in range(10)])
    write_jsonl(
        root / "ColourCls" / "diverse_instruction.jsonl", [_row(i, qry="Which colour?") for i in range(3)]
    )
    (root / "CaptionRet").mkdir(parents=True)
    rows = [_row(i, qry=f"Find the caption {i}", qry_image_path="", pos_image_path="colours/red.png",
                 pos_text="<|image_1|>\nRepresent the given image.") for i in range(6)]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), root / "CaptionRet" / "original-00000-of-00001.parquet")
    negatives = [_row(0, neg_text="a wrong label"), _row(1), _row(2, neg_image_path="colours/blue.png")]
    write_jsonl(root / "WithNegs" / "original.jsonl", negatives)
    (root / "not_a_subset").mkdir()
    return root


@pytest.fixture(scope="module")
def embedder(tiny_model_dir) -> Embedder:
    return Embedder.from_pretrained(tiny_model_dir)


# ---------------------------------------------------------------------------------------------------------------
# PairDataset


def test_selects_subsets_applies_caps_and_weights(train_root: Path, image_root: Path) -> None:
    data = PairDataset.from_config(
        train_root,
        ["ColourCls", "CaptionRet"],
        weights={"CaptionRet": 2.5},
        caps={"ColourCls": 4},
        split="original",
        image_root=image_root,
    )
    assert data.subsets == ["ColourCls", "CaptionRet"]
    assert data.subset_sizes == {"ColourCls": 4, "CaptionRet": 6}
    assert len(data) == 10
    assert data.weights == {"ColourCls": 1.0, "CaptionRet": 2.5}
    # A cap keeps the first rows, in file order.
    assert [data.get("ColourCls", i).pos_text for i in range(4)] == ["red 0", "green 1", "blue 2", "yellow 3"]
    assert data.get("CaptionRet", 5).qry == "Find the caption 5"
    assert data.get("CaptionRet", 5).subset == "CaptionRet"
    with pytest.raises(IndexError, match="out of range for subset 'ColourCls' \\(4 rows\\)"):
        data.get("ColourCls", 4)
    with pytest.raises(KeyError, match="WithNegs"):
        data.get("WithNegs", 0)


def test_defaults_read_every_subset_and_the_original_split(train_root: Path, image_root: Path) -> None:
    data = PairDataset.from_config(train_root, image_root=image_root)
    # "not_a_subset" has no data files, so it is not a subset; of ColourCls's two splits only `original` is read.
    assert data.subset_sizes == {"CaptionRet": 6, "ColourCls": 10, "WithNegs": 3}
    assert data.weights == {"CaptionRet": 1.0, "ColourCls": 1.0, "WithNegs": 1.0}
    assert (
        data.report.lines()[0]
        == "no --split given: reading 'original' (also present, not read: diverse_instruction)"
    )
    diverse = PairDataset.from_config(
        train_root, ["ColourCls"], split="diverse_instruction", image_root=image_root
    )
    assert diverse.subset_sizes == {"ColourCls": 3} and diverse.report.lines() == []


def test_subset_sizes_drive_the_sampler(train_root: Path, image_root: Path) -> None:
    data = PairDataset.from_config(train_root, split="original", image_root=image_root)
    sampler = BlockMixtureSampler(data.subset_sizes, data.weights, global_batch_size=8, block_size=4, seed=1)
    keys = sampler.next_batch()
    pairs = data.get_many(keys)
    assert len(pairs) == 8
    assert [(pair.subset, pair) for pair in pairs] == [(subset, data.get(subset, i)) for subset, i in keys]


def test_unknown_subset_lists_what_exists(train_root: Path) -> None:
    with pytest.raises(
        ValueError, match="unknown subset\\(s\\) ImageNet_1K.*available: CaptionRet, ColourCls, WithNegs"
    ):
        PairDataset.from_config(train_root, ["ColourCls", "ImageNet_1K"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"caps": {"ColourCls": 0}}, "must be a positive integer, got 0"),
        ({"weights": {"ColourCls": -1.0}}, "must be a number >= 0"),
        ({"weights": {"ColourCls": 0, "CaptionRet": 0, "WithNegs": 0}}, "every selected subset has weight 0"),
        ({"subsets": []}, "no subsets selected"),
        ({"subsets": ["ColourCls", "ColourCls"]}, "more than once: ColourCls"),
    ],
)
def test_bad_selection_is_refused(train_root: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PairDataset.from_config(train_root, **kwargs)


def test_weights_and_caps_for_unselected_subsets_are_ignored(train_root: Path, image_root: Path) -> None:
    # A paper recipe names all 20 hub subsets; a user who downloaded a few selects those.
    data = PairDataset.from_config(
        train_root, ["WithNegs"], weights={"ColourCls": 3.0, "VisDial": 2.0}, caps={"CaptionRet": 1, "Nope": 3},
        image_root=image_root,
    )  # fmt: skip
    assert data.weights == {"WithNegs": 1.0} and data.subset_sizes == {"WithNegs": 3}
    assert data.report.lines() == [
        "ignored for subsets not selected: weights ColourCls, VisDial; caps CaptionRet, Nope"
    ]


def test_missing_jsonl_field_names_file_row_and_field(tmp_path: Path, image_root: Path) -> None:
    rows = [_row(0), {key: value for key, value in _row(1).items() if key != "pos_text"}]
    write_jsonl(tmp_path / "root" / "Bad" / "original.jsonl", rows)
    with pytest.raises(DataFormatError) as info:
        PairDataset.from_config(tmp_path / "root", image_root=image_root)
    assert (info.value.path.name, info.value.row, info.value.field) == ("original.jsonl", 2, "pos_text")
    assert "Bad/original.jsonl:2" in str(info.value)


def test_missing_parquet_column_names_file_and_column(tmp_path: Path, image_root: Path) -> None:
    rows = [{key: value for key, value in _row(i).items() if key != "qry_image_path"} for i in range(2)]
    path = tmp_path / "root" / "Bad" / "original-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataFormatError, match="qry_image_path") as info:
        PairDataset.from_config(tmp_path / "root", image_root=image_root)
    assert info.value.path == path and info.value.field == "qry_image_path"


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"qry": " ", "qry_image_path": ""}, "qry", "neither 'qry' nor 'qry_image_path'"),
        ({"pos_text": "", "pos_image_path": ""}, "pos_text", "neither 'pos_text' nor 'pos_image_path'"),
        ({"qry": "<|image_1|> and <|image_1|>"}, "qry", "2 image placeholders"),
        ({"qry_image_path": "colours/none.png"}, "qry_image_path", "image not found: .*colours/none.png"),
        ({"pos_image_path": "../../etc/passwd"}, "pos_image_path", "outside the image root"),
    ],
)
def test_bad_rows_name_file_row_and_field(
    tmp_path: Path, image_root: Path, overrides: dict, field: str, message: str
) -> None:
    write_jsonl(tmp_path / "root" / "Bad" / "original.jsonl", [_row(0), _row(1), _row(2, **overrides)])
    with pytest.raises(DataFormatError, match=message) as info:
        PairDataset.from_config(tmp_path / "root", image_root=image_root)
    assert (info.value.path.name, info.value.row, info.value.field) == ("original.jsonl", 3, field)


def test_empty_subset_is_an_error(tmp_path: Path, image_root: Path) -> None:
    (tmp_path / "root" / "Empty").mkdir(parents=True)
    (tmp_path / "root" / "Empty" / "original.jsonl").write_text("")
    with pytest.raises(DataFormatError, match="no rows"):
        PairDataset.from_config(tmp_path / "root", image_root=image_root)


def test_pair_inputs_keep_text_and_relative_image_paths() -> None:
    pair = TrainPair("S", 1, "<|image_1|>\nq", "a/b.png", "label", "", "", "", "f.jsonl")
    query, target, negative = pair_inputs(pair)
    assert (query.text, query.image) == ("<|image_1|>\nq", "a/b.png")
    assert (target.text, target.image) == ("label", None)
    assert negative is None


# ---------------------------------------------------------------------------------------------------------------
# PairCollator


def _ends_with_compression_tokens(batch: dict, token_ids: list[int]) -> None:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for row in range(ids.shape[0]):
        real = ids[row][mask[row].bool()]
        assert real[-len(token_ids) :].tolist() == token_ids, f"row {row} does not end with C_0..C_T-1"


def test_collator_groups_and_compression_tokens(
    train_root: Path, image_root: Path, embedder: Embedder
) -> None:
    data = PairDataset.from_config(train_root, split="original", image_root=image_root)
    pairs = [data.get("ColourCls", 0), data.get("CaptionRet", 1), *data.pairs["WithNegs"]]
    collator = PairCollator(embedder, image_root)
    groups = collator.inputs(pairs)
    assert len(groups.queries) == len(groups.targets) == 5
    # Only the two rows that have a negative contribute one; the text one and the image one, in row order.
    assert [(n.text, n.image) for n in groups.negatives] == [
        ("a wrong label", None),
        ("", "colours/blue.png"),
    ]

    batch = collator(pairs)
    token_ids = embedder.model.token_ids.tolist()
    assert len(token_ids) == embedder.config.num_tokens
    for name, size in (("query", 5), ("target", 5), ("negative", 2)):
        group = getattr(batch, name)
        assert group["input_ids"].shape[0] == size
        _ends_with_compression_tokens(group, token_ids)
    tokenizer = embedder.processor.tokenizer
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # Images: all five queries but one (CaptionRet's query is text), the CaptionRet target, the image negative.
    assert (batch.query["input_ids"] == image_pad).any(dim=1).tolist() == [True, False, True, True, True]
    assert (batch.target["input_ids"] == image_pad).any(dim=1).tolist() == [False, True, False, False, False]
    assert (batch.negative["input_ids"] == image_pad).any(dim=1).tolist() == [False, True]
    text = tokenizer.decode(batch.query["input_ids"][0])
    assert "<|image_1|>" not in text and "<|vision_start|>" in text
    assert batch.target["pixel_values"].shape[0] > 0


def test_collator_without_negatives_gives_none(
    train_root: Path, image_root: Path, embedder: Embedder
) -> None:
    data = PairDataset.from_config(train_root, ["ColourCls"], split="original", image_root=image_root)
    batch = PairCollator(embedder, image_root)(data.pairs["ColourCls"][:3])
    assert batch.negative is None
    assert "pixel_values" not in batch.target
    assert batch.query["pixel_values"].shape[0] > 0


def test_collator_missing_image_names_the_data_row(
    train_root: Path, image_root: Path, embedder: Embedder
) -> None:
    pair = TrainPair("S", 7, "q", "", "<|image_1|>\nt", "colours/purple.png", "", "", "data.jsonl")
    with pytest.raises(DataFormatError, match="image not found") as info:
        PairCollator(embedder, image_root).inputs([pair])
    assert (str(info.value.path), info.value.row, info.value.field) == ("data.jsonl", 7, "pos_image_path")


def test_collator_refuses_paths_outside_the_image_root(image_root: Path, embedder: Embedder) -> None:
    pair = TrainPair("S", 2, "q", "../secret.png", "t", "", "", "", "data.jsonl")
    with pytest.raises(DataFormatError, match="outside the image root") as info:
        PairCollator(embedder, image_root).inputs([pair])
    assert (info.value.row, info.value.field) == (2, "qry_image_path")


def test_collator_image_cache_gives_the_same_batch(
    train_root: Path, image_root: Path, embedder: Embedder
) -> None:
    pairs = PairDataset.from_config(train_root, split="original", image_root=image_root).pairs["WithNegs"]
    cached, uncached = (
        PairCollator(embedder, image_root),
        PairCollator(embedder, image_root, image_cache_bytes=0),
    )
    first, plain = cached(pairs), uncached(pairs)
    assert len(cached.images) > 0 and uncached.images is None
    for name in ("query", "target", "negative"):
        for key, value in getattr(plain, name).items():
            assert torch.equal(getattr(first, name)[key], value), (name, key)
