"""Build every dataset of the synthetic world from scene graphs (pure: no files are written here).

* stage 0: single-turn captions and QA (LLaVA records) that turn a random tiny model into a small "VLM";
* stage 1: 3-5 turn retrieval-oriented QA per training image, standing in for the paper's teacher VLM;
* stage 2: MMEB-train rows for classification, VQA, t2i / i2t / i2i retrieval and grounding;
* eval: MMEB-eval rows with per-query candidate lists (hard negatives differ from the positive in one attribute),
  in-distribution and out-of-distribution (held-out colour-shape pairs, unseen question types).

Images are only *planned* here: an :class:`ImageBank` gives every distinct (scene, variant, crop) a relative
path, and the writer renders them. Training-side scenes never contain a held-out colour-shape pair.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from coma.data.synth.scenes import (
    ALL_PAIRS,
    COLOURS,
    EDIT_KINDS,
    GRID,
    N_CELLS,
    NUMBER_WORDS,
    POSITIONS,
    SHAPES,
    SIZES,
    WORDS,
    Pair,
    Scene,
    SceneObject,
    at_phrase,
    caption,
    choose_held_out,
    edit_scene,
    object_list,
    plural,
    refer,
    sample_scene,
    word_phrase,
)

# MMEB-train / MMEB-eval instruction templates (Phi-3.5-V image placeholder, as in the real data).
CLS_QUERY = "<|image_1|>\nRepresent the given image for classification"
VQA_QUERY = "<|image_1|>\nRepresent the given image with the following question: {question}"
T2I_QUERY = "Find me an image that matches the given caption: {caption}"
I2T_QUERY = "<|image_1|>\nFind an image caption describing the given image."
I2I_QUERY = "<|image_1|>\nFind an image that shows the same scene as the given image."
GROUNDING_QUERY = (
    "<|image_1|>\nSelect the portion of the image that isolates the object of the given label: {label}"
)
IMAGE_TARGET = "<|image_1|>\nRepresent the given image."
CROP_TARGET = "<|image_1|>\nRepresent the given cropped image of the object"
CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image.",
    "Write a short caption for this image.",
    "What does this image show?",
    "Give a brief description of the picture.",
)
LIST_PROMPTS: tuple[str, ...] = ("What objects are in the image?", "List the objects in the image.")
# Stage 1 stands in for a teacher's question list, whose items must end in "?" (coma generate parses strictly).
STAGE1_LIST_PROMPTS: tuple[str, ...] = (
    "What objects are in the image?",
    "Which objects does the image show?",
)

SEEN_QUESTION_KINDS: tuple[str, ...] = ("colour", "shape", "size", "position", "count", "at_position", "word")
UNSEEN_QUESTION_KINDS: tuple[str, ...] = ("relation", "line_count", "word_position")
TRAIN_SUBSETS: tuple[str, ...] = (
    "SynthCls",
    "SynthVQA",
    "SynthT2I",
    "SynthI2T",
    "SynthI2I",
    "SynthGrounding",
)
N_CANDIDATES = 12
N_CLS_CANDIDATES = 16
MAX_HARD = 8  # leave room for some random candidates in every list
MAX_RETRIES = 50


@dataclass(frozen=True)
class SizePreset:
    stage0_scenes: int  # one multi-turn record each (a caption or object list, then simple questions)
    train_scenes: int  # multi-object scenes behind VQA / retrieval / grounding rows and stage-1 records
    cls_scenes: int  # one large subject + small distractors, behind the classification rows
    eval_queries: int  # per eval dataset


PRESETS: dict[str, SizePreset] = {
    "tiny": SizePreset(stage0_scenes=12, train_scenes=16, cls_scenes=8, eval_queries=6),
    "small": SizePreset(stage0_scenes=400, train_scenes=300, cls_scenes=100, eval_queries=30),
    "default": SizePreset(stage0_scenes=2000, train_scenes=1000, cls_scenes=400, eval_queries=100),
}


@dataclass(frozen=True)
class EvalSpec:
    name: str
    family: str  # cls | vqa | t2i | i2t | i2i | grounding
    meta_task: str  # classification | vqa | retrieval | grounding
    split: str  # IND | OOD
    novelty: str = "none"  # none | held_out_pairs | unseen_questions


EVAL_SPECS: tuple[EvalSpec, ...] = (
    EvalSpec("SynthCls", "cls", "classification", "IND"),
    EvalSpec("SynthClsHeldout", "cls", "classification", "OOD", "held_out_pairs"),
    EvalSpec("SynthVQA", "vqa", "vqa", "IND"),
    EvalSpec("SynthVQANewQ", "vqa", "vqa", "OOD", "unseen_questions"),
    EvalSpec("SynthT2I", "t2i", "retrieval", "IND"),
    EvalSpec("SynthI2T", "i2t", "retrieval", "IND"),
    EvalSpec("SynthI2I", "i2i", "retrieval", "IND"),
    EvalSpec("SynthT2IHeldout", "t2i", "retrieval", "OOD", "held_out_pairs"),
    EvalSpec("SynthGrounding", "grounding", "grounding", "IND"),
    EvalSpec("SynthGroundingHeldout", "grounding", "grounding", "OOD", "held_out_pairs"),
)


@dataclass(frozen=True)
class ImageSpec:
    """One image file: a scene drawn with a given jitter variant, optionally cropped to one grid cell."""

    scene: Scene
    variant: int = 0
    crop_cell: int | None = None


class ImageBank:
    """Gives each distinct image a stable path relative to the image root; equal specs share one file."""

    def __init__(self) -> None:
        self.specs: dict[str, ImageSpec] = {}
        self._paths: dict[ImageSpec, str] = {}
        self._stems: dict[tuple[str, Scene], str] = {}
        self._counts: dict[str, int] = {}

    def path(self, folder: str, spec: ImageSpec) -> str:
        if spec in self._paths:
            return self._paths[spec]
        stem = self._stems.get((folder, spec.scene))
        if stem is None:
            index = self._counts.get(folder, 0)
            self._counts[folder] = index + 1
            stem = self._stems[(folder, spec.scene)] = f"{folder}/{index:06d}"
        suffix = (f"_v{spec.variant}" if spec.variant else "") + (
            f"_crop{spec.crop_cell}" if spec.crop_cell is not None else ""
        )
        path = self._paths[spec] = f"{stem}{suffix}.png"
        self.specs[path] = spec
        return path


@dataclass(frozen=True)
class QA:
    kind: str
    question: str
    answer: str
    alternatives: tuple[str, ...]  # wrong answers of the same type: the hard negatives


@dataclass
class WorldPlan:
    seed: int
    size: str
    held_out: tuple[Pair, ...]
    bank: ImageBank
    stage0: list[dict] = field(default_factory=list)
    stage1: list[dict] = field(default_factory=list)
    train: dict[str, list[dict]] = field(default_factory=dict)
    eval: list[tuple[EvalSpec, list[dict]]] = field(default_factory=list)


def stream(seed: int, name: str) -> np.random.Generator:
    """An independent generator per component, so adding rows to one never shifts another."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _shuffled(rng: np.random.Generator, items: Sequence) -> list:
    return [items[int(i)] for i in rng.permutation(len(items))]


