"""Small, faithful replicas of the real Hugging Face downloads, written for tests (deterministic from a seed).

Every quirk below cites the section of ``/work/shared/reference/hub-layouts.md`` it comes from ("§1" etc.).

* :func:`write_mmeb_train` -- ``TIGER-Lab/MMEB-train`` after ``unzip_file.py`` (§1, §4, §6).
* :func:`write_mmeb_eval` -- ``TIGER-Lab/MMEB-eval`` plus its unzipped ``images.zip`` (§2, §3, §4).
* :func:`write_stage1_conversations` -- CoMa's LLaVA-style stage-1 JSONL (§5).

Negative tests: :func:`corrupt_image` spoils an image in place; :func:`append_rows` adds rows (e.g. one whose
image path does not exist, or an absolute / ``..`` path) to any shard; :func:`train_shard` and
:func:`eval_shard` name the shard files. Deleting an image (``path.unlink()``) makes a "missing image" row.
"""

from __future__ import annotations

import json
import random
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

IMG = "<|image_1|>"
TRAIN_SPLITS = ("original", "diverse_instruction", "train")  # `train` is the legacy Oct-2024 shard (§1)
TRAIN_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path")
EVAL_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
# In `original`, row NULL_ROW of every subset with neg columns has neg_image_path = None (§1: nulls possible).
NULL_ROW = 1
# AppleDouble header (magic 0x00051607) -- macOS zips leave `._<file>` beside images (§1, VLM2Vec issue #108).
APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \x00\x02"
_SIZES = ((64, 48), (48, 64), (80, 80), (96, 40), (40, 72), (56, 56))

# Text pools ("|"-separated); row i takes item i, with a numeric suffix past the end so texts stay distinct.
# fmt: off
_POOLS = {
    # ImageNet labels carry comma-separated synonyms (FuseLIP keeps only the part before the first comma).
    "imagenet": "tench, Tinca tinca|goldfish, Carassius auratus|coucal|Rottweiler|flute, transverse flute|tray"
                "|hot pot, hotpot|plane, carpenter's plane",
    "news_domain": "Travel|Style|Science|Food|Sports|Television|Music|Opinion",
    "yes_no": "Yes|No",
    "voc": "chair|bus|dog|bottle|sofa|train|person|tvmonitor",
    "scene": "firing range indoor|abbey|airport terminal|bamboo forest|beach|kitchen",
    "place": "berth|airfield|alley|arcade|bakery shop|canyon",
    "object": "tray|banana|bench|bucket|drill|helmet",
    "country": "Fiji|France|Japan|Peru|Kenya|Norway|Chile|India",
    "cifar": "apple|aquarium fish|baby|bear|beaver|bed|bee|beetle",
    "question": "What is in the motorcyclist's mouth?|What sport can you use this for?"
                "|What is the ‘actual’ value per 1000, during the year 1975?"
                "|Which social platform has heavy female audience?|What color is the sidewalk?"
                "|what is the brand of this camera?|What is this bird called?"
                "|Can you tell me what this medicine is please?",
    "answer": "cigarette|race|0.28|pinterest|Gray.|dakota|This is a parrot.|night time",
    "chart_question": "How many food item is shown in the bar graph?|What was the value in 2012?"
                      "|Which year has the highest share?|What is the difference between the two largest bars?",
    "chart_answer": "10.5 |14|2019 |0.3 |Yes|62 ",  # ChartQA answers keep trailing spaces (§1)
    "caption": "A man riding a wave on top of a surfboard.|Two dogs play in the snow."
               "|A plate of food with broccoli and rice.|President Obama speaks at a rally in Ohio."
               "|A red double-decker bus on a city street.|Anthony Pidgeon"
               "|Ms. Goodman styled Amber Valletta with wings for a 1993 shoot."
               "|A kitchen with wooden cabinets and a window.",
    "dialogue": "Q:is this a child or adult\nA:adult\nQ:male or female\nA:male"
                "|Q:is it sunny\nA:yes\nQ:any people\nA:no, just a bench"
                "|Q:what color is the dog\nA:tan\nQ:is it inside\nA:yes"
                "|Q:how many cars\nA:2\nQ:are they parked\nA:yes, by the curb",
    "change": "has two dogs instead of one|is in black and white|shows the animal lying down"
              "|has more people and a blue sky|the bottle is empty and on a table",
    "style_note": "is darker and has short sleeves|is longer and has a floral print|is red with a v-neck"
                  "|is more casual and lighter in color",
    "web_question": "Which body part?|What shape is the roof of the Pantheon?"
                    "|Are both the Eiffel Tower and the Tokyo Tower painted red?"
                    "|How many arches does the Stone Bridge have?",
    "wiki_caption": "Pantheon, Rome: the dome from the inside|Eiffel Tower at night"
                    "|Stone Bridge (Regensburg) over the Danube|Tokyo Tower seen from Shiba Park",
    "nq_query": "who sang the song a white sport coat and a pink carnation|when was the first ipod released"
                "|how many bones are in the human hand|where is the great barrier reef located",
    "oven_question": "what is the name of this building?|what kind of bird is this?|which mountain is this?"
                     "|what model of aircraft is this?",
    "grounding": "hot dog|teddy bear|dog|traffic light|cell phone|pizza|fire hydrant",  # spaces reach file names
    "refexp": "bowl behind the others can only see part|Dish in top right corner|little girl|pink|green woman"
              "|front bowl w/carrots in it|man on left|white car",
    # RefCOCO-Matching: the positive caption is another expression for the object, not the query's [3P].
    "refexp_alt": "Dish in top right corner|pink|front bowl w/carrots in it|woman in green|bowl at the back"
                  "|left guy|car on the right|blue mug",
    "pointing": "Which object is used to cut the cake?|Which item is the man holding?|What is on the table?"
                "|Which animal is closest to the fence?",
}
# fmt: on
VOCAB: dict[str, tuple[str, ...]] = {k: tuple(v.split("|")) for k, v in _POOLS.items()}

