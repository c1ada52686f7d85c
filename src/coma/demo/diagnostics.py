"""What a demo model knows about its images, measured on held-out images of the synthetic world.

- **QA accuracy**: the model answers simple questions (one per question kind and image) and an answer counts when
  greedy decoding reproduces it exactly. It is computed teacher-forced: greedy decoding yields the reference
  answer exactly when the argmax at every answer position (and at its closing ``<|im_end|>``) is the reference
  token. The same questions with a blank image measure the text prior; the gap is how much the model uses the
  image. A stage-0 model answers from the whole image (``chat`` layout); a stage-1 model answers through its
  compression tokens only (``compress`` layout under the bottleneck mask), which measures what the tokens hold.
- **Linear probes**: ridge regression (closed form, class-balanced) from the pooled compression-token embedding
  of an image to its scene's attributes (which colours, shapes and cells are present, the object count, whether
  a word is written), fitted on half the images and scored (balanced accuracy) on the other half.
- **Collapse**: the share of the embeddings' variance along their top principal direction (1.0: every image
  maps to one line).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from coma.data.formats import Conversation
from coma.data.images import load_image
from coma.data.synth.scenes import (
    COLOURS,
    N_CELLS,
    POSITIONS,
    SHAPES,
    Scene,
    SceneObject,
    make_scene,
)
from coma.data.synth.tasks import SEEN_QUESTION_KINDS, ask, stream

ALL_PAIRS_ALLOWED = frozenset((colour, shape) for colour in COLOURS for shape in SHAPES)
BLANK_GREY = (128, 128, 128)
PROBE_GROUPS = ("colour", "shape", "position", "count", "word")
RIDGE_LAMBDA = 1.0


@dataclass(frozen=True)
class HeldOutImage:
    path: str  # relative to the world's image root
    scene: Scene


@dataclass(frozen=True)
class QAItem:
    kind: str
    image: str
    question: str
    answer: str


def scene_from_dict(data: dict[str, Any]) -> Scene:
    """The inverse of :meth:`Scene.to_dict` (the rendering style seed is not stored; questions never use it)."""
    objects = [
        SceneObject(obj["shape"], obj["colour"], obj["size"], POSITIONS.index(obj["position"]))
        for obj in data["objects"]
    ]
    word_cell = POSITIONS.index(data["word_position"]) if data.get("word_position") else None
    return make_scene(objects, data.get("word"), word_cell, data["background"], data["texture"], 0)


def world_scenes(world: Path) -> dict[str, Scene]:
    """The scene behind every image of a world (``scenes.jsonl``), by image path; re-rendered variants and crops
    map to the scene they show."""
    scenes = {}
    with (world / "scenes.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            scenes[record["image"]] = scene_from_dict(record["scene"])
    return scenes


def held_out_images(world: Path, limit: int) -> list[HeldOutImage]:
    """The first ``limit`` whole evaluation-side images (no crops, no re-rendered variants): no training stage
    sees them."""
    images = [
        HeldOutImage(path, scene)
        for path, scene in world_scenes(world).items()
        if path.startswith("eval/") and "_crop" not in path and "_v" not in path.rsplit("/", 1)[-1]
    ]
    images.sort(key=lambda image: image.path)
    return images[:limit]


def qa_items(images: Sequence[HeldOutImage], seed: int = 0) -> list[QAItem]:
    """One question of every seen kind about every image (a kind the scene cannot support is skipped)."""
    rng = stream(seed, "diagnostics-qa")
    items = []
    for image in images:
        for kind in SEEN_QUESTION_KINDS:
            qa = ask(kind, image.scene, rng, ALL_PAIRS_ALLOWED)
            if qa is not None:
                items.append(QAItem(kind, image.path, qa.question, qa.answer))
    return items


@torch.inference_mode()
def answer_predictions(
    embedder: Any,
    items: Sequence[QAItem],
    image_root: Path,
    *,
    layout: str,
    blank: bool = False,
    batch_size: int = 64,
) -> list[tuple[list[int], list[int]]]:
    """Per item, the model's argmax token at every position of the reference answer and its ``<|im_end|>``, and
    the reference tokens themselves (teacher-forced). ``blank`` swaps every image for a grey one."""
    from coma.train.stage1_data import Stage1BatchBuilder
    from coma.train.stage1_model import Stage1Objective, next_token_targets

    model = embedder.model
    builder = Stage1BatchBuilder(
        embedder.processor, model.config, layout=layout, image_block=model.adapter.image_block
    )
    objective = Stage1Objective(
        model.backbone, model.adapter, mask_mode="bottleneck" if layout == "compress" else "none"
    )
    model.eval()
    pairs = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        conversations = [
            Conversation(
                f"qa-{start + i}", item.image, ((item.question, item.answer),), "diagnostics", start + i
            )
            for i, item in enumerate(chunk)
        ]
        images = [load_image(item.image, image_root) for item in chunk]
        if blank:
            images = [Image.new("RGB", image.size, BLANK_GREY) for image in images]
        batch = builder.build(conversations, images).tensors
        batch = {key: value.to(embedder.device) for key, value in batch.items()}
        keep, targets = next_token_targets(batch["labels"])
        hidden = objective.last_hidden_states(batch)
        predicted = model.backbone.get_output_embeddings()(hidden[keep]).argmax(dim=-1).tolist()
        targets = targets.tolist()
        offset = 0
        for count in keep.sum(dim=1).tolist():
            pairs.append((predicted[offset : offset + count], targets[offset : offset + count]))
            offset += count
    return pairs


def qa_accuracy(
    embedder: Any, items: Sequence[QAItem], image_root: Path, *, layout: str, blank: bool = False
) -> dict[str, float]:
    """Greedy exact-match accuracy per question kind, and over all items (``all``)."""
    correct: dict[str, list[bool]] = defaultdict(list)
    pairs = answer_predictions(embedder, items, image_root, layout=layout, blank=blank)
    for item, (predicted, target) in zip(items, pairs, strict=True):
        correct[item.kind].append(predicted == target)
    scores = {kind: float(np.mean(values)) for kind, values in correct.items()}
    scores["all"] = float(np.mean([v for values in correct.values() for v in values]))
    return scores


def majority_accuracy(items: Sequence[QAItem]) -> dict[str, float]:
    """Accuracy of always giving each kind's most frequent answer: the best any text-only model can do."""
    answers: dict[str, list[str]] = defaultdict(list)
    for item in items:
        answers[item.kind].append(item.answer)
    scores = {}
    for kind, values in answers.items():
        _, counts = np.unique(values, return_counts=True)
        scores[kind] = float(counts.max() / len(values))
    total = sum(len(values) for values in answers.values())
    scores["all"] = sum(scores[kind] * len(values) for kind, values in answers.items()) / total
    return scores