# ---------------------------------------------------------------- questions


def one_off_descriptions(obj: SceneObject, allowed: frozenset[Pair]) -> list[str]:
    """Descriptions that differ from ``obj``'s in exactly one attribute (size, colour or shape)."""
    other_size = "small" if obj.size == "large" else "large"
    out = [replace(obj, size=other_size).description]
    out += [
        replace(obj, colour=c).description for c in COLOURS if c != obj.colour and (c, obj.shape) in allowed
    ]
    out += [
        replace(obj, shape=s).description for s in SHAPES if s != obj.shape and (obj.colour, s) in allowed
    ]
    return out


def one_off_labels(obj: SceneObject, allowed: frozenset[Pair]) -> list[str]:
    out = [f"{c} {obj.shape}" for c in COLOURS if c != obj.colour and (c, obj.shape) in allowed]
    return out + [f"{obj.colour} {s}" for s in SHAPES if s != obj.shape and (obj.colour, s) in allowed]


def _others(vocabulary: Sequence[str], answer: str) -> tuple[str, ...]:
    return tuple(v for v in vocabulary if v != answer)


def _ask_attribute(kind: str, scene: Scene, rng: np.random.Generator) -> QA:
    obj = _pick(rng, scene.objects)
    if kind == "colour":
        return QA(
            kind, f"What colour is {refer(scene, obj, 'colour')}?", obj.colour, _others(COLOURS, obj.colour)
        )
    if kind == "shape":
        return QA(kind, f"What shape is {refer(scene, obj, 'shape')}?", obj.shape, _others(SHAPES, obj.shape))
    if kind == "size":
        return QA(kind, f"What size is {refer(scene, obj, 'size')}?", obj.size, _others(SIZES, obj.size))
    position = POSITIONS[obj.cell]
    return QA(kind, f"Where is {refer(scene, obj, 'position')}?", position, _others(POSITIONS, position))