Neg = Literal["text", "empty", "image", "absent"]


@dataclass(frozen=True)
class TrainSpec:
    """One MMEB-train subset (§1, §4).

    Templates take ``{x}`` (query text) and ``{y}`` (target text) from VOCAB; file names take ``i`` (row index),
    ``n`` (``base + i``) and ``x``.
    """

    qry: str  # `original` query as on disk
    x: str | None = None  # VOCAB key for {x}
    qry_file: str | None = None  # None: text-only query
    pos: str = "{y}"
    y: str | None = None  # VOCAB key for {y}
    pos_file: str | None = None  # None: text-only positive
    neg: Neg = "text"  # text: another {y}; empty: ""/""; image: ""/<image> (VisDial [3P]); absent: no columns
    neg_file: str | None = None
    base: int = 0
    diverse: tuple[str, ...] = ()  # INSTRUCTION_DICT[subset][:2-3], VLM2Vec v1:archive/instruction_dict.py
    has_text: bool = False  # diverse_inst.py: paraphrase + qry[len(diverse[0]):]; else the paraphrase alone


_VQA = f"{IMG}\nRepresent the given image with the following question: {{x}}\n"
_VQA_DIV = (
    f"{IMG} Represent the given image with the following question: ",
    f"Use the given question to represent {IMG}: ",
    f"Represent {IMG} with the provided question: ",
)
_T2I_POS = f"{IMG}\nRepresent the given image.\n"
_CROP_POS = f"{IMG}\nRepresent the given cropped image of the object"  # no trailing newline (§1, §3)


def _vqa(qry_file: str, x: str = "question", y: str = "answer", base: int = 0) -> TrainSpec:
    return TrainSpec(_VQA, x, qry_file, y=y, base=base, diverse=_VQA_DIV, has_text=True)


