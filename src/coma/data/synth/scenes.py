"""Scene graphs of the synthetic world: vocabularies, sampling, one-attribute edits and their language.

A scene is a handful of objects on a 3 x 3 grid (at most one object per cell), an optional rendered word in a
free cell, and a background that is pure nuisance (never mentioned in text). Everything is a frozen dataclass, so
scenes are hashable and can key image files; every random choice takes an explicit ``numpy.random.Generator``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = (
    "top left",
    "top middle",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom middle",
    "bottom right",
)
# Three-letter words that share no token with the attribute vocabularies, so text never leaks an attribute.
WORDS: tuple[str, ...] = ("cat", "dog", "sun", "map", "key", "box", "cup", "pen", "hat", "fox", "owl", "bus")
BACKGROUNDS: tuple[str, ...] = ("black", "charcoal", "navy", "forest", "maroon", "brown")
TEXTURES: tuple[str, ...] = ("plain", "stripes", "checker", "dots", "grain")
NUMBER_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
GRID = 3
N_CELLS = GRID * GRID

Pair = tuple[str, str]  # (colour, shape)
ALL_PAIRS: tuple[Pair, ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
EDIT_KINDS: tuple[str, ...] = ("colour", "shape", "size", "position", "word")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cell: int

    @property
    def pair(self) -> Pair:
        return (self.colour, self.shape)

    @property
    def label(self) -> str:
        """Class label, e.g. ``red circle``."""
        return f"{self.colour} {self.shape}"

    @property
    def description(self) -> str:
        """Noun phrase, e.g. ``a large red circle``."""
        return f"a {self.size} {self.colour} {self.shape}"

    def to_dict(self) -> dict:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "position": POSITIONS[self.cell],
        }


@dataclass(frozen=True)
class Scene:
    """One scene graph; ``objects`` are kept sorted by cell so equal scenes compare (and hash) equal."""

    objects: tuple[SceneObject, ...]
    word: str | None
    word_cell: int | None
    background: str
    texture: str
    style_seed: int

    def object_at(self, cell: int) -> SceneObject | None:
        for obj in self.objects:
            if obj.cell == cell:
                return obj
        return None

    def pairs(self) -> tuple[Pair, ...]:
        return tuple(obj.pair for obj in self.objects)

    def free_cells(self) -> list[int]:
        """Cells holding neither an object nor the word."""
        taken = {obj.cell for obj in self.objects} | (
            {self.word_cell} if self.word_cell is not None else set()
        )
        return [cell for cell in range(N_CELLS) if cell not in taken]

    def to_dict(self) -> dict:
        return {
            "objects": [obj.to_dict() for obj in self.objects],
            "word": self.word,
            "word_position": None if self.word_cell is None else POSITIONS[self.word_cell],
            "background": self.background,
            "texture": self.texture,
        }


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def make_scene(
    objects: Sequence[SceneObject],
    word: str | None,
    word_cell: int | None,
    background: str,
    texture: str,
    style_seed: int,
) -> Scene:
    """Build a scene, checking the invariants every question generator relies on."""
    cells = [obj.cell for obj in objects]
    if len(set(cells)) != len(cells) or (word_cell is not None and word_cell in cells):
        raise ValueError(f"two things share a cell: objects at {cells}, word at {word_cell}")
    if len({obj.pair for obj in objects}) != len(objects):
        raise ValueError("a colour-shape pair appears twice in one scene (labels must be unique)")
    if (word is None) != (word_cell is None):
        raise ValueError("word and word_cell must be given together")
    return Scene(
        tuple(sorted(objects, key=lambda o: o.cell)), word, word_cell, background, texture, style_seed
    )


def choose_held_out(rng: np.random.Generator, n: int = len(SHAPES)) -> tuple[Pair, ...]:
    """Colour-shape pairs kept out of every training-side image: each shape and colour is held out at most once,
    so every single attribute is still seen in training and only the combination is new."""
    if not 0 < n <= min(len(SHAPES), len(COLOURS)):
        raise ValueError(f"number of held-out pairs must be in 1..{min(len(SHAPES), len(COLOURS))}, got {n}")
    colours = rng.permutation(len(COLOURS))
    shapes = rng.permutation(len(SHAPES))
    return tuple(sorted((COLOURS[colours[i]], SHAPES[shapes[i]]) for i in range(n)))


def sample_scene(
    rng: np.random.Generator,
    pairs: Sequence[Pair],
    *,
    n_objects: tuple[int, int] = (2, 4),
    required: Pair | None = None,
    main_large: bool = False,
    word_prob: float = 0.5,
) -> Scene:
    """Sample a scene whose objects use only ``pairs`` (plus ``required``, which becomes the first object).

    ``main_large`` makes the first object the only large one: the subject of a classification image.
    """
    lo, hi = n_objects
    n = int(rng.integers(lo, hi + 1))
    cells = [int(c) for c in rng.permutation(N_CELLS)[:n]]
    chosen: list[Pair] = [required] if required is not None else []
    pool = [p for p in pairs if p not in chosen]
    for index in rng.permutation(len(pool))[: n - len(chosen)]:
        chosen.append(pool[int(index)])
    if len(chosen) < n:
        raise ValueError(f"only {len(pool)} colour-shape pairs available for a {n}-object scene")
    objects = []
    for i, ((colour, shape), cell) in enumerate(zip(chosen, cells, strict=True)):
        size = ("large" if i == 0 else "small") if main_large else _pick(rng, SIZES)
        objects.append(SceneObject(shape=shape, colour=colour, size=size, cell=cell))
    word = word_cell = None
    free = [c for c in range(N_CELLS) if c not in cells]
    if free and rng.random() < word_prob:
        word, word_cell = _pick(rng, WORDS), _pick(rng, free)
    return make_scene(
        objects, word, word_cell, _pick(rng, BACKGROUNDS), _pick(rng, TEXTURES), int(rng.integers(2**31 - 1))
    )


def edit_scene(
    scene: Scene,
    kind: str,
    rng: np.random.Generator,
    allowed: frozenset[Pair],
    cell: int | None = None,
) -> tuple[Scene, int] | None:
    """Change exactly one attribute of one thing in ``scene``; returns (new scene, cell of the changed thing).

    ``cell`` picks the object to change (default: a random one); ``word`` edits replace or add the word.
    Returns None when no valid edit of that kind exists (e.g. every other colour would repeat a pair).
    """
    if kind == "word":
        if scene.word is not None:
            word = _pick(rng, [w for w in WORDS if w != scene.word])
            return replace(scene, word=word), scene.word_cell
        free = scene.free_cells()
        if not free:
            return None
        new_cell = _pick(rng, free)
        return replace(scene, word=_pick(rng, WORDS), word_cell=new_cell), new_cell
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")
    target = scene.object_at(cell) if cell is not None else _pick(rng, scene.objects)
    if target is None:
        raise ValueError(f"no object at cell {cell}")
    others = [obj for obj in scene.objects if obj is not target]
    taken = {obj.pair for obj in others}
    if kind == "colour":
        options = [replace(target, colour=c) for c in COLOURS if c != target.colour]
    elif kind == "shape":
        options = [replace(target, shape=s) for s in SHAPES if s != target.shape]
    elif kind == "size":
        options = [replace(target, size="small" if target.size == "large" else "large")]
    else:
        options = [replace(target, cell=c) for c in scene.free_cells()]
    options = [o for o in options if o.pair in allowed and o.pair not in taken]
    if not options:
        return None
    new = _pick(rng, options)
    return make_scene(
        [*others, new], scene.word, scene.word_cell, scene.background, scene.texture, scene.style_seed
    ), new.cell


def at_phrase(cell: int) -> str:
    return "in the center" if POSITIONS[cell] == "center" else f"at the {POSITIONS[cell]}"


def join_phrases(parts: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def word_phrase(word: str) -> str:
    return f'the word "{word}"'


def caption(scene: Scene) -> str:
    """Full description in reading order; it names every object and the word, so it identifies the scene."""
    things: list[tuple[int, str]] = [
        (obj.cell, f"{obj.description} {at_phrase(obj.cell)}") for obj in scene.objects
    ]
    if scene.word is not None and scene.word_cell is not None:
        things.append((scene.word_cell, f"{word_phrase(scene.word)} {at_phrase(scene.word_cell)}"))
    return join_phrases([text for _, text in sorted(things)])


def object_list(scene: Scene) -> str:
    """The objects without positions, e.g. ``a large red circle and a small blue square``."""
    return join_phrases([obj.description for obj in scene.objects])


def refer(scene: Scene, target: SceneObject, exclude: str) -> str:
    """Shortest unambiguous referring expression for ``target`` that does not use attribute ``exclude``.

    Tries the bare noun, then colour, size, both, and finally the position, which is always unique. Colour and
    shape together are unique too (make_scene checks it), so excluding the position never needs the fallback.
    """
    noun = "object" if exclude == "shape" else target.shape
    same_noun = [o for o in scene.objects if exclude == "shape" or o.shape == target.shape]
    for use_colour, use_size in ((False, False), (True, False), (False, True), (True, True)):
        if (use_colour and exclude == "colour") or (use_size and exclude == "size"):
            continue
        matches = [
            o
            for o in same_noun
            if (not use_colour or o.colour == target.colour) and (not use_size or o.size == target.size)
        ]
        if len(matches) == 1:
            adjectives = ([target.size] if use_size else []) + ([target.colour] if use_colour else [])
            return " ".join(["the", *adjectives, noun])
    return f"the {noun} {at_phrase(target.cell)}"


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x")) else "s")
