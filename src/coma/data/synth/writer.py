"""Write the synthetic world to disk: images, conversations, MMEB-train/eval folders, manifests.

Layout under ``OUT`` (image paths in every file are relative to the image root ``OUT/images``)::

    images/{stage0,train,eval/<Dataset>}/NNNNNN[_v1][_cropK].png
    stage0/conversations.jsonl        stage1/conversations.jsonl
    train/<Subset>/train.jsonl        eval/<Dataset>/test.jsonl        eval/benchmark.yaml
    scenes.jsonl                      (the scene graph behind every image)
    world.json                        (written last: its presence marks a complete world)

Every file goes through ``coma.io``'s atomic writers, and nothing depends on time or hash order, so the same seed
gives byte-identical files.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

from PIL import Image

from coma.data.synth.render import DEFAULT_IMAGE_SIZE, check_image_size, crop_cell, png_bytes, render_scene
from coma.data.synth.scenes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, TEXTURES, WORDS, Scene
from coma.data.synth.tasks import (
    PRESETS,
    SEEN_QUESTION_KINDS,
    UNSEEN_QUESTION_KINDS,
    WorldPlan,
    build_world,
)
from coma.io import atomic_open, atomic_write_text, write_json, write_jsonl

FORMAT_VERSION = 1
# Bumped whenever the same seed and size plan different data (2: a third of the stage-0 records open with a
# question), so caches keyed by it never mix worlds.
GENERATOR_VERSION = 2
IMAGE_ROOT = "images"
# Everything generate_world may create in OUT; a re-run replaces exactly these and nothing else.
WRITE_THREADS = 4
MAX_PENDING_WRITES = 512  # bounds the encoded images held in memory
OWNED_NAMES = frozenset({IMAGE_ROOT, "stage0", "stage1", "train", "eval", "scenes.jsonl", "world.json"})


def _is_owned(name: str) -> bool:
    # ``.world.json.XXXX.tmp`` is what an interrupted atomic write leaves behind.
    return name in OWNED_NAMES or (name.startswith(".") and name.endswith(".tmp"))


def prepare_out_dir(out: Path) -> None:
    """Make ``out`` ready for a fresh world: refuse a folder holding anything we did not write, and clear ours."""
    if not out.exists():
        out.mkdir(parents=True)
        return
    if not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    foreign = sorted(name for name in os.listdir(out) if not _is_owned(name))
    if foreign:
        raise ValueError(
            f"{out}: not empty and not a synthetic world (found {', '.join(foreign[:5])}); choose another --out"
        )
    for name in sorted(os.listdir(out)):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def write_images(plan: WorldPlan, root: Path, image_size: int) -> int:
    """Render every planned image in plan order; crops reuse the full render of their scene.

    Rendering stays on this thread; the atomic writes (one fsync each, the slow part) overlap in a small pool.
    """

    @lru_cache(maxsize=64)
    def full(scene: Scene, variant: int) -> Image.Image:
        return render_scene(scene, image_size, variant)

    def write(path: Path, data: bytes) -> None:
        with atomic_open(path, "wb", fsync=False) as handle:
            handle.write(data)

    pending: list[Future] = []
    with ThreadPoolExecutor(max_workers=WRITE_THREADS) as pool:
        for path, spec in plan.bank.specs.items():
            image = full(spec.scene, spec.variant)
            if spec.crop_cell is not None:
                image = crop_cell(image, spec.crop_cell, image_size)
            pending.append(pool.submit(write, root / path, png_bytes(image)))
            if len(pending) >= MAX_PENDING_WRITES:
                for future in pending:
                    future.result()
                pending.clear()
        for future in pending:
            future.result()
    return len(plan.bank.specs)


def scene_records(plan: WorldPlan) -> list[dict]:
    """The scene graph behind each image; a crop also names the object it shows."""
    records = []
    for path, spec in plan.bank.specs.items():
        record = {"image": path, "variant": spec.variant, "scene": spec.scene.to_dict()}
        if spec.crop_cell is not None:
            obj = spec.scene.object_at(spec.crop_cell)
            record["crop"] = {"position": POSITIONS[spec.crop_cell], "object": obj.to_dict() if obj else None}
        records.append(record)
    return records


def benchmark_yaml(plan: WorldPlan) -> str:
    lines = ["name: coma-synth", "format_rule: mmeb-v1", "datasets:"]
    lines += [f"  - {{name: {s.name}, meta_task: {s.meta_task}, split: {s.split}}}" for s, _ in plan.eval]
    return "\n".join(lines) + "\n"


def _image_counts(plan: WorldPlan) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in plan.bank.specs:
        top = path.split("/", 1)[0]
        counts[top] = counts.get(top, 0) + 1
    return {**dict(sorted(counts.items())), "total": len(plan.bank.specs)}


def world_manifest(plan: WorldPlan, image_size: int, files: dict[str, int]) -> dict:
    return {
        "generator": "coma.data.synth",
        "format_version": FORMAT_VERSION,
        "generator_version": GENERATOR_VERSION,
        "seed": plan.seed,
        "size": plan.size,
        "preset": asdict(PRESETS[plan.size]),
        "image_size": image_size,
        "image_root": IMAGE_ROOT,
        "files": files,
        "images": _image_counts(plan),
        "vocabulary": {
            "shapes": list(SHAPES),
            "colours": list(COLOURS),
            "sizes": list(SIZES),
            "positions": list(POSITIONS),
            "words": list(WORDS),
            "backgrounds": list(BACKGROUNDS),
            "textures": list(TEXTURES),
        },
        "held_out_pairs": [{"colour": c, "shape": s} for c, s in plan.held_out],
        "held_out_labels": [f"{c} {s}" for c, s in plan.held_out],
        "question_kinds": {"seen": list(SEEN_QUESTION_KINDS), "unseen": list(UNSEEN_QUESTION_KINDS)},
        "train_subsets": list(plan.train),
        "eval_datasets": [
            {
                "name": s.name,
                "family": s.family,
                "meta_task": s.meta_task,
                "split": s.split,
                "novelty": s.novelty,
            }
            for s, _ in plan.eval
        ],
    }


def generate_world(
    out_dir: str | os.PathLike, *, seed: int = 0, size: str = "default", image_size: int = DEFAULT_IMAGE_SIZE
) -> dict:
    """Write the synthetic world for ``seed`` to ``out_dir`` and return the content of its ``world.json``."""
    check_image_size(image_size)
    plan = build_world(seed, size)
    out = Path(out_dir)
    prepare_out_dir(out)
    write_images(plan, out / IMAGE_ROOT, image_size)
    files: dict[str, int] = {
        "stage0/conversations.jsonl": write_jsonl(out / "stage0" / "conversations.jsonl", plan.stage0),
        "stage1/conversations.jsonl": write_jsonl(out / "stage1" / "conversations.jsonl", plan.stage1),
    }
    for name, rows in plan.train.items():
        files[f"train/{name}/train.jsonl"] = write_jsonl(out / "train" / name / "train.jsonl", rows)
    for spec, rows in plan.eval:
        files[f"eval/{spec.name}/test.jsonl"] = write_jsonl(out / "eval" / spec.name / "test.jsonl", rows)
    atomic_write_text(out / "eval" / "benchmark.yaml", benchmark_yaml(plan))
    files["scenes.jsonl"] = write_jsonl(out / "scenes.jsonl", scene_records(plan))
    manifest = world_manifest(plan, image_size, files)
    write_json(out / "world.json", manifest)
    return manifest