# fmt: off
TRAIN_SPECS: dict[str, TrainSpec] = {
    "A-OKVQA": _vqa("A-OKVQA_image_{i}.jpg"),
    "CIRR": TrainSpec(  # the only subset known to lack neg_* columns (§1)
        f"{IMG}\nGiven an image, find a similar everyday image with the described changes: {{x}}\n",
        x="change", qry_file="train-{n}-0-img0.jpg", pos=_T2I_POS, pos_file="train-{n}-2-img1.jpg",
        neg="absent", base=11991, has_text=True,
        diverse=(f"{IMG} Given an image, find a similar everyday image with the described changes: ",
                 f"Given {IMG}, identify a similar everyday image incorporating the described changes: "),
    ),
    "ChartQA": _vqa("ChartQA_image_{i}.jpg", x="chart_question", y="chart_answer"),
    "DocVQA": _vqa("DocVQA_image_{i}.jpg"),
    "HatefulMemes": TrainSpec(
        f"{IMG}\nRepresent the given image for binary classification to determine whether it constitutes "
        "hateful speech or not\n",
        qry_file="HatefulMemes_image_{i}.jpg", y="yes_no",
        diverse=(f"{IMG} Represent the given image for binary classification to determine whether it "
                 "constitutes hateful speech or not.",
                 f"For {IMG}, classify whether it constitutes hateful speech or not."),
    ),
    "ImageNet_1K": TrainSpec(
        f"{IMG}\nRepresent the given image for classification\n", qry_file="image_{i}.jpg", y="imagenet",
        diverse=(f"{IMG} Represent the given image for classification.", f"Represent {IMG} for classification.",
                 f"Use {IMG} to perform classification."),
    ),
    "InfographicsVQA": _vqa("{n}.jpeg", base=20471),  # `.jpeg`, not `.jpg` (§1)
    "MSCOCO": TrainSpec(  # visual grounding; the cropped positive's file name has a space (§1)
        f'{IMG}\nSelect the portion of the image that isolates the object labeled as "{{x}}"\n',
        x="grounding", qry_file="{n:012d}.jpg", pos=_CROP_POS, pos_file="{n}_object_{x}.jpg", neg="empty",
        base=558840, has_text=True,
        diverse=(f"{IMG} Select the portion of the image that isolates the object labeled as ",
                 f"Select the portion of {IMG} that isolates the object labeled as "),
    ),
    "MSCOCO_i2t": TrainSpec(
        f"{IMG}\nFind an image caption describing the given everyday image.\n",
        qry_file="COCO_train2014_{n:012d}.jpg", y="caption", base=376224,
        diverse=(f"{IMG} Find an image caption describing the given everyday image.",
                 f"Find a caption that describes the everyday image in {IMG}."),
    ),
    "MSCOCO_t2i": TrainSpec(
        "Find me an everyday image that matches the given caption: {x}\n", x="caption", pos=_T2I_POS,
        pos_file="COCO_train2014_{n:012d}.jpg", neg="empty", base=161071, has_text=True,
        diverse=("Find me an everyday image that matches the given caption: ",
                 "Locate an everyday image that aligns with the provided caption: "),
    ),
    "N24News": TrainSpec(
        f"{IMG}\nRepresent the given news image with the following caption for domain classification: {{x}}\n",
        x="caption", qry_file="N24News_image_{i}.jpg", y="news_domain", has_text=True,
        diverse=(f"{IMG} Represent the given news image with the following caption for domain classification: ",
                 f"Represent {IMG} using the provided caption for domain classification: "),
    ),
    "NIGHTS": TrainSpec(
        f"{IMG}\nFind a day-to-day image that looks similar to the provided image.\n",
        qry_file="ref_{i:03d}_002.jpg", pos=_T2I_POS, pos_file="distort_{i:03d}_002_0.jpg", neg="empty",
        diverse=(f"{IMG} Find a day-to-day image that looks similar to the provided image.",
                 f"Find a day-to-day image resembling {IMG}."),
    ),
    "OK-VQA": _vqa("OK-VQA_image_{i}.jpg"),
    "SUN397": TrainSpec(
        f"{IMG}\nIdentify the scene shown in the image\n", qry_file="SUN397_image_{i}.jpg", y="scene",
        diverse=(f"{IMG} Identify the scene shown in the image.", f"Determine what scene is depicted in {IMG}."),
    ),
    "VOC2007": TrainSpec(
        f"{IMG}\nIdentify the object shown in the image\n", qry_file="VOC2007_image_{i}.jpg", y="voc",
        diverse=(f"{IMG} Identify the object shown in the image", f"Identify the object depicted in {IMG}."),
    ),
    "VisDial": TrainSpec(  # text-only query ending "\n\n"; the negative is an image with empty text [3P]
        "Represent the given dialogue about an image, which is used for image retrieval: {x}\n\n",
        x="dialogue", pos=f"{IMG}\nRepresent the given image\n", pos_file="VisDial_image_{i}.jpg", neg="image",
        neg_file="VisDial_image_6161{i}.jpg", has_text=True,
        diverse=("Represent the given dialogue about an image, which is used for image retrieval: ",
                 "Use the given dialogue about an image to aid in image retrieval: "),
    ),
    "Visual7W": _vqa("v7w_{n}.jpg", base=2359302),
    "VisualNews_i2t": TrainSpec(
        f"{IMG}\nFind a caption for the news in the given photo.\n",
        qry_file="washington_post_images_0529_{n}.jpg", y="caption", base=100,
        diverse=(f"{IMG} Find a caption for the news in the given photo.",
                 f"Find a caption for the news story depicted in {IMG}."),
    ),
    "VisualNews_t2i": TrainSpec(  # paraphrase 1 lacks a trailing space: diverse rows read "...caption.<caption>"
        "Retrieve an image of this news caption. {x}\n", x="caption", pos=_T2I_POS,
        pos_file="washington_post_images_0528_{n}.jpg", neg="empty", base=634, has_text=True,
        diverse=("Retrieve an image of this news caption. ", "Find an image that corresponds to this news caption."),
    ),
    "WebQA": TrainSpec(  # the query carries <|image_1|> although qry_image_path == "" (§1)
        f"{IMG}\nFind a Wikipedia image that answers this question: {{x}}\n", x="web_question",
        pos=f"{IMG}\nRepresent the given Wikipedia image with related text information: {{y}}\n",
        y="wiki_caption", pos_file="{n}.jpg", neg="empty", base=30272327, has_text=True,
        diverse=(f"{IMG} Find a Wikipedia image that answers this question: ",
                 f"Find a Wikipedia image that answers the question based on {IMG}: "),
    ),
}
# fmt: on
TRAIN_SUBSETS: tuple[str, ...] = tuple(TRAIN_SPECS)  # the 20 hub folder names, in the hub's order