def _ask_count(scene: Scene, rng: np.random.Generator) -> QA:
    by = _pick(rng, ("all", "colour", "shape", "size"))
    # Half the time ask about an attribute present in the scene, so "zero" does not dominate.
    present = _pick(rng, scene.objects)
    if by == "all":
        question, n = "How many objects are there?", len(scene.objects)
    elif by == "colour":
        colour = present.colour if rng.random() < 0.5 else _pick(rng, COLOURS)
        question, n = f"How many {colour} objects are there?", sum(o.colour == colour for o in scene.objects)
    elif by == "shape":
        shape = present.shape if rng.random() < 0.5 else _pick(rng, SHAPES)
        question, n = f"How many {plural(shape)} are there?", sum(o.shape == shape for o in scene.objects)
    else:
        size = _pick(rng, SIZES)
        question, n = f"How many {size} objects are there?", sum(o.size == size for o in scene.objects)
    return QA("count", question, NUMBER_WORDS[n], _others(NUMBER_WORDS, NUMBER_WORDS[n]))


def _ask_at_position(scene: Scene, rng: np.random.Generator, allowed: frozenset[Pair]) -> QA:
    cell = int(rng.integers(N_CELLS))
    question = f"What is {at_phrase(cell)}?"
    obj = scene.object_at(cell)
    if obj is not None:
        return QA("at_position", question, obj.description, tuple(one_off_descriptions(obj, allowed)))
    if cell == scene.word_cell and scene.word is not None:
        answer = word_phrase(scene.word)
        return QA("at_position", question, answer, tuple(word_phrase(w) for w in WORDS if w != scene.word))
    return QA("at_position", question, "nothing", tuple(o.description for o in scene.objects))


def _ask_word(scene: Scene) -> QA:
    answer = scene.word if scene.word is not None else "none"
    return QA("word", "What word is written in the image?", answer, _others((*WORDS, "none"), answer))


_DIRECTIONS: tuple[tuple[str, int, int], ...] = (
    ("above", -1, 0),
    ("below", 1, 0),
    ("to the left of", 0, -1),
    ("to the right of", 0, 1),
)


def _ask_relation(scene: Scene, rng: np.random.Generator, allowed: frozenset[Pair]) -> QA | None:
    options = []
    for obj in scene.objects:
        row, col = divmod(obj.cell, GRID)
        for phrase, d_row, d_col in _DIRECTIONS:
            r, c = row + d_row, col + d_col
            neighbour = scene.object_at(r * GRID + c) if 0 <= r < GRID and 0 <= c < GRID else None
            if neighbour is not None:
                options.append((obj, phrase, neighbour))
    if not options:
        return None
    obj, phrase, neighbour = _pick(rng, options)
    others = [o.description for o in scene.objects if o is not neighbour]
    return QA(
        "relation",
        f"What is directly {phrase} {refer(scene, obj, 'position')}?",
        neighbour.description,
        tuple(one_off_descriptions(neighbour, allowed) + others),
    )


def _ask_line_count(scene: Scene, rng: np.random.Generator) -> QA:
    axis, index = _pick(rng, ("row", "column")), int(rng.integers(GRID))
    name = (("top", "middle", "bottom") if axis == "row" else ("left", "middle", "right"))[index]
    n = sum((divmod(o.cell, GRID)[0 if axis == "row" else 1]) == index for o in scene.objects)
    return QA(
        "line_count",
        f"How many objects are in the {name} {axis}?",
        NUMBER_WORDS[n],
        _others(NUMBER_WORDS, NUMBER_WORDS[n]),
    )


def _ask_word_position(scene: Scene) -> QA | None:
    if scene.word_cell is None:
        return None
    position = POSITIONS[scene.word_cell]
    return QA("word_position", "Where is the written word?", position, _others(POSITIONS, position))


