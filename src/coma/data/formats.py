"""Readers for the on-disk formats coma accepts (DESIGN §2.5): MMEB-train, MMEB-eval, LLaVA-style conversations.

Every reader validates each row and raises :class:`DataFormatError` naming the file, the row and the field, so a
bad row in a 600k-row dump is found from the message alone. Image paths stay relative strings here (``""`` means
"no image"); resolving them safely against an image root is the image loader's job.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow.parquet as pq


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
PARQUET_BATCH_ROWS = 1024
IMAGE_TOKEN = "<image>"

# LLaVA data says human/gpt; chat-style dumps say user/assistant. Both map onto the same two roles.
_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}

TRAIN_REQUIRED = ("qry", "qry_image_path", "pos_text", "pos_image_path")
EVAL_REQUIRED = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
# MMEB_Test_Instruct: the image columns are absent where a side has no images (cls / qa / i2t have no
# tgt_img_path, t2i no qry_img_path), and tgt_inst only where targets have one (t2i, i2i / VG).
INSTRUCT_REQUIRED = ("qry_inst", "qry_text", "tgt_text")
# The hub's MMEB-train subsets hold original-*, diverse_instruction-* and a legacy train-* shard (hub-layouts §1).
DEFAULT_SPLIT = "original"


class DataFormatError(ValueError):
    """A data file does not match its format; ``row`` is 1-based (JSONL line, JSON list item, parquet row)."""

    def __init__(self, path: str | os.PathLike, row: int | None, field: str | None, problem: str) -> None:
        self.path = Path(path)
        self.row = row
        self.field = field
        self.problem = problem
        location = f"{self.path}:{row}" if row is not None else str(self.path)
        subject = f" field '{field}':" if field is not None else ""
        super().__init__(f"{location}:{subject} {problem}")


@dataclass(frozen=True)
class TrainPair:
    """One MMEB-train row; image paths are relative (``""`` = no image), negatives are ``""`` when absent."""

    subset: str
    row: int
    qry: str
    qry_image_path: str
    pos_text: str
    pos_image_path: str
    neg_text: str
    neg_image_path: str
    source: str


@dataclass(frozen=True)
class EvalQuery:
    """One MMEB-eval row: a query and its own candidate list; candidate 0 is the positive."""

    row: int
    qry_text: str
    qry_img_path: str
    tgt_text: tuple[str, ...]
    tgt_img_path: tuple[str, ...]
    source: str
    # MMEB_Test_Instruct rows keep the instructions apart (None on MMEB-eval v1 rows; hub-layouts §3).
    qry_inst: str | None = None
    tgt_inst: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Conversation:
    """A stage-1 chat: ``turns`` are (question, answer) pairs; ``<image>`` is already removed from the first."""

    id: str
    image: str
    turns: tuple[tuple[str, str], ...]
    source: str
    row: int


# ---------------------------------------------------------------------------------------------------------------
# Files and records


def _split_of(name: str) -> str:
    """Hub shard names look like ``{split}-00000-of-00001.parquet``; a plain ``{split}.jsonl`` also counts."""
    stem = name.rsplit(".", 1)[0]
    return stem.split("-", 1)[0]


def splits_present(files: Sequence[Path]) -> list[str]:
    """The split names of some data files, sorted."""
    return sorted({_split_of(p.name) for p in files})


def default_split(path: str | os.PathLike, files: Sequence[Path]) -> str | None:
    """The split to read when none is given: ``original`` when present, the only split when there is one.

    A folder with several splits and no ``original`` is an error (they are alternative views of one dataset, never
    to be mixed); None means "read every file" (a single file, or a folder with one split).
    """
    present = splits_present(files)
    if len(present) <= 1:
        return None
    if DEFAULT_SPLIT in present:
        return DEFAULT_SPLIT
    raise DataFormatError(
        path,
        None,
        None,
        f"holds several splits ({', '.join(present)}) and no '{DEFAULT_SPLIT}'; choose one with --split",
    )


def data_files(path: str | os.PathLike, split: str | None = None) -> list[Path]:
    """The data files at ``path``: the file itself, or a folder's ``*.jsonl|*.json|*.parquet`` sorted by name.

    ``split`` keeps only files whose name is ``{split}.<ext>`` or starts with ``{split}-`` (hub shard naming).
    Hidden files (macOS ``._*`` among them) are never data.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        candidates = sorted(
            (
                p
                for p in path.iterdir()
                if p.is_file() and p.suffix in DATA_SUFFIXES and not p.name.startswith(".")
            ),
            key=lambda p: p.name,
        )
        if not candidates:
            raise DataFormatError(
                path, None, None, f"no data files ({', '.join('*' + s for s in DATA_SUFFIXES)})"
            )
    elif path.suffix in DATA_SUFFIXES:
        candidates = [path]
    else:
        raise DataFormatError(
            path, None, None, f"unsupported file type (expected {', '.join(DATA_SUFFIXES)})"
        )
    if split is None:
        return candidates
    files = [p for p in candidates if _split_of(p.name) == split]
    if not files:
        raise DataFormatError(
            path,
            None,
            None,
            f"no data files for split '{split}' (splits present: {', '.join(splits_present(candidates))})",
        )
    return files