@dataclass(frozen=True)
class EvalSpec:
    """One MMEB-eval config (§2, §4): modalities, templates (``{x}``/``{y}`` from VOCAB) and file names."""

    qmod: str  # "image" | "text" | "image+text"
    cmod: str  # "text" | "image" | "image+text"
    qry: str
    tgt: str = "{y}"
    x: str | None = None
    y: str | None = None
    qry_file: str = "image_{i}.jpg"  # [unverified] except Visual7W v7w_<id>, ScienceQA image_<i>.<ext> (§2)
    cand_file: str = "cand_{n}.jpg"
    base: int = 0
    closed: bool = False  # classification: candidates come from the dataset's closed label set
    cand_on_query_image: bool = False  # RefCOCO-Matching: every candidate is the query image + a caption [3P]


def _cls(inst: str, y: str, qry_file: str = "image_{i}.jpg", base: int = 0) -> EvalSpec:
    return EvalSpec("image", "text", f"{IMG}\n{inst}\n", y=y, qry_file=qry_file, base=base, closed=True)


def _qa(qry_file: str = "image_{i}.jpg", base: int = 0) -> EvalSpec:
    return EvalSpec("image+text", "text", _VQA, x="question", y="answer", qry_file=qry_file, base=base)


_CLS = "Represent the given image for classification"
_OBJ, _SCENE = "Identify the object shown in the image", "Identify the scene shown in the image"
_GROUND = f"{IMG}\nSelect the portion of the image that "
_WIKI_TGT = f"{IMG}\nRepresent the given Wikipedia image with related text information: {{y}}\n"
_T = TRAIN_SPECS
# fmt: off
EVAL_SPECS: dict[str, EvalSpec] = {
    "ImageNet-1K": _cls(_CLS, "imagenet"),
    "N24News": EvalSpec("image+text", "text", _T["N24News"].qry, x="caption", y="news_domain", closed=True),
    "HatefulMemes": _cls(_T["HatefulMemes"].qry[len(IMG) + 1 : -1], "yes_no"),
    "VOC2007": _cls(_OBJ, "voc", qry_file="image_s{n:07d}.jpg", base=11857),  # MMEB-V2 name pattern (§3)
    "SUN397": _cls(_SCENE, "scene"),
    "Place365": _cls(_SCENE, "place"),
    "ImageNet-A": _cls(_CLS, "imagenet"),
    "ImageNet-R": _cls(_CLS, "imagenet"),
    "ObjectNet": _cls(_OBJ, "object"),
    "Country211": _cls("Identify the country depicted in the image", "country"),
    "OK-VQA": _qa(),
    "A-OKVQA": _qa(),
    "DocVQA": _qa(),
    "InfographicsVQA": _qa(qry_file="{n}.jpeg", base=30471),
    "ChartQA": _qa(),
    "Visual7W": _qa(qry_file="v7w_{n}.jpg", base=2359302),
    "ScienceQA": _qa(qry_file="image_{i}.png"),
    "VizWiz": _qa(),
    "GQA": _qa(),
    "TextVQA": _qa(),
    "VisDial": EvalSpec("text", "image", _T["VisDial"].qry, _T["VisDial"].pos, x="dialogue"),
    "CIRR": EvalSpec("image+text", "image", _T["CIRR"].qry, _T2I_POS, x="change"),
    "VisualNews_t2i": EvalSpec("text", "image", _T["VisualNews_t2i"].qry, _T2I_POS, x="caption"),
    "VisualNews_i2t": EvalSpec("image", "text", _T["VisualNews_i2t"].qry, y="caption"),
    "MSCOCO_t2i": EvalSpec("text", "image", _T["MSCOCO_t2i"].qry, _T2I_POS, x="caption"),
    "MSCOCO_i2t": EvalSpec("image", "text", _T["MSCOCO_i2t"].qry, y="caption"),
    "NIGHTS": EvalSpec("image", "image", _T["NIGHTS"].qry, _T2I_POS, qry_file="ref_{i:03d}_002.jpg",
                       cand_file="distort_{n:03d}_002_0.jpg"),
    "WebQA": EvalSpec("text", "image+text", _T["WebQA"].qry, _WIKI_TGT, x="web_question", y="wiki_caption"),
    "FashionIQ": EvalSpec("image+text", "image",
                          f"{IMG}\nFind an image to match the fashion image and style note: {{x}}\n", _T2I_POS,
                          x="style_note"),
    "Wiki-SS-NQ": EvalSpec("text", "image", "Find the document image that can answer the given query: {x}\n",
                           f"{IMG}\nRepresent the given image\n", x="nq_query"),
    "OVEN": EvalSpec("image+text", "image+text",
                     f"{IMG}\nRetrieve a Wikipedia image-description pair that provides evidence for the question "
                     "of this image: {x}\n", _WIKI_TGT, x="oven_question", y="wiki_caption"),
    "EDIS": EvalSpec("text", "image+text", f"{IMG}\nFind a news image that matches the provided caption: {{x}}\n",
                     f"{IMG}\nRepresent the given image with related text information: {{y}}\n",
                     x="caption", y="caption"),
    "MSCOCO": EvalSpec("image+text", "image",  # the "to to" typo is real (§3)
                       f'{IMG}\nCrop the image to to isolate the object labeled as "{{x}}"\n', _CROP_POS,
                       x="grounding", y="grounding", cand_file="{n}_object_{y}.jpg", base=391895),
    "RefCOCO": EvalSpec("image+text", "image", _GROUND + 'follows the language expressions. "{x}"\n', _CROP_POS,
                        x="refexp"),
    "RefCOCO-Matching": EvalSpec("image+text", "image+text",
                                 _GROUND + 'follows the language expressions: "{x}"\n',
                                 _GROUND + 'follows the language expressions: "{y}"\n',
                                 x="refexp", y="refexp_alt", cand_on_query_image=True),
    "Visual7W-Pointing": EvalSpec("image+text", "image", _GROUND + 'answers the question "{x}"\n', _CROP_POS,
                                  x="pointing", qry_file="v7w_{n}.jpg", base=2400000),
    "CIFAR-100": _cls(_CLS, "cifar"),  # the extra 37th config (§2); its instruction is [unverified]
}
# fmt: on
EVAL_CONFIGS: tuple[str, ...] = tuple(EVAL_SPECS)  # 36 MMEB v1 configs + CIFAR-100
EVAL_V1_CONFIGS: tuple[str, ...] = EVAL_CONFIGS[:36]
EVAL_MODALITY: dict[str, tuple[str, str]] = {c: (s.qmod, s.cmod) for c, s in EVAL_SPECS.items()}