def ask(kind: str, scene: Scene, rng: np.random.Generator, allowed: frozenset[Pair]) -> QA | None:
    """One question of ``kind`` about ``scene`` (None when the scene cannot support that kind)."""
    if kind in ("colour", "shape", "size", "position"):
        return _ask_attribute(kind, scene, rng)
    if kind == "count":
        return _ask_count(scene, rng)
    if kind == "at_position":
        return _ask_at_position(scene, rng, allowed)
    if kind == "word":
        return _ask_word(scene)
    if kind == "relation":
        return _ask_relation(scene, rng, allowed)
    if kind == "line_count":
        return _ask_line_count(scene, rng)
    if kind == "word_position":
        return _ask_word_position(scene)
    raise ValueError(f"unknown question kind {kind!r}")


def ask_any(
    kinds: Sequence[str], scene: Scene, rng: np.random.Generator, allowed: frozenset[Pair]
) -> QA | None:
    """A question of a random kind that the scene supports, or None if none does."""
    for kind in _shuffled(rng, kinds):
        qa = ask(kind, scene, rng, allowed)
        if qa is not None:
            return qa
    return None


# ---------------------------------------------------------------- stage 0 and stage 1


def conversation(record_id: str, image: str, turns: Sequence[tuple[str, str]]) -> dict:
    """LLaVA record; ``<image>`` opens the first human turn only."""
    messages = []
    for i, (question, answer) in enumerate(turns):
        messages.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + question})
        messages.append({"from": "gpt", "value": answer})
    return {"id": record_id, "image": image, "conversations": messages}


def build_stage0(
    rng: np.random.Generator, n_scenes: int, pairs: Sequence[Pair], bank: ImageBank
) -> list[dict]:
    """One multi-turn record per scene: a caption or the object list (two times in three), then simple questions,
    3-4 turns in all; a third of the records open with a question, as a VQA query does.

    Several supervised answers per image make the answers depend on the image much sooner than one turn does:
    a random model first learns the text prior, and only many image-dependent tokens pull it off that prior.
    """
    allowed = frozenset(pairs)
    records = []
    for i in range(n_scenes):
        scene = sample_scene(rng, pairs, n_objects=(1, 4))
        image = bank.path("stage0", ImageSpec(scene))
        draw = rng.random()
        if draw < 1 / 3:
            openers = [(_pick(rng, CAPTION_PROMPTS), caption(scene))]
        elif draw < 2 / 3:
            openers = [(_pick(rng, LIST_PROMPTS), object_list(scene))]
        else:
            openers = []
        turns = question_turns(scene, rng, allowed, openers, int(rng.integers(3, 5)))
        records.append(conversation(f"stage0-{i:06d}", image, turns))
    return records


def question_turns(
    scene: Scene,
    rng: np.random.Generator,
    allowed: frozenset[Pair],
    turns: list[tuple[str, str]],
    n_turns: int,
) -> list[tuple[str, str]]:
    """``turns`` extended with distinct seen-kind questions about ``scene`` up to ``n_turns`` in all."""
    turns = list(turns)
    for _ in range(MAX_RETRIES):
        if len(turns) >= n_turns:
            break
        qa = ask(_pick(rng, SEEN_QUESTION_KINDS), scene, rng, allowed)
        if qa is not None and all(qa.question != q for q, _ in turns):
            turns.append((qa.question, qa.answer))
    return turns


def stage1_turns(scene: Scene, rng: np.random.Generator, allowed: frozenset[Pair]) -> list[tuple[str, str]]:
    """3-5 distinct retrieval-oriented questions with answers; often opens with the object list."""
    n_turns = int(rng.integers(3, 6))
    opener = [(_pick(rng, STAGE1_LIST_PROMPTS), object_list(scene))] if rng.random() < 0.5 else []
    return question_turns(scene, rng, allowed, opener, n_turns)


def build_stage1(
    rng: np.random.Generator, images: Sequence[tuple[str, Scene]], allowed: frozenset[Pair]
) -> list[dict]:
    return [
        conversation(f"stage1-{i:06d}", image, stage1_turns(scene, rng, allowed))
        for i, (image, scene) in enumerate(images)
    ]


# ---------------------------------------------------------------- stage 2 (MMEB-train)


def train_row(
    qry: str, qry_image: str, pos_text: str, pos_image: str, neg_text: str = "", neg_image: str = ""
) -> dict:
    return {
        "qry": qry,
        "qry_image_path": qry_image,
        "pos_text": pos_text,
        "pos_image_path": pos_image,
        "neg_text": neg_text,
        "neg_image_path": neg_image,
    }