def attribute_labels(scenes: Sequence[Scene]) -> dict[str, list[np.ndarray]]:
    """Per probe group, the integer label vectors of its tasks (binary presence tasks, or one multi-class task)."""
    colours = [np.array([any(o.colour == c for o in s.objects) for s in scenes], dtype=int) for c in COLOURS]
    shapes = [np.array([any(o.shape == t for o in s.objects) for s in scenes], dtype=int) for t in SHAPES]
    cells = [np.array([s.object_at(cell) is not None for s in scenes], dtype=int) for cell in range(N_CELLS)]
    count = [np.array([len(s.objects) for s in scenes], dtype=int)]
    word = [np.array([s.word is not None for s in scenes], dtype=int)]
    return {"colour": colours, "shape": shapes, "position": cells, "count": count, "word": word}


def ridge_probe_accuracy(
    features: np.ndarray, labels: np.ndarray, train: np.ndarray, lam: float = RIDGE_LAMBDA
) -> float | None:
    """Balanced accuracy on the rows outside ``train`` of a class-balanced ridge classifier fitted on ``train``
    (one-hot targets, argmax prediction). None when the training rows hold a single class."""
    classes = np.unique(labels[train])
    if len(classes) < 2:
        return None
    x = features.astype(np.float64)
    mean, std = x[train].mean(axis=0), x[train].std(axis=0) + 1e-8
    x = np.concatenate([(x - mean) / std, np.ones((len(x), 1))], axis=1)
    targets = (labels[:, None] == classes[None, :]).astype(np.float64)
    frequency = targets[train].mean(axis=0)
    weights = (targets[train] / frequency).sum(axis=1)  # each class weighs as much in total
    xt = x[train]
    gram = xt.T @ (xt * weights[:, None]) + lam * np.eye(x.shape[1])
    coefficients = np.linalg.solve(gram, xt.T @ (targets[train] * weights[:, None]))
    test = np.setdiff1d(np.arange(len(x)), train)
    predicted = classes[(x[test] @ coefficients).argmax(axis=1)]
    truth = labels[test]
    recalls = [float(np.mean(predicted[truth == c] == c)) for c in np.unique(truth)]
    return float(np.mean(recalls))


def probe_scores(embeddings: np.ndarray, scenes: Sequence[Scene]) -> dict[str, float]:
    """Mean balanced probe accuracy per attribute group, fitted on the even rows, scored on the odd ones."""
    train = np.arange(0, len(scenes), 2)
    scores = {}
    for group, tasks in attribute_labels(scenes).items():
        values = [ridge_probe_accuracy(embeddings, labels, train) for labels in tasks]
        values = [value for value in values if value is not None]
        scores[group] = float(np.mean(values)) if values else float("nan")
    return scores


def probe_chance(scenes: Sequence[Scene]) -> dict[str, float]:
    """Balanced accuracy of a constant guess, per group: 1 / (number of classes in the scored rows)."""
    scored = np.arange(1, len(scenes), 2)
    return {
        group: float(np.mean([1.0 / len(np.unique(labels[scored])) for labels in tasks]))
        for group, tasks in attribute_labels(scenes).items()
    }


def top_direction_share(embeddings: np.ndarray) -> float:
    """Share of the total variance along the first principal direction."""
    centred = embeddings.astype(np.float64) - embeddings.mean(axis=0)
    singular = np.linalg.svd(centred, compute_uv=False)
    variance = singular**2
    return float(variance[0] / variance.sum()) if variance.sum() > 0 else 1.0


def image_embeddings(embedder: Any, images: Sequence[HeldOutImage], image_root: Path) -> np.ndarray:
    """Pooled compression-token embeddings of the images alone (no instruction), as stored in an index."""
    inputs = [{"text": "", "image": str(image_root / image.path)} for image in images]
    return embedder.encode(inputs, batch_size=64, show_progress=False)


def model_diagnostics(
    model_path: Path,
    world: Path,
    images: Sequence[HeldOutImage],
    items: Sequence[QAItem],
    *,
    qa_layout: str | None,
) -> dict[str, Any]:
    """Probes and collapse for one model; with ``qa_layout``, its QA accuracy with the image and with a blank one."""
    from coma.embedder import Embedder

    embedder = Embedder.from_pretrained(model_path, device="cpu")
    root = world / "images"
    embeddings = image_embeddings(embedder, images, root)
    result: dict[str, Any] = {
        "probe": probe_scores(embeddings, [image.scene for image in images]),
        "top_direction_share": top_direction_share(embeddings),
    }
    if qa_layout is not None:
        result["qa"] = {
            "image": qa_accuracy(embedder, items, root, layout=qa_layout),
            "blank": qa_accuracy(embedder, items, root, layout=qa_layout, blank=True),
        }
    return result
