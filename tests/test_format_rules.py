"""Format rules as data: the exact texts each rule makes of one row of every task type, and end-to-end evaluation of
an MMEB_Test_Instruct replica under both rules (hub-layouts §3)."""

from __future__ import annotations

import json

import pytest
from hub_replicas import write_mmeb_test_instruct

from coma.cli import main
from coma.data.formats import EvalQuery
from coma.eval.formatting import query_texts, task_type
from coma.eval.registry import FORMAT_RULES, MMEB_V1, MMEB_V1_DATASETS, MMEB_V2_INSTRUCT

SPECS = {spec.name: spec for spec in MMEB_V1_DATASETS}
IMG = "<|image_1|>"


def _row(qry_inst, qry_text, tgt_text, tgt_inst=None, image="q.jpg", tgt_images=None) -> EvalQuery:
    tgt_text = tuple(tgt_text)
    return EvalQuery(1, qry_text, image, tgt_text, tuple(tgt_images or [""] * len(tgt_text)), "t.parquet",
                     qry_inst=qry_inst, tgt_inst=None if tgt_inst is None else (tgt_inst,) * len(tgt_text))  # fmt: skip


# One row of every task type: (dataset, row, mmeb-v2-instruct texts, mmeb-v1 texts). The v2 strings are those of
# hub-layouts §3 with <|image_1|> where VLM2Vec writes the backbone's image token.
CASES = [
    ("ImageNet-1K", _row(f"{IMG}\nRepresent the given image for classification", "", ["tench", "goldfish"]),
     (f"{IMG}\nRepresent the given image for classification\n", ["tench", "goldfish"]),
     (f"{IMG}\nRepresent the given image for classification", ["tench", "goldfish"])),
    ("N24News", _row(f"{IMG}\nRepresent the given news image with the following caption for domain "
                     "classification:", "Anthony Pidgeon", ["Sports", "Travel"]),
     (f"{IMG}\nRepresent the given news image with the following caption for domain classification: "
      "Anthony Pidgeon\n", ["Sports", "Travel"]),
     (f"{IMG}\nRepresent the given news image with the following caption for domain classification: "
      "Anthony Pidgeon", ["Sports", "Travel"])),
    ("OK-VQA", _row(f"{IMG}\nRepresent the given image with the following question:", "What is it?", ["a cat "]),
     (f"{IMG}\nRepresent the given image with the following question: What is it?\n", ["a cat "]),
     (f"{IMG}\nRepresent the given image with the following question: What is it?", ["a cat"])),
    ("MSCOCO_i2t", _row(f"{IMG}\nFind an image caption describing the given everyday image.", "", ["A dog."]),
     (f"{IMG}\nFind an image caption describing the given everyday image.\n", ["A dog."]),
     (f"{IMG}\nFind an image caption describing the given everyday image.", ["A dog."])),
    ("Wiki-SS-NQ", _row("Find the document image that can answer the given query:", "who sang it", ["", ""],
                        tgt_inst=f"{IMG}\nRepresent the given image", image="", tgt_images=["a.jpg", "b.jpg"]),
     ("Find the document image that can answer the given query: who sang it\n",
      [f"{IMG}\nRepresent the given image\n"] * 2),
     ("Find the document image that can answer the given query: who sang it",
      [f"{IMG}\nRepresent the given image"] * 2)),
    ("VisDial", _row("Represent the given dialogue about an image, which is used for image retrieval:",
                     "Q:is it red\nA:yes", [""], tgt_inst=f"{IMG}\nRepresent the given image", image="",
                     tgt_images=["a.jpg"]),
     ("Represent the given dialogue about an image, which is used for image retrieval: Q:is it red\nA:yes\n\n",
      [f"{IMG}\nRepresent the given image\n"]),
     ("Represent the given dialogue about an image, which is used for image retrieval: Q:is it red\nA:yes",
      [f"{IMG}\nRepresent the given image"])),
    ("WebQA", _row(f"{IMG}\nFind a Wikipedia image that answers this question:", "Which dome?", ["Pantheon"],
                   tgt_inst=f"{IMG}\nRepresent the given Wikipedia image with related text information:",
                   image="", tgt_images=["p.jpg"]),
     (f"{IMG}\nFind a Wikipedia image that answers this question: Which dome?\n",
      [f"{IMG}\nRepresent the given Wikipedia image with related text information: Pantheon\n"]),
     (f"{IMG}\nFind a Wikipedia image that answers this question: Which dome?",
      [f"{IMG}\nRepresent the given Wikipedia image with related text information: Pantheon"])),
    ("NIGHTS", _row(f"{IMG}\nFind a day-to-day image that looks similar to the provided image.", "", [""],
                    tgt_inst=f"{IMG}\nRepresent the given image.", tgt_images=["d.jpg"]),
     (f"{IMG}\nFind a day-to-day image that looks similar to the provided image.\n",
      [f"{IMG}\nRepresent the given image."]),
     (f"{IMG}\nFind a day-to-day image that looks similar to the provided image.",
      [f"{IMG}\nRepresent the given image."])),
    ("MSCOCO", _row(f"{IMG}\nCrop the image to to isolate the object labeled as", '"dog"', [""],
                    tgt_inst=f"{IMG}\nRepresent the given cropped image of the object", tgt_images=["c.jpg"]),
     (f'{IMG}\nCrop the image to to isolate the object labeled as "dog"\n',
      [f"{IMG}\nRepresent the given cropped image of the object"]),
     (f'{IMG}\nCrop the image to to isolate the object labeled as "dog"',
      [f"{IMG}\nRepresent the given cropped image of the object"])),
    ("RefCOCO-Matching", _row(f"{IMG}\nSelect the portion of the image that follows the language expressions:",
                              '"the bowl"', ['"a dish"'], tgt_inst=f"{IMG}\nSelect the portion of the image that "
                              "follows the language expressions:", tgt_images=["q.jpg"]),
     (f'{IMG}\nSelect the portion of the image that follows the language expressions: "the bowl"\n',
      [f'{IMG}\nSelect the portion of the image that follows the language expressions: "a dish"\n']),
     (f'{IMG}\nSelect the portion of the image that follows the language expressions: "the bowl"',
      [f'{IMG}\nSelect the portion of the image that follows the language expressions: "a dish"'])),
]  # fmt: skip


