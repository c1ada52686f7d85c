"""``coma init-model`` and ``coma encode`` from the shell's point of view."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import random_image

from coma import Embedder
from coma.cli import main


def test_init_model_then_encode_a_jsonl_file(tmp_path):
    assert (
        main(["init-model", "--family", "qwen2_5_vl", "--out", str(tmp_path / "model"), "--seed", "1"]) == 0
    )
    (tmp_path / "imgs").mkdir()
    random_image(3).save(tmp_path / "imgs" / "a.png")
    lines = [
        {"text": "a red circle"},
        {"image": "imgs/a.png"},
        {"text": "what is it?", "image": "imgs/a.png"},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.npy"
    assert main(["encode", "--model", str(tmp_path / "model"), "--input", str(tmp_path / "in.jsonl"),
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    matrix = np.load(out)
    expected = Embedder.from_pretrained(tmp_path / "model").encode(
        [
            "a red circle",
            tmp_path / "imgs" / "a.png",
            {"text": "what is it?", "image": tmp_path / "imgs" / "a.png"},
        ],
        show_progress=False,
    )
    np.testing.assert_allclose(matrix, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("line", "message"),
    [('{"text": 3}', "in.jsonl:2: .*'text' must be a string"), ('{"caption": "x"}', "in.jsonl:2: .*unknown keys"),
     ("not json", "in.jsonl:2: not valid JSON")],
)  # fmt: skip
def test_bad_input_lines_name_file_and_line(tiny_model_dir, tmp_path, capsys, line, message):
    import re

    (tmp_path / "in.jsonl").write_text('{"text": "ok"}\n' + line + "\n")
    code = main(["encode", "--model", str(tiny_model_dir), "--input", str(tmp_path / "in.jsonl"),
                 "--out", str(tmp_path / "o.npy")])  # fmt: skip
    assert code == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "o.npy").exists()


def test_encode_an_image_folder_skips_macos_junk_and_fixes_placeholders(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    random_image(1).save(folder / "b.jpg")
    random_image(2).save(folder / "sub" / "a photo.png")
    (folder / "._b.jpg").write_bytes(b"\x00\x05\x16\x07Mac OS X")  # AppleDouble metadata, not an image
    out = tmp_path / "out.npy"
    assert main(["encode", "--model", str(tiny_model_dir), "--input", str(folder), "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    assert np.load(out).shape[0] == 2
    assert (tmp_path / "out.npy.paths.txt").read_text() == "b.jpg\nsub/a photo.png\n"
    (tmp_path / "in.jsonl").write_text('{"text": "<|image_1|>\\nFind a news image."}\n')
    assert main(["encode", "--model", str(tiny_model_dir), "--input", str(tmp_path / "in.jsonl"),
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    assert "in.jsonl: 1 text-only inputs carried <|image_1|>; removed" in capsys.readouterr().out
