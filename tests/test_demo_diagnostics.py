"""The demo's diagnostics (QA accuracy, linear probes, collapse) and the study's statistics, against references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from coma.demo.diagnostics import (
    QAItem,
    answer_predictions,
    attribute_labels,
    held_out_images,
    majority_accuracy,
    probe_chance,
    qa_accuracy,
    qa_items,
    ridge_probe_accuracy,
    scene_from_dict,
    top_direction_share,
    world_scenes,
)
from coma.demo.study import paired_interval, t_quantile


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from coma.data.synth import generate_world

    path = tmp_path_factory.mktemp("world") / "world"
    generate_world(path, seed=0, size="tiny")
    return path


def test_scenes_round_trip_through_their_dicts(world):
    scenes = world_scenes(world)
    assert scenes and all(scene_from_dict(scene.to_dict()) == scene for scene in scenes.values())


def test_held_out_images_are_whole_eval_images_no_training_stage_sees(world):
    images = held_out_images(world, 10**6)
    assert images and all(image.path.startswith("eval/") for image in images)
    assert not any("_crop" in image.path or "_v" in image.path for image in images)
    assert held_out_images(world, 3) == images[:3]
    training = {
        line
        for name in ("stage0", "stage1")
        for line in (world / name / "conversations.jsonl").read_text().split('"')
    }
    assert not {image.path for image in images} & training


def test_qa_items_ask_every_seen_kind_and_majority_is_the_most_frequent_answer(world):
    items = qa_items(held_out_images(world, 20))
    assert {item.kind for item in items} == {
        "colour",
        "shape",
        "size",
        "position",
        "count",
        "at_position",
        "word",
    }
    assert qa_items(held_out_images(world, 20)) == items  # reproducible
    toy = [QAItem("size", "a", "q", "large"), QAItem("size", "b", "q", "large"), QAItem("size", "c", "q", "small"),
           QAItem("word", "a", "q", "none")]  # fmt: skip
    scores = majority_accuracy(toy)
    assert scores["size"] == pytest.approx(2 / 3) and scores["word"] == 1.0
    assert scores["all"] == pytest.approx(3 / 4)


@pytest.fixture(scope="module")
def tiny_embedder(tmp_path_factory):
    from coma.backbones.tiny import init_model
    from coma.embedder import Embedder

    path = tmp_path_factory.mktemp("model") / "tiny"
    init_model(path, family="qwen2_vl", size="tiny", seed=0)
    return Embedder.from_pretrained(path, device="cpu")


@pytest.mark.parametrize("blank", [False, True])
def test_teacher_forced_predictions_equal_a_plain_forward_of_the_chat_text(world, tiny_embedder, blank):
    """The reference: the whole chat text through the processor and the model's own forward (its default causal
    mask and position ids), argmax at the positions before each answer token."""
    from PIL import Image

    from coma.data.images import load_image

    items = qa_items(held_out_images(world, 3))[:5]
    pairs = answer_predictions(
        tiny_embedder, items, world / "images", layout="chat", blank=blank, batch_size=2
    )
    processor, backbone = tiny_embedder.processor, tiny_embedder.model.backbone
    tokenizer = processor.tokenizer
    for item, (predicted, target) in zip(items, pairs, strict=True):
        answer = tokenizer(item.answer, add_special_tokens=False)["input_ids"]
        assert target == [*answer, tokenizer.convert_tokens_to_ids("<|im_end|>")]
        prompt = f"<|im_start|>user\n{tiny_embedder.adapter.image_block}{item.question}<|im_end|>\n<|im_start|>assistant\n"
        image = load_image(item.image, world / "images")
        if blank:
            image = Image.new("RGB", image.size, (128, 128, 128))
        inputs = processor(text=[prompt], images=[image], return_tensors="pt")
        ids = torch.cat([inputs["input_ids"], torch.tensor([target])], dim=1)
        with torch.no_grad():
            logits = backbone(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=inputs["pixel_values"],
                image_grid_thw=inputs["image_grid_thw"],
                mm_token_type_ids=torch.cat(
                    [inputs["mm_token_type_ids"], torch.zeros(1, len(target), dtype=torch.long)], dim=1
                ),
            ).logits
        start = inputs["input_ids"].shape[1] - 1
        assert predicted == logits[0, start : start + len(target)].argmax(dim=-1).tolist()
    scores = qa_accuracy(tiny_embedder, items, world / "images", layout="chat", blank=blank)
    expected = np.mean([p == t for p, t in pairs])
    assert scores["all"] == pytest.approx(expected)


def test_ridge_probe_reads_a_linear_attribute_and_not_noise():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=400)
    signal = np.eye(3)[labels] @ rng.normal(size=(3, 16))
    train = np.arange(0, 400, 2)
    assert ridge_probe_accuracy(signal + 0.05 * rng.normal(size=(400, 16)), labels, train) == 1.0
    noise = rng.normal(size=(400, 16))
    assert abs(ridge_probe_accuracy(noise, labels, train) - 1 / 3) < 0.1
    assert ridge_probe_accuracy(noise, np.zeros(400, dtype=int), train) is None


def test_probe_is_balanced_under_a_rare_class():
    """A constant guess of the frequent class scores 0.5 balanced accuracy; the probe must find the rare one."""
    rng = np.random.default_rng(1)
    labels = (rng.random(600) < 0.1).astype(int)
    features = np.stack([labels + 0.2 * rng.normal(size=600), rng.normal(size=600)], axis=1)
    assert ridge_probe_accuracy(features, labels, np.arange(0, 600, 2)) > 0.95


def test_attribute_labels_and_chance(world):
    scenes = [image.scene for image in held_out_images(world, 40)]
    labels = attribute_labels(scenes)
    assert [len(labels[g]) for g in ("colour", "shape", "position", "count", "word")] == [8, 6, 9, 1, 1]
    for scene, count in zip(scenes, labels["count"][0], strict=True):
        assert count == len(scene.objects)
    chance = probe_chance(scenes)
    assert all(0 < value <= 1 for value in chance.values())


def test_top_direction_share_against_its_definition():
    rng = np.random.default_rng(2)
    line = rng.normal(size=(50, 1)) @ rng.normal(size=(1, 8)) + 3.0
    assert top_direction_share(line) == pytest.approx(1.0)
    data = rng.normal(size=(200, 5)) * np.array([3.0, 1, 1, 1, 1])
    centred = data - data.mean(axis=0)
    eigenvalues = np.linalg.eigvalsh(centred.T @ centred)
    assert top_direction_share(data) == pytest.approx(eigenvalues[-1] / eigenvalues.sum())


@pytest.mark.parametrize(
    ("df", "expected"), [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)]
)
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-3)


def test_paired_interval():
    result = paired_interval([0.02, 0.04, 0.06])
    half = 4.3027 * 0.02 / math.sqrt(3)
    assert result["mean"] == pytest.approx(0.04)
    assert result["low"] == pytest.approx(0.04 - half, abs=1e-4) and result["high"] == pytest.approx(
        0.04 + half, abs=1e-4
    )
    single = paired_interval([0.1])
    assert single["mean"] == pytest.approx(0.1) and math.isnan(single["low"])


@pytest.mark.parametrize(("turns", "data"), [("multi", "qa"), ("single", "qa"), ("multi", "caption")])
def test_stage1_variants_keep_the_images_and_change_only_the_dialogue(world, tmp_path, turns, data):
    from coma.data.formats import read_conversations
    from coma.data.synth.scenes import caption
    from coma.demo import DemoConfig
    from coma.demo.run import stage1_variant

    teacher = world / "stage1" / "conversations.jsonl"
    config = DemoConfig(out=str(tmp_path), stage1_turns=turns, stage1_data=data)
    path = stage1_variant(config, world, teacher, tmp_path)
    source, variant = read_conversations(teacher), read_conversations(path)
    if (turns, data) == ("multi", "qa"):
        assert path == teacher
    elif data == "caption":
        scenes = world_scenes(world)
        assert [c.image for c in variant] == [c.image for c in source]
        assert all(c.turns == (("Describe the image.", caption(scenes[c.image])),) for c in variant)
    else:
        assert [turn for c in variant for turn in c.turns] == [turn for c in source for turn in c.turns]
        assert all(len(c.turns) == 1 for c in variant)
    assert stage1_variant(config, world, teacher, tmp_path) == path  # cached


def test_stage1_variant_rejects_unknown_axes(world, tmp_path):
    from coma.demo import DemoConfig
    from coma.demo.run import stage1_variant

    with pytest.raises(ValueError, match="stage1_turns"):
        stage1_variant(
            DemoConfig(stage1_turns="three"), world, world / "stage1" / "conversations.jsonl", tmp_path
        )