def _pick(vocab: str | None, k: int) -> str:
    if vocab is None:
        return ""
    items = VOCAB[vocab]
    text = items[k % len(items)]
    return text if k < len(items) else f"{text} {k // len(items) + 1}"


def _rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def write_image(path: Path, seed: int = 0) -> Path:
    """Write a small real JPEG (PNG for ``.png`` names) with seed- and path-dependent size and content."""
    rng = _rng(seed, "/".join(path.parts[-3:]))
    w, h = _SIZES[int(rng.integers(len(_SIZES)))]
    yy, xx = np.mgrid[0:h, 0:w]
    slope = rng.integers(1, 6, 3)
    arr = (rng.integers(0, 256, 3) + np.stack([xx * slope[0], yy * slope[1], (xx + yy) * slope[2]], -1)) % 256
    x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
    arr[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 256, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.fromarray(arr.astype("uint8")).save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return path


def _write_images(root: Path, rels: Sequence[str], seed: int) -> None:
    """Write each image once; an AppleDouble ``._`` file sits beside the first one of each folder (§1)."""
    junked: set[Path] = set()
    for rel in dict.fromkeys(r for r in rels if r):
        path = root / rel
        if not path.exists():
            write_image(path, seed)
        if path.parent not in junked:
            junked.add(path.parent)
            (path.parent / f"._{path.name}").write_bytes(APPLEDOUBLE)


def _hf_metadata(columns: Mapping[str, bool]) -> dict[bytes, bytes]:
    """``huggingface`` schema metadata as ``push_to_hub`` writes it (True: a Sequence of strings)."""
    value = {"dtype": "string", "_type": "Value"}
    feats = {c: {"feature": value, "_type": "Sequence"} if seq else value for c, seq in columns.items()}
    return {b"huggingface": json.dumps({"info": {"features": feats}}).encode()}


def _write_parquet(path: Path, rows: list[dict[str, object]], schema: pa.Schema) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def train_shard(root: Path, subset: str, split: str = "original") -> Path:
    """``<root>/<Subset>/<split>-00000-of-00001.parquet`` (§1)."""
    return Path(root) / subset / f"{split}-00000-of-00001.parquet"


def eval_shard(data_dir: Path, config: str) -> Path:
    """``<data_dir>/<Config>/test-00000-of-00001.parquet`` (§2)."""
    return Path(data_dir) / config / "test-00000-of-00001.parquet"


def train_schema(subset: str) -> pa.Schema:
    """All-string columns; CIRR lacks ``neg_text``/``neg_image_path`` (§1)."""
    cols = TRAIN_COLUMNS[:4] if TRAIN_SPECS[subset].neg == "absent" else TRAIN_COLUMNS
    return pa.schema([(c, pa.string()) for c in cols], metadata=_hf_metadata(dict.fromkeys(cols, False)))


EVAL_SCHEMA = pa.schema(
    [
        ("qry_text", pa.string()),
        ("qry_img_path", pa.string()),
        ("tgt_text", pa.list_(pa.string())),
        ("tgt_img_path", pa.list_(pa.string())),
    ],
    metadata=_hf_metadata({"qry_text": False, "qry_img_path": False, "tgt_text": True, "tgt_img_path": True}),
)


def _train_row(subset: str, i: int, seed: int = 0) -> dict[str, str | None]:
    s = TRAIN_SPECS[subset]
    x, y = _pick(s.x, i + seed), _pick(s.y, i + seed)
    folder = f"images/{subset}/Train/"

    def file(pattern: str | None) -> str:
        return folder + pattern.format(i=i, n=s.base + i, x=x) if pattern else ""

    row: dict[str, str | None] = {
        "qry": s.qry.format(x=x),
        "qry_image_path": file(s.qry_file),
        "pos_text": s.pos.format(y=y),
        "pos_image_path": file(s.pos_file),
    }
    if s.neg == "text":
        row |= {"neg_text": s.pos.format(y=_pick(s.y, i + seed + 1)), "neg_image_path": ""}
    elif s.neg == "empty":
        row |= {"neg_text": "", "neg_image_path": ""}
    elif s.neg == "image":
        row |= {"neg_text": "", "neg_image_path": file(s.neg_file)}
    return row


def _diverse(subset: str, row: dict[str, str | None], rnd: random.Random, i: int) -> dict[str, str | None]:
    """VLM2Vec ``v1:archive/diverse_inst.py``: swap the instruction for a paraphrase (§1 ``diverse_instruction``)."""
    s = TRAIN_SPECS[subset]
    para = s.diverse[1] if i == 0 else rnd.choice(s.diverse)  # row 0 always gets an inline-token paraphrase
    qry = str(row["qry"])
    return {**row, "qry": para + qry[len(s.diverse[0]) :] if s.has_text else para}


def write_mmeb_train(root: Path, subsets: Sequence[str] | None = None, rows: int = 6, seed: int = 0) -> Path:
    """Write an ``MMEB-train/`` folder as after ``unzip_file.py`` (§1) and return ``root``.

    Per subset: ``original`` (``rows`` rows), ``diverse_instruction`` (same rows, paraphrased ``qry``) and the
    legacy ``train`` shard (``rows + 1`` rows: an extra last row, so a test can tell it was read). Images go to
    ``root/images/<Subset>/Train/<file>``; row paths are relative to ``root``. Root also holds ``README.md``,
    ``unzip_file.py``, ``.gitattributes`` and ``images_zip/<Subset>.zip`` (empty archives, never needed).
    """
    root = Path(root)
    subsets = TRAIN_SUBSETS if subsets is None else tuple(subsets)
    for subset in subsets:
        rnd = random.Random(f"{seed}/{subset}")
        legacy = [_train_row(subset, i, seed) for i in range(rows + 1)]
        original = [dict(r) for r in legacy[:rows]]
        if TRAIN_SPECS[subset].neg != "absent" and rows > NULL_ROW:
            original[NULL_ROW]["neg_image_path"] = None
        diverse = [_diverse(subset, r, rnd, i) for i, r in enumerate(original)]
        schema = train_schema(subset)
        for split, data in zip(TRAIN_SPLITS, (original, diverse, legacy), strict=True):
            _write_parquet(train_shard(root, subset, split), data, schema)
        rels = [
            str(r.get(c) or "")
            for r in legacy
            for c in ("qry_image_path", "pos_image_path", "neg_image_path")
        ]
        _write_images(root, rels, seed)
        (root / "images_zip").mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(root / "images_zip" / f"{subset}.zip", "w"):
            pass
    (root / "README.md").write_text("---\nconfigs:\n- config_name: A-OKVQA\n---\n# MMEB-train (replica)\n")
    (root / "unzip_file.py").write_text(
        "import os\nfor x in os.listdir('images_zip'):\n    os.system(f'unzip images_zip/{x} -d images/')\n"
    )
    (root / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    return root


@dataclass(frozen=True)
class _EvalRow:
    x: str
    image: str
    candidates: list[tuple[str, str]]  # (y, image)


def _eval_rows(config: str, queries: int, candidates: int, seed: int) -> list[_EvalRow]:
    """The content of a config's rows (texts still unformatted): what both eval layouts share."""
    s = EVAL_SPECS[config]
    pool = len(VOCAB[str(s.y)]) if s.closed else queries + candidates - 1
    rows = []
    for r in range(queries):
        qimg = f"{config}/" + s.qry_file.format(i=r, n=s.base + r) if "image" in s.qmod else ""
        cands = []
        for j in range(min(candidates, pool)):
            c = (r + j) % pool
            y = _pick(s.y, (c + seed) % pool if s.closed else c + seed)
            if s.cand_on_query_image:
                cimg = qimg
            elif "image" in s.cmod:
                cimg = f"{config}/" + s.cand_file.format(i=c, n=s.base + c, y=y)
            else:
                cimg = ""
            cands.append((y, cimg))
        rows.append(_EvalRow(_pick(s.x, r + seed), qimg, cands))
    return rows


def write_mmeb_eval(
    root: Path, datasets: Sequence[str] | None = None, queries: int = 3, candidates: int = 4, seed: int = 0
) -> tuple[Path, Path]:
    """Write ``root/MMEB-eval/<Config>/test-00000-of-00001.parquet`` and ``root/eval_images/<Config>/<file>`` (§2).

    Returns ``(data_dir, image_dir)``; row paths are ``<Config>/<file>`` relative to ``image_dir`` (the unzip root
    of ``images.zip``, which also sits, empty, at ``data_dir/images.zip`` beside ``README.md``). Candidate 0 is
    the positive. Row ``r`` takes the candidate pool items ``r .. r+candidates-1``, so pools overlap across rows
    as in the real data; classification pools are the closed label set (HatefulMemes has 2 labels, so 2
    candidates). Queries are distinct as (text, image) pairs -- classification query texts are one shared
    instruction, as in the real data; candidates are distinct (text, image) pairs within a row.
    """
    data_dir, image_dir = Path(root) / "MMEB-eval", Path(root) / "eval_images"
    for config in EVAL_CONFIGS if datasets is None else tuple(datasets):
        s = EVAL_SPECS[config]
        rows = _eval_rows(config, queries, candidates, seed)
        records = [
            {
                "qry_text": s.qry.format(x=row.x),
                "qry_img_path": row.image,
                "tgt_text": [s.tgt.format(y=y) for y, _ in row.candidates],
                "tgt_img_path": [image for _, image in row.candidates],
            }
            for row in rows
        ]
        _write_parquet(eval_shard(data_dir, config), records, EVAL_SCHEMA)
        _write_images(
            image_dir, [p for row in rows for p in (row.image, *(i for _, i in row.candidates))], seed
        )
    with zipfile.ZipFile(data_dir / "images.zip", "w"):
        pass
    (data_dir / "README.md").write_text(
        "---\nconfigs:\n- config_name: CIFAR-100\n---\n# MMEB-eval (replica)\n"
    )
    return data_dir, image_dir


def _split_template(template: str, value: str, field: str) -> tuple[str, str]:
    """(instruction, text) of a v1 template: a trailing ``{field}`` becomes the text column; an inline one (VG's
    quoted labels) stays inside the instruction (§3)."""
    head, found, tail = template.partition("{" + field + "}")
    if found and not tail.strip():
        return head.rstrip(), value
    if found and tail.strip() == '"' and head.endswith('"'):  # a quoted label or expression ends the text
        return head[:-1].rstrip(), f'"{value}"'
    return template.format(**{field: value}).rstrip("\n"), ""


def write_mmeb_test_instruct(
    root: Path, datasets: Sequence[str] | None = None, queries: int = 3, candidates: int = 4, seed: int = 0
) -> tuple[Path, Path]:
    """Write ``root/MMEB_Test_Instruct/<Config>/test-00000-of-00001.parquet`` and ``root/image-tasks/<Config>/…``.

    The columns per task type are VLM2Vec v2's (§3): cls / qa / i2t ``qry_inst, qry_text, qry_img_path,
    tgt_text``; t2i ``qry_inst, qry_text, tgt_inst, tgt_text, tgt_img_path``; i2i / VG all six. Instructions keep
    the v1 strings (``<|image_1|>\n`` prefix where the side has an image) and their texts go in the text columns.
    Hub file names are [unverified]; the ``test-0000k-of-0000n`` pattern of the sibling repositories is used.
    """
    data_dir, image_dir = Path(root) / "MMEB_Test_Instruct", Path(root) / "image-tasks"
    for config in EVAL_V1_CONFIGS if datasets is None else tuple(datasets):
        s = EVAL_SPECS[config]
        kind = "cls/qa/i2t" if s.cmod == "text" else "t2i" if s.qmod == "text" else "i2i_vg"
        records = []
        rows = _eval_rows(config, queries, candidates, seed)
        for row in rows:
            qry_inst, qry_text = _split_template(s.qry, row.x, "x")
            record: dict[str, object] = {"qry_inst": qry_inst, "qry_text": qry_text}
            if kind != "t2i":
                record["qry_img_path"] = row.image
            if kind == "cls/qa/i2t":
                record["tgt_text"] = [y for y, _ in row.candidates]
            else:
                split = [_split_template(s.tgt, y, "y") for y, _ in row.candidates]
                record["tgt_inst"] = _split_template(s.tgt, "", "y")[0]
                record["tgt_text"] = [text for _, text in split]
                record["tgt_img_path"] = [image for _, image in row.candidates]
            records.append(record)
        table = pa.Table.from_pylist(records)
        path = eval_shard(data_dir, config)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        _write_images(
            image_dir, [p for row in rows for p in (row.image, *(i for _, i in row.candidates)) if p], seed
        )
    return data_dir, image_dir


_STAGE1_QA = (
    ("What is the main object in the image?", "A red double-decker bus parked on a city street."),
    ("How many people are visible?", "There are three people, two of them standing near the door."),
    ("What colour is the sky?", "The sky is pale blue with a few thin clouds."),
    ("Is there any text in the picture?", "Yes, a sign on the left reads “OPEN”."),
    ("What is the weather like?", "It looks sunny and dry."),
    ("What is on the table?", "A plate of rice with broccoli and a glass of water."),
    ("Where might this photo have been taken?", "Probably in a park in a large city."),
    ("What is the value shown for 2019?", "The bar for 2019 shows 10.5."),
)
_STAGE1_SUBSETS = ("ImageNet_1K", "DocVQA", "ChartQA", "MSCOCO_i2t", "VisualNews_i2t", "OK-VQA")


def _train_images(image_root: Path) -> list[str]:
    found = sorted((image_root / "images").glob("*/Train/*"))
    return [
        p.relative_to(image_root).as_posix() for p in found if not p.name.startswith("._") and p.is_file()
    ]


def write_stage1_conversations(
    path: Path, image_root: Path, n: int = 8, seed: int = 0, text_only: bool = True
) -> Path:
    """Write LLaVA-style stage-1 JSONL as CoMa's ``llava_instruct`` loader reads it (§5) and return ``path``.

    ``image`` is relative to the MMEB-train root ``image_root`` (``images/<Subset>/Train/<file>``): images already
    there (e.g. from :func:`write_mmeb_train`) are reused, else some are written. Each record has 3-5 Q/A turns,
    ``<image>`` only at the start of the first human turn; with ``text_only`` the last record has ``image: null``
    and no ``<image>``.
    """
    image_root, rnd = Path(image_root), random.Random(f"stage1/{seed}")
    images = _train_images(image_root)
    if not images:
        for k in range(n):
            sub = _STAGE1_SUBSETS[k % len(_STAGE1_SUBSETS)]
            images.append(_train_row(sub, k, seed)["qry_image_path"] or "")
        _write_images(image_root, images, seed)
    chosen = rnd.sample(images, min(n, len(images)))  # spread over subsets
    lines = []
    for k in range(n):
        has_image = not (text_only and k == n - 1)
        turns = rnd.sample(_STAGE1_QA, rnd.randint(3, 5))
        conv = []
        for t, (q, a) in enumerate(turns):
            lead = "<image>\n" if has_image and t == 0 else ""
            conv += [{"from": "human", "value": lead + q}, {"from": "gpt", "value": a}]
        record = {
            "id": f"stage1_{seed}_{k:05d}",
            "image": chosen[k % len(chosen)] if has_image else None,
            "conversations": conv,
        }
        lines.append(json.dumps(record, ensure_ascii=False))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def corrupt_image(path: Path, how: Literal["garbage", "truncated"] = "garbage") -> Path:
    """Spoil an image in place: ``garbage`` (not an image at all) or ``truncated`` (JPEG cut in half)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(b"not an image\x00" * 4 if how == "garbage" else data[: len(data) // 2])
    return path


def append_rows(shard: Path, rows: Sequence[Mapping[str, object]]) -> Path:
    """Append rows to a parquet shard, keeping its schema (missing columns become null).

    E.g. a row whose image does not exist::

        append_rows(train_shard(root, "OK-VQA"), [{**row, "qry_image_path": "images/OK-VQA/Train/gone.jpg"}])
    """
    table = pq.read_table(shard)
    extra = pa.Table.from_pylist([dict(r) for r in rows], schema=table.schema)
    pq.write_table(pa.concat_tables([table, extra]), shard)
    return shard