def main_object(scene: Scene) -> SceneObject:
    """The subject of a classification scene: its only large object."""
    (obj,) = [o for o in scene.objects if o.size == "large"]
    return obj


def random_edit(
    scene: Scene,
    rng: np.random.Generator,
    allowed: frozenset[Pair],
    kinds: Sequence[str] = EDIT_KINDS,
) -> Scene:
    """A one-attribute edit of a random applicable kind (some edit always applies: size never fails)."""
    for kind in _shuffled(rng, kinds):
        edited = edit_scene(scene, kind, rng, allowed)
        if edited is not None:
            return edited[0]
    raise ValueError("no edit applies to this scene")


def build_train(
    rng: np.random.Generator,
    general: Sequence[tuple[str, Scene]],
    cls: Sequence[tuple[str, Scene]],
    allowed: frozenset[Pair],
    bank: ImageBank,
) -> dict[str, list[dict]]:
    """One row per scene and subset. Text targets get a hard negative that differs in one attribute; image
    targets leave the negative empty, as most MMEB-train rows do (in-batch negatives are the default)."""
    subsets: dict[str, list[dict]] = {name: [] for name in TRAIN_SUBSETS}
    for image, scene in cls:
        subject = main_object(scene)
        negative = _pick(rng, one_off_labels(subject, allowed))
        subsets["SynthCls"].append(train_row(CLS_QUERY, image, subject.label, "", negative))
    for image, scene in general:
        qa = ask_any(SEEN_QUESTION_KINDS, scene, rng, allowed)
        assert qa is not None
        query = VQA_QUERY.format(question=qa.question)
        negative = _pick(rng, qa.alternatives) if qa.alternatives else ""
        subsets["SynthVQA"].append(train_row(query, image, qa.answer, "", negative))

        subsets["SynthT2I"].append(
            train_row(T2I_QUERY.format(caption=caption(scene)), "", IMAGE_TARGET, image)
        )
        negative_caption = caption(random_edit(scene, rng, allowed))
        subsets["SynthI2T"].append(train_row(I2T_QUERY, image, caption(scene), "", negative_caption))
        rerendered = bank.path("train", ImageSpec(scene, variant=1))
        subsets["SynthI2I"].append(train_row(I2I_QUERY, image, IMAGE_TARGET, rerendered))
        target = _pick(rng, scene.objects)
        crop = bank.path("train", ImageSpec(scene, crop_cell=target.cell))
        subsets["SynthGrounding"].append(
            train_row(GROUNDING_QUERY.format(label=target.label), image, CROP_TARGET, crop)
        )
    return subsets


# ---------------------------------------------------------------- eval (MMEB-eval)

Candidate = tuple[str, str]  # (text, image path); "" for no image


def assemble(
    positive: Candidate,
    hard: Sequence[Candidate],
    pool: Sequence[Candidate],
    n: int,
    rng: np.random.Generator,
    max_hard: int = MAX_HARD,
) -> list[Candidate]:
    """Positive first, then up to ``max_hard`` hard negatives, then random ones from ``pool`` up to ``n``;
    a candidate equal to one already taken (the positive included) is never added."""
    chosen, taken = [positive], {positive}
    for group, limit in ((_shuffled(rng, hard), max_hard + 1), (_shuffled(rng, pool), n)):
        for candidate in group:
            if len(chosen) >= limit:
                break
            if candidate not in taken:
                chosen.append(candidate)
                taken.add(candidate)
    return chosen


def eval_row(query_text: str, query_image: str, candidates: Sequence[Candidate]) -> dict:
    return {
        "qry_text": query_text,
        "qry_img_path": query_image,
        "tgt_text": [text for text, _ in candidates],
        "tgt_img_path": [image for _, image in candidates],
    }


