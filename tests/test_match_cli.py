"""``coma match`` end to end on a tiny model: train, checkpoint, resume, merge, load."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import random_image

from coma import Embedder
from coma.cli import main
from coma.io import write_jsonl


@pytest.fixture(scope="module")
def mmeb_train(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmeb_train")
    (root / "images").mkdir()
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
    rows_cls, rows_t2i = [], []
    for index in range(24):
        name, rgb = list(colours.items())[index % 4]
        image = np.asarray(random_image(index, (56, 56)), dtype=np.float32) * 0.3 + np.array(rgb) * 0.7
        path = f"images/{index}.png"
        from PIL import Image

        Image.fromarray(image.astype("uint8")).save(root / path)
        rows_cls.append({"qry": "<|image_1|>\nRepresent the given image for classification", "qry_image_path": path,
                         "pos_text": name, "pos_image_path": "", "neg_text": "", "neg_image_path": ""})  # fmt: skip
        rows_t2i.append({"qry": f"Find me an everyday image that matches the given caption: a {name} picture",
                         "qry_image_path": "", "pos_text": "<|image_1|>\nRepresent the given image.",
                         "pos_image_path": path, "neg_text": "", "neg_image_path": ""})  # fmt: skip
    write_jsonl(root / "ColourCls" / "train.jsonl", rows_cls)
    write_jsonl(root / "ColourT2I" / "train.jsonl", rows_t2i)
    return root


def match_args(model, data, out, *extra):
    return ["match", "--model", str(model), "--data", str(data), "--out", str(out), "--block-size", "4",
            "--query-chunk-size", "4", "--target-chunk-size", "4", "--num-tokens", "4",
            "--train.global-batch-size", "8", "--train.max-steps", "4", "--train.save-every", "2",
            "--train.learning-rate", "1e-3", "--train.show-progress", "false", "--lora.r", "4",
            "--lora.dropout", "0.0", *extra]  # fmt: skip


def read_losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_match_trains_resumes_and_merges(tiny_model_dir, mmeb_train, tmp_path):
    assert main(match_args(tiny_model_dir, mmeb_train, tmp_path / "full")) == 0
    full_losses = read_losses(tmp_path / "full")
    assert len(full_losses) == 4 and all(np.isfinite(full_losses))

    # Kill the run during step 3 (after the step-2 checkpoint), then resume: same losses step for step.
    from coma.train.match import MatchTask

    original_step, calls = MatchTask.step, []

    def dying_step(self, module, no_sync):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")
        return original_step(self, module, no_sync)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MatchTask, "step", dying_step)
        with pytest.raises(KeyboardInterrupt):
            main(match_args(tiny_model_dir, mmeb_train, tmp_path / "cut"))
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-0000002"]
    assert main(match_args(tiny_model_dir, mmeb_train, tmp_path / "cut", "--resume")) == 0
    np.testing.assert_allclose(read_losses(tmp_path / "cut"), full_losses, rtol=0, atol=1e-6)

    embedder = Embedder.from_pretrained(tmp_path / "full")
    assert embedder.config.num_tokens == 4
    out = embedder.encode(["red", {"image": mmeb_train / "images" / "0.png"}], show_progress=False)
    assert out.shape == (2, embedder.model.hidden_size)

    assert main(["merge", "--model", str(tmp_path / "full"), "--out", str(tmp_path / "merged")]) == 0
    merged = Embedder.from_pretrained(tmp_path / "merged")
    assert merged.encode(["red"], show_progress=False).shape == (1, embedder.model.hidden_size)


def test_match_unknown_subset_is_a_clear_error(tiny_model_dir, mmeb_train, tmp_path, capsys):
    code = main(match_args(tiny_model_dir, mmeb_train, tmp_path / "x", "--subsets", "[Nope]"))
    assert code == 1
    assert "Nope" in capsys.readouterr().err