@dataclass(frozen=True)
class InvalidJSON:
    """A JSONL line that does not parse; its row is reported like any other bad row and the next line still reads."""

    message: str


def _iter_jsonl_lines(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as error:
                yield line_number, InvalidJSON(f"not valid JSON ({error.msg})")


def _iter_raw(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(row, value)`` from one file; values that are not objects (or not JSON) are yielded as they are."""
    if path.suffix == ".jsonl":
        yield from _iter_jsonl_lines(path)
    elif path.suffix == ".json":
        with open(path, encoding="utf-8") as handle:
            try:
                items = json.load(handle)
            except json.JSONDecodeError as error:
                raise DataFormatError(
                    path, None, None, f"not valid JSON (line {error.lineno}: {error.msg})"
                ) from None
        if not isinstance(items, list):
            raise DataFormatError(
                path, None, None, f"expected a JSON list of objects, got {_type_name(items)}"
            )
        yield from enumerate(items, start=1)
    else:  # parquet: data_files admits no other suffix
        row = 0
        # Record batches keep memory flat on large shards and let a ``limit`` stop early.
        for batch in _open_parquet(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for record in batch.to_pylist():
                row += 1
                yield row, record


def _open_parquet(path: Path) -> pq.ParquetFile:
    # Imported here: pyarrow costs ~0.4 s, and the registry and CLI import this module without reading parquet.
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        # pyarrow's own message does not say which file it was reading.
        raise DataFormatError(path, None, None, f"not a readable parquet file ({error})") from None


def _check_parquet_columns(path: Path, required: Sequence[str]) -> None:
    columns = _open_parquet(path).schema_arrow.names
    for column in required:
        if column not in columns:
            raise DataFormatError(
                path, None, column, f"missing required column (columns: {', '.join(columns)})"
            )


def _require(path: Path, row: int, record: Any, required: Sequence[str]) -> dict:
    """The record as a dict holding every ``required`` field, or a ``DataFormatError`` naming the row."""
    if isinstance(record, InvalidJSON):
        raise DataFormatError(path, row, None, record.message)
    if not isinstance(record, dict):
        raise DataFormatError(path, row, None, f"expected an object, got {_type_name(record)}")
    for column in required:
        if column not in record:
            raise DataFormatError(path, row, column, "missing required field")
    return record


class ProblemLog:
    """Bad rows collected instead of raised at the first one, so one pass names them all (``--skip-bad``, ``check``).

    ``errors`` keeps the first ``keep`` in full; ``count`` and ``by_dataset`` count every one.
    """

    def __init__(self, keep: int = 20) -> None:
        self.keep = keep
        self.errors: list[DataFormatError] = []
        self.count = 0
        self.by_dataset: Counter[str] = Counter()
        self.missing_images: Counter[str] = Counter()

    def add(self, error: DataFormatError, dataset: str) -> None:
        self.count += 1
        self.by_dataset[dataset] += 1
        if error.problem.startswith("image not found"):
            self.missing_images[dataset] += 1
        if len(self.errors) < self.keep:
            self.errors.append(error)

    def merge(self, other: ProblemLog) -> None:
        """Take in another log's problems (kept errors up to this log's ``keep``)."""
        self.count += other.count
        self.by_dataset.update(other.by_dataset)
        self.missing_images.update(other.missing_images)
        self.errors += other.errors[: max(0, self.keep - len(self.errors))]

    def __bool__(self) -> bool:
        return self.count > 0

    def skip_note(self, noun: str = "row(s)") -> str:
        """``skipped N bad row(s) (--skip-bad): A 1, B 2``: what ``--skip-bad`` left out, by dataset."""
        counts = ", ".join(f"{name} {count:,}" for name, count in sorted(self.by_dataset.items()))
        return f"skipped {self.count:,} bad {noun} (--skip-bad): {counts}"

    def summary(self, what: str) -> str:
        """``N bad row(s) in WHAT (the first K):`` and one line per kept error."""
        shown = f" (the first {len(self.errors)})" if self.count > len(self.errors) else ""
        ordered = sorted(self.errors, key=lambda error: (str(error.path), error.row or 0))
        lines = [f"{self.count:,} bad row(s) in {what}{shown}:", *(f"  {error}" for error in ordered)]
        return "\n".join(lines)


class DataCheckError(DataFormatError):
    """Rows that failed the pre-flight check: the message names the first ones by file, row and field; ``path``,
    ``row`` and ``field`` are the first one's."""

    def __init__(self, problems: ProblemLog, what: str) -> None:
        first = problems.errors[0]
        self.problems = problems
        self.path, self.row, self.field, self.problem = first.path, first.row, first.field, first.problem
        ValueError.__init__(
            self,
            problems.summary(what)
            + "\n(`coma check` prints the full table; --skip-bad skips and counts such rows)",
        )


def _log_or_raise(problems: ProblemLog | None, error: DataFormatError, dataset: str) -> None:
    """Readers collect bad rows when given a log and stop at the first one otherwise."""
    if problems is None:
        raise error
    problems.add(error, dataset)


def _records_or_problems(
    path: Path, required: Sequence[str], problems: ProblemLog | None, dataset: str
) -> Iterator[tuple[int, dict]]:
    """Rows of one file; with ``problems`` a bad row (or a file missing a column) is logged and skipped."""
    try:
        if path.suffix == ".parquet" and required:
            _check_parquet_columns(path, required)
    except DataFormatError as error:
        _log_or_raise(problems, error, dataset)
        return
    for row, raw in _iter_raw(path):
        try:
            yield row, _require(path, row, raw, required)
        except DataFormatError as error:
            _log_or_raise(problems, error, dataset)


def read_records(
    path: str | os.PathLike, *, split: str | None = None, required: Sequence[str] = ()
) -> Iterator[tuple[int, dict]]:
    """Yield ``(row, record)`` from a data file or every data file of a folder (rows restart at 1 per file).

    ``required`` names fields every record must have; a parquet file missing one fails before its first row.
    Use :func:`data_files` and one call per file when the caller needs to know which file a row came from.
    """
    for file in data_files(path, split):
        yield from _records_or_problems(file, required, None, "")


def list_data_subsets(root: str | os.PathLike) -> list[str]:
    """Names of the sub-folders of ``root`` that hold at least one data file, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    return sorted(
        child.name
        for child in root.iterdir()
        if child.is_dir()
        and any(
            p.is_file() and p.suffix in DATA_SUFFIXES and not p.name.startswith(".") for p in child.iterdir()
        )
    )


# ---------------------------------------------------------------------------------------------------------------
# Field validation


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _text(path: Path, row: int, record: dict, field: str) -> str:
    value = record.get(field)
    if not isinstance(value, str):
        raise DataFormatError(path, row, field, f"expected a string, got {_type_name(value)}")
    return value


def _optional_text(path: Path, row: int, record: dict, field: str) -> str:
    """A string where missing or null means empty (image paths, negatives)."""
    value = record.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataFormatError(path, row, field, f"expected a string or null, got {_type_name(value)}")
    return value


def _text_list(path: Path, row: int, record: dict, field: str, *, null_items: bool) -> tuple[str, ...]:
    value = record.get(field)
    if not isinstance(value, (list, tuple)):
        raise DataFormatError(path, row, field, f"expected a list of strings, got {_type_name(value)}")
    items = []
    for index, item in enumerate(value):
        if item is None and null_items:
            item = ""
        if not isinstance(item, str):
            raise DataFormatError(
                path, row, f"{field}[{index}]", f"expected a string, got {_type_name(item)}"
            )
        items.append(item)
    return tuple(items)


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")


# ---------------------------------------------------------------------------------------------------------------
# Image placeholders in text-only inputs


@functools.cache
def _orphan_pattern(placeholder: str) -> re.Pattern[str]:
    # The placeholder, the spaces after it and one newline: "<|image_1|>\nFind ..." and "Find <|image_1|> a ...".
    return re.compile(re.escape(placeholder) + r"[ \t]*\n?")


def drop_orphan_placeholder(text: str, has_image: bool, placeholder: str) -> tuple[str, bool]:
    """``(text, removed)``: a text-only input's image placeholder (and the newline after it) removed.

    Real rows carry the placeholder without an image (WebQA train queries, EDIS and WebQA eval queries; hub-layouts
    §1-§2); an input with an image is returned unchanged.
    """
    if has_image or placeholder not in text:
        return text, False
    return _orphan_pattern(placeholder).sub("", text), True


class PlaceholderFixes:
    """Counts of text-only inputs whose placeholder was removed, per (dataset, side), reported once."""

    def __init__(self, placeholder: str) -> None:
        self.placeholder = placeholder
        self.counts: Counter[tuple[str, str]] = Counter()

    def fix(self, text: str, has_image: bool, dataset: str, side: str) -> str:
        text, removed = drop_orphan_placeholder(text, has_image, self.placeholder)
        if removed:
            self.counts[dataset, side] += 1
        return text

    def total(self, dataset: str | None = None) -> int:
        return sum(n for (name, _), n in self.counts.items() if dataset is None or name == dataset)

    def lines(self) -> list[str]:
        """One line per dataset and side (:func:`placeholder_fix_line`)."""
        return [placeholder_fix_line(dataset, side, count, self.placeholder)
                for (dataset, side), count in sorted(self.counts.items())]  # fmt: skip


def placeholder_fix_line(dataset: str, side: str, count: int, placeholder: str) -> str:
    """``WebQA: 17,160 text-only queries carried <|image_1|>; removed``."""
    return f"{dataset}: {count:,} text-only {side} carried {placeholder}; removed"


# ---------------------------------------------------------------------------------------------------------------
# MMEB-train


def _train_pair(subset: str, path: Path, row: int, record: dict) -> TrainPair:
    return TrainPair(
        subset=subset,
        row=row,
        qry=_text(path, row, record, "qry"),
        qry_image_path=_optional_text(path, row, record, "qry_image_path"),
        pos_text=_text(path, row, record, "pos_text"),
        pos_image_path=_optional_text(path, row, record, "pos_image_path"),
        neg_text=_optional_text(path, row, record, "neg_text"),
        neg_image_path=_optional_text(path, row, record, "neg_image_path"),
        source=str(path),
    )


def read_mmeb_train_subset(
    folder: str | os.PathLike,
    *,
    subset: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    problems: ProblemLog | None = None,
) -> list[TrainPair]:
    """Read one MMEB-train subset folder (or one file); ``subset`` defaults to the folder's name.

    On the hub each subset holds ``original-*``, ``diverse_instruction-*`` and a legacy ``train-*`` shard: ``split``
    picks one; None reads ``original`` when the folder holds several splits (:func:`default_split`). ``limit``
    keeps the first rows (the paper's ``num_sample_per_subset``); with ``problems`` bad rows are logged and skipped.
    """
    _check_limit(limit)
    folder = Path(folder)
    if subset is None:
        subset = folder.name if folder.is_dir() else folder.parent.name
    pairs: list[TrainPair] = []
    if limit == 0:
        return pairs
    if split is None:
        split = default_split(folder, data_files(folder))
    seen = 0
    for file in data_files(folder, split):
        for row, record in _records_or_problems(file, TRAIN_REQUIRED, problems, subset):
            seen += 1
            try:
                pairs.append(_train_pair(subset, file, row, record))
            except DataFormatError as error:
                _log_or_raise(problems, error, subset)
            if limit is not None and seen >= limit:
                return pairs
    return pairs


# ---------------------------------------------------------------------------------------------------------------
# MMEB-eval


def _eval_query(path: Path, row: int, record: dict) -> EvalQuery:
    instruct = "qry_inst" in record
    _require(path, row, record, INSTRUCT_REQUIRED if instruct else EVAL_REQUIRED)
    tgt_text = _text_list(path, row, record, "tgt_text", null_items=False)
    if not tgt_text:
        raise DataFormatError(
            path, row, "tgt_text", "empty candidate list (candidate 0 must be the positive)"
        )
    if instruct and record.get("tgt_img_path") is None:
        tgt_img_path = ("",) * len(tgt_text)
    else:
        tgt_img_path = _text_list(path, row, record, "tgt_img_path", null_items=True)
    if len(tgt_text) != len(tgt_img_path):
        raise DataFormatError(
            path, row, "tgt_img_path", f"has {len(tgt_img_path)} entries but tgt_text has {len(tgt_text)}"
        )
    qry_inst = tgt_inst = None
    if instruct:
        qry_inst = _text(path, row, record, "qry_inst")
        raw = record.get("tgt_inst")
        if isinstance(raw, (list, tuple)):
            tgt_inst = _text_list(path, row, record, "tgt_inst", null_items=True)
            if len(tgt_inst) != len(tgt_text):
                raise DataFormatError(
                    path, row, "tgt_inst", f"has {len(tgt_inst)} entries but tgt_text has {len(tgt_text)}"
                )
        else:
            tgt_inst = (_optional_text(path, row, record, "tgt_inst"),) * len(tgt_text)
    return EvalQuery(
        row=row,
        qry_text=_optional_text(path, row, record, "qry_text")
        if instruct
        else _text(path, row, record, "qry_text"),
        qry_img_path=_optional_text(path, row, record, "qry_img_path"),
        tgt_text=tgt_text,
        tgt_img_path=tgt_img_path,
        source=str(path),
        qry_inst=qry_inst,
        tgt_inst=tgt_inst,
    )


def _eval_columns(path: Path) -> Sequence[str]:
    """The columns a parquet eval shard must have, by its layout (MMEB_Test_Instruct has ``qry_inst``); JSON rows
    are checked one by one."""
    if path.suffix != ".parquet":
        return ()
    names = _open_parquet(path).schema_arrow.names
    return INSTRUCT_REQUIRED if "qry_inst" in names else EVAL_REQUIRED


def read_mmeb_eval_dataset(
    folder: str | os.PathLike,
    *,
    split: str | None = None,
    limit: int | None = None,
    problems: ProblemLog | None = None,
) -> list[EvalQuery]:
    """Read one MMEB-eval dataset folder (or one file); the hub's folders hold ``test-*.parquet``.

    With ``problems`` a bad row is logged (under the folder's name) and skipped instead of raising.
    """
    _check_limit(limit)
    queries: list[EvalQuery] = []
    if limit == 0:
        return queries
    if split is None:
        split = default_split(folder, data_files(folder))
    dataset = Path(folder).name if Path(folder).is_dir() else Path(folder).parent.name
    seen = 0
    for file in data_files(folder, split):
        for row, record in _records_or_problems(file, _eval_columns(file), problems, dataset):
            seen += 1
            try:
                queries.append(_eval_query(file, row, record))
            except DataFormatError as error:
                _log_or_raise(problems, error, dataset)
            if limit is not None and seen >= limit:
                return queries
    return queries


# ---------------------------------------------------------------------------------------------------------------
# Stage-1 conversations


def _remove_image_token(text: str) -> str:
    """Drop ``<image>`` with the newline that separates it from the question (either side)."""
    for pattern in (IMAGE_TOKEN + "\n", "\n" + IMAGE_TOKEN, IMAGE_TOKEN):
        if pattern in text:
            return text.replace(pattern, "", 1).strip()
    return text


def _conversation(path: Path, row: int, record: Any) -> Conversation:
    record = _require(path, row, record, ())
    ident = record.get("id")
    if isinstance(ident, bool) or not isinstance(ident, (str, int)):
        raise DataFormatError(path, row, "id", f"expected a string or integer, got {_type_name(ident)}")
    image = _optional_text(path, row, record, "image")
    raw_turns = record.get("conversations")
    if not isinstance(raw_turns, list):
        raise DataFormatError(
            path, row, "conversations", f"expected a list of turns, got {_type_name(raw_turns)}"
        )
    if len(raw_turns) < 2 or len(raw_turns) % 2:
        raise DataFormatError(
            path, row, "conversations", f"expected an even number (>= 2) of turns, got {len(raw_turns)}"
        )
    values: list[str] = []
    for index, turn in enumerate(raw_turns):
        field = f"conversations[{index}]"
        if not isinstance(turn, dict):
            raise DataFormatError(path, row, field, f"expected an object, got {_type_name(turn)}")
        role = turn.get("from")
        expected = "human" if index % 2 == 0 else "gpt"
        if not isinstance(role, str) or _ROLES.get(role) != expected:
            raise DataFormatError(
                path,
                row,
                f"{field}.from",
                f"expected '{expected}' (turns alternate human, gpt), got {role!r}",
            )
        value = turn.get("value")
        if not isinstance(value, str):
            raise DataFormatError(path, row, f"{field}.value", f"expected a string, got {_type_name(value)}")
        if expected == "gpt" and not value.strip():
            # An empty answer leaves nothing to supervise and would give an all-ignored label row.
            raise DataFormatError(path, row, f"{field}.value", "empty answer")
        values.append(value)
    for index, value in enumerate(values):
        count = value.count(IMAGE_TOKEN)
        wanted = 1 if image and index == 0 else 0
        if count != wanted:
            if image and index == 0:
                problem = f"expected exactly one '{IMAGE_TOKEN}' in the first human turn, found {count}"
            elif image:
                problem = f"'{IMAGE_TOKEN}' may only appear in the first human turn"
            else:
                problem = f"'{IMAGE_TOKEN}' in a conversation without an image"
            raise DataFormatError(path, row, f"conversations[{index}].value", problem)
    if image:
        values[0] = _remove_image_token(values[0])
    turns = tuple((values[i], values[i + 1]) for i in range(0, len(values), 2))
    return Conversation(id=str(ident), image=image, turns=turns, source=str(path), row=row)


def read_conversations(path: str | os.PathLike, *, problems: ProblemLog | None = None) -> list[Conversation]:
    """Read LLaVA-style conversations from a JSON list or JSONL file (or a folder of them).

    With ``problems`` a row that breaks the format is logged (under the file's name) and skipped instead of raising;
    a JSON list that does not parse still raises, since no row boundary can be trusted.
    """
    conversations: list[Conversation] = []
    for file in data_files(path):
        for row, record in _iter_raw(file):
            try:
                conversations.append(_conversation(file, row, record))
            except DataFormatError as error:
                _log_or_raise(problems, error, file.name)
    return conversations