@dataclass(frozen=True)
class EvalContext:
    spec: EvalSpec
    rng: np.random.Generator
    n_queries: int
    seen_pairs: tuple[Pair, ...]
    held_out: tuple[Pair, ...]
    bank: ImageBank

    @property
    def folder(self) -> str:
        return f"eval/{self.spec.name}"

    @property
    def allowed(self) -> frozenset[Pair]:
        """Pairs any text or image of this dataset may use: IND sets stay inside the training distribution."""
        return frozenset(ALL_PAIRS if self.spec.novelty == "held_out_pairs" else self.seen_pairs)

    def sample(self, **kwargs) -> Scene:
        required = _pick(self.rng, self.held_out) if self.spec.novelty == "held_out_pairs" else None
        return sample_scene(self.rng, self.seen_pairs, required=required, **kwargs)

    def focus(self, scene: Scene) -> SceneObject:
        """The object a query is about: the held-out one in held-out sets, otherwise a random one."""
        if self.spec.novelty == "held_out_pairs":
            return next(o for o in scene.objects if o.pair in self.held_out)
        return _pick(self.rng, scene.objects)

    def image(self, spec: ImageSpec) -> str:
        return self.bank.path(self.folder, spec)

    def edits(self, scene: Scene, kinds: Sequence[str], focus_cell: int | None) -> list[Scene]:
        """Distinct one-attribute edits, in the order of ``kinds``; colour/shape/size edits hit ``focus_cell``."""
        out: list[Scene] = []
        for kind in kinds:
            cell = focus_cell if kind in ("colour", "shape", "size") else None
            edited = edit_scene(scene, kind, self.rng, self.allowed, cell=cell)
            if edited is not None and edited[0] != scene and edited[0] not in out:
                out.append(edited[0])
        return out


def _content(scene: Scene) -> tuple:
    """What text can say about a scene (the background is nuisance)."""
    return scene.objects, scene.word, scene.word_cell


SCENE_EDIT_KINDS = ("colour", "shape", "size", "position", "word", "colour")
OBJECT_EDIT_KINDS = ("colour", "shape", "size", "colour", "shape")


def _build_cls(ctx: EvalContext) -> list[dict]:
    labels = sorted(f"{c} {s}" for c, s in ctx.allowed)
    rows = []
    for _ in range(ctx.n_queries):
        scene = ctx.sample(n_objects=(1, 3), main_large=True)
        subject = main_object(scene)
        hard = [(label, "") for label in one_off_labels(subject, ctx.allowed)]
        pool = [(label, "") for label in labels]
        candidates = assemble((subject.label, ""), hard, pool, N_CLS_CANDIDATES, ctx.rng, max_hard=len(hard))
        rows.append(eval_row(CLS_QUERY, ctx.image(ImageSpec(scene)), candidates))
    return rows


def answer_pool(allowed: frozenset[Pair]) -> list[str]:
    """Every short answer the world can give; random VQA candidates come from here."""
    descriptions = [f"a {size} {c} {s}" for c, s in sorted(allowed) for size in SIZES]
    return [
        *COLOURS,
        *SHAPES,
        *SIZES,
        *POSITIONS,
        *NUMBER_WORDS,
        *WORDS,
        "none",
        "nothing",
        *descriptions,
        *(word_phrase(w) for w in WORDS),
    ]


def _build_vqa(ctx: EvalContext) -> list[dict]:
    kinds = UNSEEN_QUESTION_KINDS if ctx.spec.novelty == "unseen_questions" else SEEN_QUESTION_KINDS
    pool = [(answer, "") for answer in answer_pool(ctx.allowed)]
    rows = []
    for _ in range(ctx.n_queries):
        # Pick the kind first and resample scenes until it applies, so kinds stay balanced.
        kind = _pick(ctx.rng, kinds)
        for _ in range(MAX_RETRIES):
            scene = ctx.sample()
            qa = ask(kind, scene, ctx.rng, ctx.allowed)
            if qa is not None:
                break
        else:
            raise RuntimeError(
                f"{ctx.spec.name}: no scene supports a {kind!r} question after {MAX_RETRIES} tries"
            )
        hard = [(a, "") for a in qa.alternatives]
        candidates = assemble((qa.answer, ""), hard, pool, N_CANDIDATES, ctx.rng)
        rows.append(eval_row(VQA_QUERY.format(question=qa.question), ctx.image(ImageSpec(scene)), candidates))
    return rows