@pytest.mark.parametrize(("dataset", "row", "v2", "v1"), CASES, ids=[case[0] for case in CASES])
def test_each_rule_makes_the_exact_texts(dataset, row, v2, v1):
    spec = SPECS[dataset]
    assert query_texts(row, spec, MMEB_V2_INSTRUCT) == v2
    assert query_texts(row, spec, MMEB_V1) == v1


def test_every_task_type_is_covered_and_v1_rows_refuse_the_instruct_rule():
    assert {task_type(SPECS[case[0]]) for case in CASES} == {"cls", "qa", "i2t", "t2i", "i2i_vg"}
    v1_row = EvalQuery(1, "<|image_1|>\nRepresent the given image", "q.jpg", ("a",), ("",), "t.parquet")
    with pytest.raises(ValueError, match="needs the MMEB_Test_Instruct columns"):
        query_texts(v1_row, SPECS["ImageNet-1K"], MMEB_V2_INSTRUCT)


def test_cli_choices_are_the_registry_rules():
    from coma.commands.evaluate import FORMAT_RULE_NAMES

    assert sorted(FORMAT_RULE_NAMES) == sorted(FORMAT_RULES)


def test_instruct_layout_end_to_end_under_both_rules(tiny_model_dir, tmp_path, capsys):
    data, images = write_mmeb_test_instruct(
        tmp_path, datasets=["ImageNet-1K", "OK-VQA", "WebQA", "NIGHTS", "MSCOCO"]
    )
    args = ["eval", "--model", str(tiny_model_dir), "--data", str(data), "--image-root", str(images),
            "--out", str(tmp_path / "out"), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    v2 = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert v2["settings"]["format_rule"] == "mmeb-v2-instruct"
    assert {d["format_rule"] for d in v2["datasets"].values()} == {"mmeb-v2-instruct"}
    assert "format rule mmeb-v2-instruct" in (tmp_path / "out" / "scores.md").read_text()
    assert main(args) == 0  # same rule: everything from the cache
    assert json.loads((tmp_path / "out" / "scores.json").read_text())["settings"]["n_encoded"] == 0
    assert main([*args, "--format-rule", "mmeb-v1"]) == 0  # another rule: nothing reused
    v1 = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert v1["settings"]["format_rule"] == "mmeb-v1" and v1["settings"]["n_cached"] == 0
    assert v1["settings"]["n_unique_inputs"] == v2["settings"]["n_unique_inputs"]
    assert (
        main([*args, "--min-pixels", "3136", "--max-pixels", "3136", "--attn-implementation", "eager"]) == 0
    )
    eager = json.loads((tmp_path / "out" / "scores.json").read_text())["settings"]
    assert (eager["attn_implementation"], eager["min_pixels"], eager["max_pixels"]) == ("eager", 3136, 3136)
    assert eager["n_cached"] == 0


def test_instruct_replica_has_vlm2vec_v2_columns_per_task_type(tmp_path):
    import pyarrow.parquet as pq

    data, _ = write_mmeb_test_instruct(tmp_path, datasets=["ImageNet-1K", "MSCOCO_i2t", "VisDial", "NIGHTS"])
    columns = {name: set(pq.read_schema(data / name / "test-00000-of-00001.parquet").names)
               for name in ("ImageNet-1K", "MSCOCO_i2t", "VisDial", "NIGHTS")}  # fmt: skip
    assert (
        columns["ImageNet-1K"]
        == columns["MSCOCO_i2t"]
        == {"qry_inst", "qry_text", "qry_img_path", "tgt_text"}
    )
    assert columns["VisDial"] == {"qry_inst", "qry_text", "tgt_inst", "tgt_text", "tgt_img_path"}
    assert columns["NIGHTS"] == {
        "qry_inst",
        "qry_text",
        "qry_img_path",
        "tgt_inst",
        "tgt_text",
        "tgt_img_path",
    }
