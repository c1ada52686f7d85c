"""The synthetic world: determinism, on-disk formats (checked with the real readers), candidate lists, held-out
attribute combinations, and the scene-graph logic behind them."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from itertools import product
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coma.cli import main as cli_main
from coma.data.formats import read_conversations, read_mmeb_eval_dataset, read_mmeb_train_subset
from coma.data.images import resolve_image_path
from coma.data.synth import generate_world
from coma.data.synth.render import DEFAULT_IMAGE_SIZE, cell_box, crop_cell, render_scene
from coma.data.synth.scenes import (
    ALL_PAIRS,
    BACKGROUNDS,
    COLOURS,
    N_CELLS,
    POSITIONS,
    SHAPES,
    SIZES,
    WORDS,
    SceneObject,
    choose_held_out,
    edit_scene,
    make_scene,
    plural,
    refer,
    sample_scene,
)
from coma.data.synth.tasks import EVAL_SPECS, TRAIN_SUBSETS, ImageBank, ImageSpec, assemble

IMAGE_TOKEN = "<|image_1|>"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict, float]:
    out = tmp_path_factory.mktemp("world") / "w"
    start = time.perf_counter()
    manifest = generate_world(out, seed=0, size="tiny")
    return out, manifest, time.perf_counter() - start


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _scenes(out: Path) -> dict[str, dict]:
    return {record["image"]: record for record in _jsonl(out / "scenes.jsonl")}


def _training_side(out: Path) -> tuple[list[str], list[str]]:
    """Every text and every image path in stage-0, stage-1 and MMEB-train files."""
    texts, images = [], []
    for stage in ("stage0", "stage1"):
        for record in _jsonl(out / stage / "conversations.jsonl"):
            images.append(record["image"])
            texts += [turn["value"] for turn in record["conversations"]]
    for subset in TRAIN_SUBSETS:
        for row in _jsonl(out / "train" / subset / "train.jsonl"):
            texts += [row["qry"], row["pos_text"], row["neg_text"]]
            images += [row["qry_image_path"], row["pos_image_path"], row["neg_image_path"]]
    return texts, [image for image in images if image]


def _pairs_in(record: dict) -> set[tuple[str, str]]:
    return {(o["colour"], o["shape"]) for o in record["scene"]["objects"]}


# ---------------------------------------------------------------- determinism and speed


def test_tiny_preset_is_fast(world):
    _, _, seconds = world
    assert seconds < 10.0, f"tiny preset took {seconds:.1f} s"


def test_same_seed_gives_byte_identical_files_and_other_seeds_differ(world, tmp_path):
    out, manifest, _ = world
    generate_world(tmp_path / "again", seed=0, size="tiny")
    first, again = _files(out), _files(tmp_path / "again")
    assert first.keys() == again.keys()
    assert [name for name in first if first[name] != again[name]] == []

    other = generate_world(tmp_path / "other", seed=1, size="tiny")
    changed = _files(tmp_path / "other")
    assert other["seed"] == 1 and manifest["seed"] == 0
    for name in ("train/SynthCls/train.jsonl", "eval/SynthT2I/test.jsonl", "images/train/000000.png"):
        assert changed[name] != first[name], name


def test_files_do_not_depend_on_the_hash_seed_of_the_process(world, tmp_path):
    # Set/dict iteration order changes with PYTHONHASHSEED; a fresh process with another seed must agree.
    out, _, _ = world
    code = "import sys; from coma.data.synth import generate_world; generate_world(sys.argv[1], size='tiny')"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "w")], check=True, env=env)
    assert _files(tmp_path / "w") == _files(out)


def test_rerun_replaces_a_previous_world_and_refuses_foreign_folders(tmp_path):
    out = tmp_path / "w"
    generate_world(out, seed=0, size="tiny")
    (out / "eval" / "Stale").mkdir()
    generate_world(out, seed=0, size="tiny")
    assert not (out / "eval" / "Stale").exists()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="notes.txt"):
        generate_world(foreign, seed=0, size="tiny")
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="size preset"):
        generate_world(tmp_path / "x", size="huge")
    with pytest.raises(ValueError, match="image size"):
        generate_world(tmp_path / "y", image_size=16)


# ---------------------------------------------------------------- formats


def test_manifest_matches_files(world):
    out, manifest, _ = world
    assert json.loads((out / "world.json").read_text()) == manifest
    for name, count in manifest["files"].items():
        assert len(_jsonl(out / name)) == count, name
    assert manifest["images"]["total"] == sum(1 for _ in (out / "images").rglob("*.png"))
    assert len(manifest["held_out_pairs"]) == 6
    assert manifest["image_size"] == DEFAULT_IMAGE_SIZE and manifest["image_root"] == "images"
    benchmark = (out / "eval" / "benchmark.yaml").read_text().splitlines()
    assert benchmark[:3] == ["name: coma-synth", "format_rule: mmeb-v1", "datasets:"]
    entries = [
        re.fullmatch(r"  - \{name: (\w+), meta_task: (\w+), split: (IND|OOD)\}", line)
        for line in benchmark[3:]
    ]
    assert all(entries)
    listed = {m.group(1): (m.group(2), m.group(3)) for m in entries}
    assert listed == {s.name: (s.meta_task, s.split) for s in EVAL_SPECS}
    assert {meta for meta, _ in listed.values()} == {"classification", "vqa", "retrieval", "grounding"}
    for meta in ("classification", "vqa", "retrieval", "grounding"):
        assert {split for m, split in listed.values() if m == meta} == {"IND", "OOD"}


def test_conversations_read_with_the_real_reader(world):
    out, manifest, _ = world
    stage0 = read_conversations(out / "stage0" / "conversations.jsonl")
    stage1 = read_conversations(out / "stage1" / "conversations.jsonl")
    assert len(stage0) == manifest["files"]["stage0/conversations.jsonl"] > 0
    assert len(stage1) == manifest["files"]["stage1/conversations.jsonl"] > 0
    assert all(3 <= len(c.turns) <= 4 for c in stage0)
    assert all(3 <= len(c.turns) <= 5 for c in stage1)
    assert len({c.id for c in stage0 + stage1}) == len(stage0) + len(stage1)
    for conversation in stage1:
        questions = [q for q, _ in conversation.turns]
        assert len(set(questions)) == len(questions)
        assert all(a.strip() for _, a in conversation.turns)
    raw = _jsonl(out / "stage1" / "conversations.jsonl")[0]["conversations"]
    assert raw[0]["value"].startswith("<image>\n")
    assert all("<image>" not in turn["value"] for turn in raw[1:])


def test_train_subsets_read_with_the_real_reader(world):
    out, manifest, _ = world
    for subset in TRAIN_SUBSETS:
        rows = read_mmeb_train_subset(out / "train" / subset)
        assert len(rows) == manifest["files"][f"train/{subset}/train.jsonl"] > 0
        raw = _jsonl(out / "train" / subset / "train.jsonl")
        assert all(
            list(r) == ["qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path"]
            for r in raw
        )
        for row in rows:
            for text, image in ((row.qry, row.qry_image_path), (row.pos_text, row.pos_image_path)):
                assert (IMAGE_TOKEN in text) == bool(image), (subset, row.row)
            if row.neg_image_path:
                assert IMAGE_TOKEN in row.neg_text
            assert (row.pos_text, row.pos_image_path) != (row.neg_text, row.neg_image_path)
    cls = read_mmeb_train_subset(out / "train" / "SynthCls")
    assert cls[0].qry == "<|image_1|>\nRepresent the given image for classification"
    assert re.fullmatch(r"\w+ \w+", cls[0].pos_text)


def test_eval_datasets_read_with_the_real_reader_and_candidates_are_sound(world):
    out, manifest, _ = world
    for spec in EVAL_SPECS:
        queries = read_mmeb_eval_dataset(out / "eval" / spec.name)
        assert len(queries) == manifest["files"][f"eval/{spec.name}/test.jsonl"] > 0
        for query in queries:
            where = (spec.name, query.row)
            assert 8 <= len(query.tgt_text) <= 20, where
            assert (IMAGE_TOKEN in query.qry_text) == bool(query.qry_img_path), where
            contents = []
            for text, image in zip(query.tgt_text, query.tgt_img_path, strict=True):
                assert (IMAGE_TOKEN in text) == bool(image), where
                digest = hashlib.sha256((out / "images" / image).read_bytes()).hexdigest() if image else ""
                contents.append((text, digest))
            # No candidate repeats another (the positive included), by text and by image content.
            assert len(set(contents)) == len(contents), where


def test_every_image_resolves_inside_the_root_and_has_the_configured_size(world):
    out, _, _ = world
    root = out / "images"
    referenced: set[str] = set(_training_side(out)[1])
    for spec in EVAL_SPECS:
        for row in _jsonl(out / "eval" / spec.name / "test.jsonl"):
            referenced |= {p for p in [row["qry_img_path"], *row["tgt_img_path"]] if p}
    scenes = _scenes(out)
    assert referenced <= scenes.keys()
    for path in sorted(referenced):
        resolved = resolve_image_path(path, root)
        with Image.open(resolved) as image:
            assert image.size == (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE) and image.mode == "RGB", path


# ---------------------------------------------------------------- held-out combinations and OOD


def test_held_out_pairs_never_appear_on_the_training_side(world):
    out, manifest, _ = world
    held = {(p["colour"], p["shape"]) for p in manifest["held_out_pairs"]}
    scenes = _scenes(out)
    texts, images = _training_side(out)
    assert images and all(path.split("/")[0] in ("stage0", "train") for path in images)
    for path in images:
        assert not _pairs_in(scenes[path]) & held, path
    for label in manifest["held_out_labels"]:
        assert not [text for text in texts if label in text], label
    # Every other pair and every single attribute is still seen.
    seen = set().union(*(_pairs_in(scenes[path]) for path in images))
    assert {c for c, _ in held} <= {c for c, _ in seen} and {s for _, s in held} <= {s for _, s in seen}


def test_ood_datasets_use_held_out_pairs_and_ind_datasets_do_not(world):
    out, manifest, _ = world
    held = {(p["colour"], p["shape"]) for p in manifest["held_out_pairs"]}
    labels = set(manifest["held_out_labels"])
    scenes = _scenes(out)
    for spec in EVAL_SPECS:
        rows = _jsonl(out / "eval" / spec.name / "test.jsonl")
        query_pairs = [_pairs_in(scenes[r["qry_img_path"] or r["tgt_img_path"][0]]) for r in rows]
        if spec.novelty == "held_out_pairs":
            assert all(pairs & held for pairs in query_pairs), spec.name
        else:
            assert not any(pairs & held for pairs in query_pairs), spec.name
            texts = [t for r in rows for t in [r["qry_text"], *r["tgt_text"]]]
            assert not [t for t in texts if any(label in t for label in labels)], spec.name
    for row in _jsonl(out / "eval" / "SynthClsHeldout" / "test.jsonl"):
        assert row["tgt_text"][0] in labels
    for row in _jsonl(out / "eval" / "SynthGroundingHeldout" / "test.jsonl"):
        assert row["qry_text"].rsplit(": ", 1)[1] in labels


def _template(question: str) -> str:
    """A question with its vocabulary words blanked, so questions of one kind share a template."""
    vocabulary = {*COLOURS, *SHAPES, *map(plural, SHAPES), *SIZES, *WORDS, "object", "objects"}
    vocabulary |= {w for p in POSITIONS for w in p.split()}
    return " ".join("X" if w.strip("?") in vocabulary else w for w in question.split())


def test_unseen_question_types_are_unseen_in_training(world):
    out, _, _ = world
    prefix = "<|image_1|>\nRepresent the given image with the following question: "
    train_questions = [t.removeprefix("<image>\n") for t in _training_side(out)[0]]
    train_questions += [t.removeprefix(prefix) for t in _training_side(out)[0] if t.startswith(prefix)]
    seen_templates = {_template(q) for q in train_questions if q.endswith("?")}
    new = {
        _template(r["qry_text"].removeprefix(prefix))
        for r in _jsonl(out / "eval" / "SynthVQANewQ" / "test.jsonl")
    }
    ind = {
        _template(r["qry_text"].removeprefix(prefix))
        for r in _jsonl(out / "eval" / "SynthVQA" / "test.jsonl")
    }
    assert new and ind and not new & seen_templates and not new & ind


# ---------------------------------------------------------------- hard negatives


def _one_attribute_apart(a: dict, b: dict) -> bool:
    """Brute force: do two scene records differ in exactly one attribute of one thing?"""
    objs_a = {o["position"]: (o["shape"], o["colour"], o["size"]) for o in a["objects"]}
    objs_b = {o["position"]: (o["shape"], o["colour"], o["size"]) for o in b["objects"]}
    word_a, word_b = (a["word"], a["word_position"]), (b["word"], b["word_position"])
    if objs_a == objs_b:
        return word_a != word_b and (word_a[0] is None or word_a[1] == word_b[1])
    if word_a != word_b:
        return False
    if objs_a.keys() == objs_b.keys():
        diffs = [sum(x != y for x, y in zip(objs_a[p], objs_b[p], strict=True)) for p in objs_a]
        return sorted(diffs)[-1] == 1 and sum(diffs) == 1
    moved_from, moved_to = objs_a.keys() - objs_b.keys(), objs_b.keys() - objs_a.keys()
    if len(moved_from) == len(moved_to) == 1:
        (p,), (q,) = moved_from, moved_to
        return objs_a[p] == objs_b[q] and all(objs_a[k] == objs_b[k] for k in objs_a.keys() - {p})
    return False


def test_retrieval_lists_hold_one_attribute_hard_negatives(world):
    out, _, _ = world
    scenes = _scenes(out)
    for name in ("SynthT2I", "SynthI2I", "SynthT2IHeldout"):
        for row in _jsonl(out / "eval" / name / "test.jsonl"):
            positive = scenes[row["tgt_img_path"][0]]["scene"]
            hard = [p for p in row["tgt_img_path"][1:] if _one_attribute_apart(positive, scenes[p]["scene"])]
            assert len(hard) >= 3, name
            assert all(scenes[p]["scene"] != positive for p in row["tgt_img_path"][1:]), name
    for row in _jsonl(out / "eval" / "SynthI2I" / "test.jsonl"):
        query, positive = scenes[row["qry_img_path"]], scenes[row["tgt_img_path"][0]]
        assert query["scene"] == positive["scene"] and (query["variant"], positive["variant"]) == (0, 1)


def test_grounding_and_classification_lists_hold_one_attribute_hard_negatives(world):
    out, _, _ = world
    scenes = _scenes(out)
    for name in ("SynthGrounding", "SynthGroundingHeldout"):
        for row in _jsonl(out / "eval" / name / "test.jsonl"):
            crops = [scenes[p]["crop"]["object"] for p in row["tgt_img_path"]]
            positive = crops[0]
            assert f"{positive['colour']} {positive['shape']}" == row["qry_text"].rsplit(": ", 1)[1]
            assert positive in scenes[row["qry_img_path"]]["scene"]["objects"]
            apart = [sum(c[k] != positive[k] for k in ("colour", "shape", "size")) for c in crops[1:]]
            assert apart.count(1) >= 2 and 0 not in apart, name
    for name in ("SynthCls", "SynthClsHeldout"):
        for row in _jsonl(out / "eval" / name / "test.jsonl"):
            colour, shape = row["tgt_text"][0].split()
            assert len(row["tgt_text"]) == 16
            apart = [(c != colour) + (s != shape) for c, s in (t.split() for t in row["tgt_text"][1:])]
            assert apart.count(1) >= 8 and 0 not in apart
            main = [o for o in scenes[row["qry_img_path"]]["scene"]["objects"] if o["size"] == "large"]
            assert [(o["colour"], o["shape"]) for o in main] == [(colour, shape)]


def test_vqa_count_answers_match_the_scene(world):
    out, _, _ = world
    scenes = _scenes(out)
    numbers = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    checked = 0
    for name in ("SynthVQA", "SynthVQANewQ"):
        for row in _jsonl(out / "eval" / name / "test.jsonl"):
            objects = scenes[row["qry_img_path"]]["scene"]["objects"]
            question, answer = row["qry_text"].rsplit(": ", 1)[1], row["tgt_text"][0]
            assert answer not in row["tgt_text"][1:]
            if m := re.fullmatch(r"How many (\w+ )?objects are there\?", question):
                key = (m.group(1) or "").strip()
                n = sum(key in ("", o["colour"], o["size"]) for o in objects)
            elif m := re.fullmatch(r"How many objects are in the (\w+) (row|column)\?", question):
                index = {"top": 0, "left": 0, "middle": 1, "bottom": 2, "right": 2}[m.group(1)]
                axis = 0 if m.group(2) == "row" else 1
                n = sum(divmod(POSITIONS.index(o["position"]), 3)[axis] == index for o in objects)
            else:
                continue
            assert answer == numbers[n], (name, question)
            checked += 1
    assert checked > 0


# ---------------------------------------------------------------- scene graphs and rendering


def test_held_out_choice_keeps_every_attribute():
    held = choose_held_out(np.random.default_rng(3))
    assert len(held) == 6 and set(held) <= set(ALL_PAIRS)
    assert len({s for _, s in held}) == 6 and len({c for c, _ in held}) == 6


def test_sampled_scenes_respect_pairs_and_cells():
    rng = np.random.default_rng(0)
    pairs = ALL_PAIRS[:10]
    for _ in range(200):
        scene = sample_scene(rng, pairs)
        assert 2 <= len(scene.objects) <= 4
        assert set(scene.pairs()) <= set(pairs) and len(set(scene.pairs())) == len(scene.objects)
        cells = [o.cell for o in scene.objects] + ([scene.word_cell] if scene.word is not None else [])
        assert len(set(cells)) == len(cells)
    main = sample_scene(rng, pairs, n_objects=(1, 3), main_large=True, required=ALL_PAIRS[-1])
    assert [o.pair for o in main.objects if o.size == "large"] == [ALL_PAIRS[-1]]


def test_edits_change_exactly_one_attribute():
    rng = np.random.default_rng(1)
    allowed = frozenset(ALL_PAIRS)
    for _ in range(100):
        scene = sample_scene(rng, ALL_PAIRS)
        for kind in ("colour", "shape", "size", "position", "word"):
            edited = edit_scene(scene, kind, rng, allowed)
            assert edited is not None
            assert _one_attribute_apart(scene.to_dict(), edited[0].to_dict()), kind
            assert edited[0].style_seed == scene.style_seed


def test_referring_expressions_pick_exactly_one_object():
    rng = np.random.default_rng(2)
    pattern = re.compile(r"the (?:(small|large) )?(?:(\w+) )?(\w+)(?: (?:at|in) the (.+))?")
    for _ in range(300):
        scene = sample_scene(rng, ALL_PAIRS)
        for obj, exclude in product(scene.objects, ("colour", "shape", "size", "position")):
            size, colour, noun, position = pattern.fullmatch(refer(scene, obj, exclude)).groups()
            assert {"colour": colour, "shape": None if noun == "object" else noun, "size": size}.get(
                exclude
            ) is None
            assert exclude != "position" or position is None
            matches = [
                o
                for o in scene.objects
                if (size is None or o.size == size)
                and (colour is None or o.colour == colour)
                and (noun == "object" or o.shape == noun)
                and (position is None or POSITIONS[o.cell] == position)
            ]
            assert matches == [obj]


def test_objects_stay_inside_their_cell():
    for shape, size, seed, size_px in product(SHAPES, SIZES, range(8), (48, 112)):
        cell = seed % N_CELLS
        background = BACKGROUNDS[seed % len(BACKGROUNDS)]
        empty = make_scene([], None, None, background, "plain", seed)
        scene = make_scene([SceneObject(shape, "white", size, cell)], None, None, background, "plain", seed)
        changed = np.any(
            np.asarray(render_scene(scene, size_px)) != np.asarray(render_scene(empty, size_px)), axis=2
        )
        ys, xs = np.nonzero(changed)
        left, top, right, bottom = cell_box(cell, size_px)
        assert len(ys) > 0
        assert left <= xs.min() and xs.max() < right and top <= ys.min() and ys.max() < bottom, (shape, size)


def test_words_stay_inside_their_cell():
    for word, seed, size_px in product(WORDS, range(6), (48, 112, 224)):
        cell = (seed * 5) % N_CELLS
        empty = make_scene([], None, None, "navy", "plain", seed)
        scene = make_scene([], word, cell, "navy", "plain", seed)
        changed = np.any(
            np.asarray(render_scene(scene, size_px)) != np.asarray(render_scene(empty, size_px)), axis=2
        )
        ys, xs = np.nonzero(changed)
        left, top, right, bottom = cell_box(cell, size_px)
        assert len(ys) > 0
        assert left <= xs.min() and xs.max() < right and top <= ys.min() and ys.max() < bottom, (
            word,
            size_px,
        )


def test_rendering_is_deterministic_and_variants_differ():
    scene = sample_scene(np.random.default_rng(5), ALL_PAIRS)
    a, b = render_scene(scene, 64), render_scene(scene, 64)
    assert a.size == (64, 64) and a.tobytes() == b.tobytes()
    assert render_scene(scene, 64, variant=1).tobytes() != a.tobytes()
    assert crop_cell(render_scene(scene, 150), scene.objects[0].cell, 150).size == (150, 150)


def test_image_bank_shares_equal_specs_and_assemble_never_repeats():
    scene = sample_scene(np.random.default_rng(6), ALL_PAIRS)
    bank = ImageBank()
    first = bank.path("train", ImageSpec(scene))
    assert bank.path("train", ImageSpec(scene)) == first == "train/000000.png"
    assert bank.path("train", ImageSpec(scene, variant=1)) == "train/000000_v1.png"
    assert bank.path("train", ImageSpec(scene, crop_cell=4)) == "train/000000_crop4.png"
    positive = ("p", "")
    hard = [("a", ""), ("p", ""), ("a", ""), ("b", "")]
    pool = [(str(i), "") for i in range(20)] + [("p", ""), ("b", "")]
    chosen = assemble(positive, hard, pool, 12, np.random.default_rng(0), max_hard=8)
    assert chosen[0] == positive and len(chosen) == 12 and len(set(chosen)) == 12
    assert {("a", ""), ("b", "")} <= set(chosen)


def test_cli_writes_a_world_and_prints_a_summary(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["synth", "--out", str(out), "--seed", "4", "--size", "tiny", "--image-size", "64"]) == 0
    printed = capsys.readouterr().out
    assert "wall time" in printed and "eval queries" in printed
    manifest = json.loads((out / "world.json").read_text())
    assert (manifest["seed"], manifest["size"], manifest["image_size"]) == (4, "tiny", 64)
    with Image.open(out / "images" / "train" / "000000.png") as image:
        assert image.size == (64, 64)
    assert cli_main(["synth", "--out", str(out), "--image-size", "8"]) == 1