def _build_retrieval(ctx: EvalContext) -> list[dict]:
    """t2i, i2t and i2i: hard negatives are one-attribute edits of the query scene, drawn in the positive's style."""
    family = ctx.spec.family
    variant = 1 if family == "i2i" else 0  # i2i targets are the same scene drawn again with new jitter
    queries = []
    for _ in range(ctx.n_queries):
        scene = ctx.sample()
        focus = ctx.focus(scene).cell if ctx.spec.novelty == "held_out_pairs" else None
        queries.append((scene, ctx.edits(scene, SCENE_EDIT_KINDS, focus)))

    def target(scene: Scene) -> Candidate:
        if family == "i2t":
            return (caption(scene), "")
        return (IMAGE_TARGET, ctx.image(ImageSpec(scene, variant=variant)))

    positives = [target(scene) for scene, _ in queries]
    rows = []
    for i, (scene, edits) in enumerate(queries):
        pool = [
            positives[j]
            for j, (other, _) in enumerate(queries)
            if j != i and _content(other) != _content(scene)
        ]
        candidates = assemble(positives[i], [target(e) for e in edits], pool, N_CANDIDATES, ctx.rng)
        if family == "t2i":
            rows.append(eval_row(T2I_QUERY.format(caption=caption(scene)), "", candidates))
        elif family == "i2t":
            rows.append(eval_row(I2T_QUERY, ctx.image(ImageSpec(scene)), candidates))
        else:
            rows.append(eval_row(I2I_QUERY, ctx.image(ImageSpec(scene)), candidates))
    return rows


def _build_grounding(ctx: EvalContext) -> list[dict]:
    """Hard negatives: crops of the target after a one-attribute edit, and crops of the scene's other objects."""
    queries = []
    for _ in range(ctx.n_queries):
        scene = ctx.sample()
        queries.append((scene, ctx.focus(scene)))

    def crop(scene: Scene, cell: int) -> Candidate:
        return (CROP_TARGET, ctx.image(ImageSpec(scene, crop_cell=cell)))

    positives = [crop(scene, obj.cell) for scene, obj in queries]
    rows = []
    for i, (scene, obj) in enumerate(queries):
        edits = ctx.edits(scene, OBJECT_EDIT_KINDS, obj.cell)
        hard = [crop(e, obj.cell) for e in edits] + [
            crop(scene, o.cell) for o in scene.objects if o is not obj
        ]
        # A crop of the same colour-shape from another scene would be a second right answer.
        pool = [positives[j] for j, (_, other) in enumerate(queries) if j != i and other.pair != obj.pair]
        candidates = assemble(positives[i], hard, pool, N_CANDIDATES, ctx.rng)
        query = GROUNDING_QUERY.format(label=obj.label)
        rows.append(eval_row(query, ctx.image(ImageSpec(scene)), candidates))
    return rows


_BUILDERS: dict[str, Callable[[EvalContext], list[dict]]] = {
    "cls": _build_cls,
    "vqa": _build_vqa,
    "t2i": _build_retrieval,
    "i2t": _build_retrieval,
    "i2i": _build_retrieval,
    "grounding": _build_grounding,
}


def build_eval(ctx: EvalContext) -> list[dict]:
    return _BUILDERS[ctx.spec.family](ctx)


# ---------------------------------------------------------------- the whole world


def build_world(seed: int, size: str) -> WorldPlan:
    """Plan every record and image of the world for ``seed`` and size preset ``size``."""
    if size not in PRESETS:
        raise ValueError(f"unknown size preset {size!r}; expected one of {sorted(PRESETS)}")
    preset = PRESETS[size]
    held_out = choose_held_out(stream(seed, "held_out"))
    seen_pairs = tuple(p for p in ALL_PAIRS if p not in held_out)
    seen = frozenset(seen_pairs)
    plan = WorldPlan(seed=seed, size=size, held_out=held_out, bank=ImageBank())

    plan.stage0 = build_stage0(stream(seed, "stage0"), preset.stage0_scenes, seen_pairs, plan.bank)

    scene_rng = stream(seed, "train_scenes")
    general = [sample_scene(scene_rng, seen_pairs) for _ in range(preset.train_scenes)]
    cls = [
        sample_scene(scene_rng, seen_pairs, n_objects=(1, 3), main_large=True)
        for _ in range(preset.cls_scenes)
    ]
    general_images = [(plan.bank.path("train", ImageSpec(s)), s) for s in general]
    cls_images = [(plan.bank.path("train", ImageSpec(s)), s) for s in cls]

    plan.stage1 = build_stage1(stream(seed, "stage1"), general_images + cls_images, seen)
    plan.train = build_train(stream(seed, "train_rows"), general_images, cls_images, seen, plan.bank)
    for spec in EVAL_SPECS:
        ctx = EvalContext(
            spec, stream(seed, f"eval/{spec.name}"), preset.eval_queries, seen_pairs, held_out, plan.bank
        )
        plan.eval.append((spec, build_eval(ctx)))
    return plan
