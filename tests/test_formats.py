"""Readers for the MMEB-train, MMEB-eval and LLaVA-conversation formats, on files written in the hub schemas."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from coma.data import formats
from coma.data.formats import (
    Conversation,
    DataFormatError,
    EvalQuery,
    ProblemLog,
    TrainPair,
    data_files,
    list_data_subsets,
    read_conversations,
    read_mmeb_eval_dataset,
    read_mmeb_train_subset,
    read_records,
)
from coma.io import write_json, write_jsonl


def _write_parquet(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def _train_row(i: int, **overrides) -> dict:
    row = {
        "qry": f"<|image_1|>\nRepresent the given image for classification {i}",
        "qry_image_path": f"images/ImageNet_1K/{i}.jpg",
        "pos_text": f"label {i}",
        "pos_image_path": "",
        "neg_text": "",
        "neg_image_path": "",
    }
    row.update(overrides)
    return row


TRAIN_SCHEMA = pa.schema([(name, pa.string()) for name in _train_row(0)])
EVAL_SCHEMA = pa.schema(
    [
        ("qry_text", pa.string()),
        ("qry_img_path", pa.string()),
        ("tgt_text", pa.list_(pa.string())),
        ("tgt_img_path", pa.list_(pa.string())),
    ]
)


# ---------------------------------------------------------------------------------------------------------------
# Files and records


def test_error_message_names_file_row_and_field(tmp_path: Path) -> None:
    error = DataFormatError(tmp_path / "a.jsonl", 3, "pos_text", "expected a string, got int")
    assert str(error) == f"{tmp_path / 'a.jsonl'}:3: field 'pos_text': expected a string, got int"
    assert (error.path, error.row, error.field) == (tmp_path / "a.jsonl", 3, "pos_text")
    assert isinstance(error, ValueError)
    assert str(DataFormatError("f.json", None, None, "broken")) == "f.json: broken"


def test_data_files_sorts_filters_and_skips_hidden(tmp_path: Path) -> None:
    for name in ("b.jsonl", "a.parquet", "c.json", "README.md", ".a.jsonl.tmp", ".hidden.jsonl"):
        (tmp_path / name).write_text("[]")
    assert [p.name for p in data_files(tmp_path)] == ["a.parquet", "b.jsonl", "c.json"]
    assert data_files(tmp_path / "b.jsonl") == [tmp_path / "b.jsonl"]
    with pytest.raises(DataFormatError, match="unsupported file type"):
        data_files(tmp_path / "README.md")
    with pytest.raises(FileNotFoundError):
        data_files(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataFormatError, match="no data files"):
        data_files(empty)


def test_split_filter_uses_hub_shard_names(tmp_path: Path) -> None:
    for name in (
        "original-00000-of-00002.parquet",
        "original-00001-of-00002.parquet",
        "diverse_instruction-00000-of-00001.parquet",
        "original_v2.jsonl",
    ):
        (tmp_path / name).write_text("")
    assert [p.name for p in data_files(tmp_path, "original")] == [
        "original-00000-of-00002.parquet",
        "original-00001-of-00002.parquet",
    ]
    assert [p.name for p in data_files(tmp_path, "diverse_instruction")] == [
        "diverse_instruction-00000-of-00001.parquet"
    ]
    with pytest.raises(DataFormatError) as info:
        data_files(tmp_path, "test")
    message = str(info.value)
    assert str(tmp_path) in message and "'test'" in message and "original" in message


def test_read_records_across_formats_in_name_order(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"k": 1}, {"k": 2}])
    write_json(tmp_path / "b.json", [{"k": 3}])
    _write_parquet(tmp_path / "c.parquet", [{"k": 4}, {"k": 5}])
    assert [(row, rec["k"]) for row, rec in read_records(tmp_path)] == [
        (1, 1),
        (2, 2),
        (1, 3),
        (1, 4),
        (2, 5),
    ]


def test_unreadable_parquet_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "a.parquet").write_text("not parquet")
    with pytest.raises(DataFormatError, match="not a readable parquet file") as info:
        list(read_records(tmp_path))
    assert info.value.path == tmp_path / "a.parquet"
    with pytest.raises(DataFormatError, match="not a readable parquet file"):
        read_mmeb_eval_dataset(tmp_path)


def test_read_records_jsonl_rows_are_line_numbers(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"k": 1}\n\n{"k": 2}\n')
    assert [row for row, _ in read_records(tmp_path / "a.jsonl")] == [1, 3]


def test_read_records_parquet_batches_keep_row_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(formats, "PARQUET_BATCH_ROWS", 3)
    _write_parquet(tmp_path / "a.parquet", [{"k": i} for i in range(8)])
    assert [(row, rec["k"]) for row, rec in read_records(tmp_path / "a.parquet")] == [
        (i + 1, i) for i in range(8)
    ]


def test_read_records_json_errors(tmp_path: Path) -> None:
    write_json(tmp_path / "obj.json", {"rows": []})
    with pytest.raises(DataFormatError, match="expected a JSON list of objects, got dict"):
        list(read_records(tmp_path / "obj.json"))
    write_json(tmp_path / "items.json", [{"k": 1}, [1, 2]])
    with pytest.raises(DataFormatError) as info:
        list(read_records(tmp_path / "items.json"))
    assert info.value.row == 2 and "expected an object, got list" in str(info.value)
    (tmp_path / "bad.json").write_text('[{"k": 1},\n {"k": ]')
    with pytest.raises(DataFormatError, match="not valid JSON"):
        list(read_records(tmp_path / "bad.json"))


def test_read_records_required_fields(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"x": 1, "y": 2}, {"x": 1}])
    with pytest.raises(DataFormatError) as info:
        list(read_records(tmp_path / "a.jsonl", required=("x", "y")))
    assert (info.value.row, info.value.field) == (2, "y")


def test_list_data_subsets(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "VOC2007" / "original.jsonl", [_train_row(0)])
    _write_parquet(tmp_path / "CIRR" / "original-00000-of-00001.parquet", [_train_row(0)])
    (tmp_path / "images").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.md").write_text("x")
    (tmp_path / "top.jsonl").write_text("")
    assert list_data_subsets(tmp_path) == ["CIRR", "VOC2007"]


# ---------------------------------------------------------------------------------------------------------------
# MMEB-train


def test_train_parquet_hub_layout(tmp_path: Path) -> None:
    folder = tmp_path / "ImageNet_1K"
    _write_parquet(
        folder / "original-00000-of-00001.parquet", [_train_row(i) for i in range(3)], TRAIN_SCHEMA
    )
    diverse = [_train_row(i, qry=f"Classify this <|image_1|> {i}") for i in range(2)]
    _write_parquet(folder / "diverse_instruction-00000-of-00001.parquet", diverse, TRAIN_SCHEMA)

    pairs = read_mmeb_train_subset(folder, split="original")
    assert [p.row for p in pairs] == [1, 2, 3]
    assert pairs[1] == TrainPair(
        subset="ImageNet_1K",
        row=2,
        qry="<|image_1|>\nRepresent the given image for classification 1",
        qry_image_path="images/ImageNet_1K/1.jpg",
        pos_text="label 1",
        pos_image_path="",
        neg_text="",
        neg_image_path="",
        source=str(folder / "original-00000-of-00001.parquet"),
    )
    # No split given: `original` only, never mixed with the other splits (hub-layouts §1).
    default = read_mmeb_train_subset(folder, subset="imagenet")
    assert [p.qry for p in default] == [p.qry for p in pairs] and {p.subset for p in default} == {"imagenet"}
    assert [p.qry for p in read_mmeb_train_subset(folder, limit=2)] == [p.qry for p in pairs[:2]]
    assert read_mmeb_train_subset(folder, split="diverse_instruction")[0].qry.startswith("Classify")
    _write_parquet(folder / "train-00000-of-00001.parquet", [_train_row(9)], TRAIN_SCHEMA)
    assert (
        len(read_mmeb_train_subset(folder)) == 3 and len(read_mmeb_train_subset(folder, split="train")) == 1
    )
    (folder / "original-00000-of-00001.parquet").unlink()
    with pytest.raises(
        DataFormatError, match="several splits \\(diverse_instruction, train\\) and no 'original'"
    ):
        read_mmeb_train_subset(folder)
    assert read_mmeb_train_subset(folder, limit=0) == []
    with pytest.raises(ValueError, match="limit"):
        read_mmeb_train_subset(folder, limit=-1)
    with pytest.raises(DataFormatError, match="split 'test'"):
        read_mmeb_train_subset(folder, split="test")


def test_train_nulls_and_optional_negatives(tmp_path: Path) -> None:
    rows = [
        {
            "qry": "Find an image: a dog",
            "qry_image_path": None,
            "pos_text": "<|image_1|>",
            "pos_image_path": "d.jpg",
        },
        _train_row(1, neg_text="hard negative", neg_image_path=None),
    ]
    write_jsonl(tmp_path / "MSCOCO_t2i" / "train.jsonl", rows)
    first, second = read_mmeb_train_subset(tmp_path / "MSCOCO_t2i")
    assert (first.qry_image_path, first.pos_image_path, first.neg_text, first.neg_image_path) == (
        "",
        "d.jpg",
        "",
        "",
    )
    assert (second.neg_text, second.neg_image_path) == ("hard negative", "")
    assert first.subset == "MSCOCO_t2i"
    assert read_mmeb_train_subset(tmp_path / "MSCOCO_t2i" / "train.jsonl")[0].subset == "MSCOCO_t2i"


def test_train_missing_column_names_file_and_column(tmp_path: Path) -> None:
    rows = [{k: v for k, v in _train_row(i).items() if k != "pos_image_path"} for i in range(2)]
    path = _write_parquet(tmp_path / "CIRR" / "original-00000-of-00001.parquet", rows)
    with pytest.raises(DataFormatError) as info:
        read_mmeb_train_subset(tmp_path / "CIRR")
    assert info.value.path == path and info.value.field == "pos_image_path" and info.value.row is None
    assert str(path) in str(info.value) and "missing required column" in str(info.value)


def test_train_wrong_type_names_row_and_field(tmp_path: Path) -> None:
    path = tmp_path / "N24News" / "train.jsonl"
    write_jsonl(path, [_train_row(0), _train_row(1, pos_text=7)])
    with pytest.raises(DataFormatError) as info:
        read_mmeb_train_subset(path.parent)
    assert str(info.value) == f"{path}:2: field 'pos_text': expected a string, got int"

    parquet = _write_parquet(tmp_path / "x" / "a.parquet", [_train_row(0, qry=None)], TRAIN_SCHEMA)
    with pytest.raises(DataFormatError) as info:
        read_mmeb_train_subset(parquet)
    assert str(info.value) == f"{parquet}:1: field 'qry': expected a string, got null"

    write_json(tmp_path / "y" / "a.json", [_train_row(0), _train_row(1), _train_row(2, neg_text=["a", "b"])])
    with pytest.raises(DataFormatError) as info:
        read_mmeb_train_subset(tmp_path / "y")
    assert (info.value.row, info.value.field) == (3, "neg_text")


# ---------------------------------------------------------------------------------------------------------------
# MMEB-eval


def _eval_row(n: int, **overrides) -> dict:
    row = {
        "qry_text": "<|image_1|>\nRepresent the given image with the following question: what color?",
        "qry_img_path": "OK-VQA/q.jpg",
        "tgt_text": [f"answer {i}" for i in range(n)],
        "tgt_img_path": [""] * n,
    }
    row.update(overrides)
    return row


def test_eval_parquet_varying_candidate_counts(tmp_path: Path) -> None:
    folder = tmp_path / "OK-VQA"
    rows = [_eval_row(3), _eval_row(1, qry_img_path=None), _eval_row(2, tgt_img_path=["a.jpg", None])]
    path = _write_parquet(folder / "test-00000-of-00001.parquet", rows, EVAL_SCHEMA)
    queries = read_mmeb_eval_dataset(folder, split="test")
    assert queries[0] == EvalQuery(
        row=1,
        qry_text=rows[0]["qry_text"],
        qry_img_path="OK-VQA/q.jpg",
        tgt_text=("answer 0", "answer 1", "answer 2"),
        tgt_img_path=("", "", ""),
        source=str(path),
    )
    assert [len(q.tgt_text) for q in queries] == [3, 1, 2]
    assert queries[1].qry_img_path == ""
    assert queries[2].tgt_img_path == ("a.jpg", "")
    assert len(read_mmeb_eval_dataset(folder, limit=2)) == 2


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        (_eval_row(2, tgt_img_path=[""]), "tgt_img_path", "has 1 entries but tgt_text has 2"),
        (_eval_row(0), "tgt_text", "empty candidate list (candidate 0 must be the positive)"),
        (_eval_row(2, tgt_text="answer"), "tgt_text", "expected a list of strings, got str"),
        (_eval_row(2, tgt_text=["a", 3]), "tgt_text[1]", "expected a string, got int"),
        (_eval_row(2, qry_text=5), "qry_text", "expected a string, got int"),
    ],
)
def test_eval_bad_rows(tmp_path: Path, row: dict, field: str, problem: str) -> None:
    path = tmp_path / "GQA" / "test.jsonl"
    write_jsonl(path, [_eval_row(2), row])
    with pytest.raises(DataFormatError) as info:
        read_mmeb_eval_dataset(path.parent)
    assert str(info.value) == f"{path}:2: field '{field}': {problem}"


def test_eval_missing_column(tmp_path: Path) -> None:
    rows = [{k: v for k, v in _eval_row(2).items() if k != "tgt_img_path"}]
    path = _write_parquet(tmp_path / "GQA" / "test-00000-of-00001.parquet", rows)
    with pytest.raises(DataFormatError, match="field 'tgt_img_path': missing required column") as info:
        read_mmeb_eval_dataset(path.parent)
    assert info.value.path == path


# ---------------------------------------------------------------------------------------------------------------
# Conversations


def _chat(ident: object = "000001", image: str | None = "coco/1.jpg", turns: list | None = None) -> dict:
    record: dict = {"id": ident}
    if image is not None:
        record["image"] = image
    record["conversations"] = turns or [
        {"from": "human", "value": "<image>\nWhat is on the table?"},
        {"from": "gpt", "value": "A red cup."},
        {"from": "human", "value": "What colour is the wall?"},
        {"from": "gpt", "value": "White."},
    ]
    return record


def test_conversations_json_list(tmp_path: Path) -> None:
    path = tmp_path / "chat.json"
    write_json(
        path,
        [
            _chat(),
            _chat(
                ident=42,
                image=None,
                turns=[{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello"}],
            ),
        ],
    )
    conversations = read_conversations(path)
    assert conversations[0] == Conversation(
        id="000001",
        image="coco/1.jpg",
        turns=(("What is on the table?", "A red cup."), ("What colour is the wall?", "White.")),
        source=str(path),
        row=1,
    )
    assert (conversations[1].id, conversations[1].image, conversations[1].turns) == (
        "42",
        "",
        (("Hi", "Hello"),),
    )


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("<image>\nWhat is this?", "What is this?"),
        ("What is this?\n<image>", "What is this?"),
        ("Look: <image> what is this?", "Look:  what is this?"),
        ("<image>", ""),
    ],
)
def test_image_token_removed_with_its_newline(tmp_path: Path, question: str, expected: str) -> None:
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": "A cat."}]
    write_jsonl(tmp_path / "c.jsonl", [_chat(turns=turns)])
    (conversation,) = read_conversations(tmp_path / "c.jsonl")
    assert conversation.turns == ((expected, "A cat."),)


def _turns(*pairs: tuple[str, object]) -> list[dict]:
    return [{"from": role, "value": value} for role, value in pairs]


BAD_CHATS = [
    (_chat(turns=_turns(("gpt", "<image>\nHi"), ("human", "x"))), "conversations[0].from"),
    (
        _chat(turns=_turns(("human", "<image>\nA"), ("gpt", "B"), ("gpt", "C"), ("human", "D"))),
        "conversations[2].from",
    ),
    (_chat(turns=_turns(("human", "<image>\nA"), ("gpt", "B"), ("human", "C"))), "conversations"),
    (_chat(turns=_turns(("human", "What is it?"), ("gpt", "B"))), "conversations[0].value"),
    (_chat(image="", turns=_turns(("human", "<image>\nA"), ("gpt", "B"))), "conversations[0].value"),
    (_chat(turns=_turns(("human", "<image>\nA"), ("gpt", "B <image>"))), "conversations[1].value"),
    (_chat(turns=_turns(("human", "<image>\nA"), ("gpt", 3))), "conversations[1].value"),
    (_chat(turns=_turns(("human", "<image>\nA"), ("gpt", "  "))), "conversations[1].value"),
    (_chat(turns=_turns(("human", "<image>\nA"), ("bot", "B"))), "conversations[1].from"),
    (_chat(ident=None), "id"),
    (_chat(ident=True), "id"),
    (_chat(image=5), "image"),
    ({"id": "x", "image": "a.jpg", "conversations": "hi"}, "conversations"),
    ({"id": "x", "conversations": [["human", "hi"], ["gpt", "yo"]]}, "conversations[0]"),
]


@pytest.mark.parametrize(("record", "field"), BAD_CHATS)
def test_bad_conversation_names_row_and_field(tmp_path: Path, record: dict, field: str) -> None:
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, [_chat(), record])
    with pytest.raises(DataFormatError) as info:
        read_conversations(path)
    assert (info.value.path, info.value.row, info.value.field) == (path, 2, field)
    assert str(info.value).startswith(f"{path}:2: field '{field}': ")


def test_skip_bad_counts_skipped_rows(tmp_path: Path) -> None:
    path = tmp_path / "chat.json"
    write_json(path, [_chat(ident=1), "not an object", *(record for record, _ in BAD_CHATS), _chat(ident=2)])
    problems = ProblemLog()
    conversations = read_conversations(path, problems=problems)
    assert [c.id for c in conversations] == ["1", "2"]
    assert [c.row for c in conversations] == [1, len(BAD_CHATS) + 3]
    assert problems.count == len(BAD_CHATS) + 1 and problems.errors[0].row == 2
    with pytest.raises(DataFormatError) as info:
        read_conversations(path)
    assert info.value.row == 2
