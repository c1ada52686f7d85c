"""``coma export``: sentence-transformers parity for every pooling and input kind, and the vLLM folder.

sentence-transformers loads the processor with ``AutoProcessor``, which for a Qwen-VL folder needs torchvision (its
video slot); coma runs without torchvision (DESIGN §4). The exports of the compression-token poolings read inputs
through ``coma.serving.st_modules.ComaTransformer``, which loads coma's processor itself: they are tested exactly as
a user loads them. A ``last`` export is ST's standard modules only, so its tests use the ``st_processor`` fixture,
which stands coma's image-only processor in for ``AutoProcessor`` inside ST's Transformer module (the same image
processor and tokenizer, minus the video slot); with torchvision installed, transformers' own processor is used there
instead, untested here. Everything else (modules.json, the chat template, the pooling and normalisation modules,
model loading through ``AutoModel``) is sentence-transformers' own code path.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from helpers import random_image

from coma.cli import main
from coma.compression import embedding_text
from coma.config import POOLINGS
from coma.data.formats import drop_orphan_placeholder
from coma.embedder import Embedder, EncodeInput
from coma.serving.chat_template import embedding_chat_template
from coma.serving.export import VLLM_SETTINGS, VLLM_TEMPLATE, export_model
from coma.serving.vllm import VllmPooling, embedding_messages

sentence_transformers = pytest.importorskip("sentence_transformers")
QUERY_PROMPT = "Find an image that matches the text"


@pytest.fixture
def st_processor(monkeypatch):
    """sentence-transformers' AutoProcessor resolves to coma's image-only processor (no torchvision here)."""
    import sentence_transformers.base.modules.transformer as st_transformer

    from coma.backbones import adapter_for, read_model_type

    class ImageOnlyAutoProcessor:
        @staticmethod
        def from_pretrained(path, **kwargs):
            return adapter_for(read_model_type(path)).load_processor(str(path))

    monkeypatch.setattr(st_transformer, "AutoProcessor", ImageOnlyAutoProcessor)


@pytest.fixture(scope="module")
def pooled_models(tiny_model_dirs, tmp_path_factory) -> dict[str, object]:
    """A saved coma model per pooling (the learned heads get their random init saved in pooler.safetensors)."""
    root = tmp_path_factory.mktemp("pooled")
    folders = {}
    for pooling in POOLINGS:
        folders[pooling] = Embedder.from_pretrained(
            tiny_model_dirs["qwen2_vl"], pooling=pooling
        ).save_pretrained(root / pooling)
    folders["qwen2_5_vl"] = Embedder.from_pretrained(tiny_model_dirs["qwen2_5_vl"]).save_pretrained(
        root / "qwen2_5_vl"
    )
    return folders


def mixed_inputs(image_files):
    image = random_image(7, (84, 112))
    return [
        "a red circle",
        image,
        str(image_files[0]),
        {"text": "What is in <|image_1|> this picture?", "image": image},
        {"text": "a caption", "image": str(image_files[1])},
        "<|image_1|>\nFind the news that mentions the text",
        "a longer text, so that the batch is padded on one side: more words than any other input here",
    ]


def folder_digest(folder) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.glob("*.safetensors"))
    }


@pytest.mark.parametrize("pooling", [*POOLINGS, "qwen2_5_vl"])
def test_sentence_transformers_equals_embedder(pooled_models, pooling, image_files, tmp_path, request):
    from sentence_transformers import SentenceTransformer

    if pooling == "last":
        request.getfixturevalue("st_processor")
    folder = export_model(
        pooled_models[pooling], "sentence-transformers", tmp_path / "st", QUERY_PROMPT
    ).folder
    embedder = Embedder.from_pretrained(folder)
    # `last` is all standard modules: it loads without remote code.
    model = SentenceTransformer(
        str(folder), trust_remote_code=embedder.config.pooling != "last", device="cpu"
    )
    inputs = mixed_inputs(image_files)
    want = embedder.encode(inputs, show_progress=False)
    for batch_size in (1, 3, 32):
        got = model.encode(inputs, batch_size=batch_size, convert_to_numpy=True)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert model.get_embedding_dimension() == want.shape[1]
    queries = [
        "a red circle",
        random_image(3, (56, 56)),
        {"text": "the same shape", "image": str(image_files[2])},
    ]
    np.testing.assert_allclose(
        model.encode_query(queries, convert_to_numpy=True),
        embedder.encode(queries, instruction=QUERY_PROMPT, show_progress=False),
        atol=1e-5,
        rtol=0,
    )
    np.testing.assert_allclose(
        model.encode_document(queries[:1], convert_to_numpy=True), want[:1], atol=1e-5, rtol=0
    )


def test_last_pooling_export_is_standard_modules(pooled_models, tmp_path):
    folder = export_model(pooled_models["last"], "sentence-transformers", tmp_path / "st").folder
    modules = json.loads((folder / "modules.json").read_text())
    assert [module["type"].split(".")[0] for module in modules] == ["sentence_transformers"] * 3
    assert json.loads((folder / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "lasttoken"
    mean = export_model(pooled_models["mean"], "sentence-transformers", tmp_path / "mean").folder
    types = [module["type"] for module in json.loads((mean / "modules.json").read_text())]
    assert types[:2] == [
        "coma.serving.st_modules.ComaTransformer",
        "coma.serving.st_modules.CompressionPooling",
    ]


def test_custom_pooling_needs_trust_remote_code(pooled_models, tmp_path):
    from sentence_transformers import SentenceTransformer

    folder = export_model(pooled_models["mean"], "sentence-transformers", tmp_path / "st").folder
    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(str(folder), device="cpu")


@pytest.mark.parametrize("format", ["sentence-transformers", "vllm"])
def test_export_in_place_keeps_weights_and_embeddings(pooled_models, format, image_files, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(pooled_models["gated"], folder)
    inputs = mixed_inputs(image_files)
    before = Embedder.from_pretrained(folder).encode(inputs, show_progress=False)
    digests = folder_digest(folder)
    assert main(["export", "--model", str(folder), "--format", format]) == 0
    assert folder_digest(folder) == digests
    np.testing.assert_array_equal(
        Embedder.from_pretrained(folder).encode(inputs, show_progress=False), before
    )


def test_export_out_leaves_the_source_alone(pooled_models, tmp_path, capsys):
    source = pooled_models["mean"]
    files_before = sorted(path.name for path in source.iterdir())
    out = tmp_path / "exported"
    assert (
        main(["export", "--model", str(source), "--format", "sentence-transformers", "--out", str(out)]) == 0
    )
    assert sorted(path.name for path in source.iterdir()) == files_before
    assert (out / "modules.json").is_file() and (out / "model.safetensors").is_file()
    assert "trust_remote_code=True" in capsys.readouterr().out
    assert main(["export", "--model", str(source), "--format", "vllm", "--out", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err


def test_export_errors_name_the_problem(tiny_model_dir, tmp_path, capsys):
    assert main(["export", "--model", str(tmp_path / "nope"), "--format", "vllm"]) == 1
    assert "no config.json" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text("{}")
    assert main(["export", "--model", str(run), "--format", "vllm"]) == 1
    assert "coma merge" in capsys.readouterr().err
    # A plain VLM folder (no coma config): nothing was trained, the compression rows would be new.
    assert (
        main(["export", "--model", str(tiny_model_dir), "--format", "vllm", "--out", str(tmp_path / "x")])
        == 1
    )
    assert "coma_config.json" in capsys.readouterr().err


def test_vllm_folder(pooled_models, tmp_path, capsys):
    out = tmp_path / "vllm"
    assert main(["export", "--model", str(pooled_models["mean"]), "--format", "vllm", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    settings = json.loads((out / VLLM_SETTINGS).read_text())
    assert settings["pooler_config"] == {
        "task": "token_embed",
        "pooling_type": "ALL",
        "use_activation": False,
    }
    assert settings["serve"] in printed and "--runner pooling" in settings["serve"]
    assert f"--chat-template {out / VLLM_TEMPLATE}" in settings["serve"]
    assert json.loads((out / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    assert json.loads((out / "tokenizer_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    legacy = json.loads((out / "preprocessor_config.json").read_text())
    assert legacy["image_processor_type"] == "Qwen2VLImageProcessor" and legacy["patch_size"] == 14
    last = export_model(pooled_models["last"], "vllm", tmp_path / "last")
    assert json.loads((last.folder / VLLM_SETTINGS).read_text())["pooler_config"] == {
        "task": "embed",
        "pooling_type": "LAST",
        "use_activation": True,
    }
    qwen25 = export_model(pooled_models["qwen2_5_vl"], "vllm", tmp_path / "q25").folder
    assert (
        json.loads((qwen25 / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    )


TEMPLATE_CASES = [
    ("a red circle", False, None),
    ("", True, None),
    ("What is <|image_1|> here?", True, None),
    ("<|image_1|>\nFind the news", False, None),
    ("Find <|image_1|>  \t a thing", False, None),
    ("<|image_1|>", False, "Retrieve the image"),
    ("the query", True, "Find an image"),
    ("", True, "Represent the image"),
    ("ends with a newline\n", True, None),
]


@pytest.mark.parametrize(("text", "has_image", "instruction"), TEMPLATE_CASES)
@pytest.mark.parametrize("image_part", ["image", "image_url"])
def test_chat_template_renders_coma_text(pooled_models, text, has_image, instruction, image_part):
    embedder = Embedder.from_pretrained(pooled_models["mean"])
    messages = []
    if instruction:
        messages.append({"role": "system", "content": instruction})
    content = [{"type": "text", "text": text}] if text else []
    if has_image:
        content.append({"type": image_part})
    messages.append({"role": "user", "content": content})
    template = embedding_chat_template(embedder.config, embedder.adapter.image_block)
    rendered = embedder.processor.tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False
    )
    fixed, _ = drop_orphan_placeholder(text, has_image, embedder.config.image_placeholder)
    if instruction:
        fixed = f"{instruction}\n{fixed}" if fixed else instruction
    assert rendered == embedding_text(fixed, has_image, embedder.config, embedder.adapter.image_block)


def test_chat_template_gives_coma_token_ids(pooled_models, image_files):
    """Through the processor (image expanded), the template's ids equal the ids coma's collate builds."""
    embedder = Embedder.from_pretrained(pooled_models["mean"])
    template = embedding_chat_template(embedder.config, embedder.adapter.image_block)
    for text, image in [
        ("a red circle", None),
        ("What is <|image_1|> here?", str(image_files[1])),
        ("", image_files[3]),
    ]:
        messages = embedding_messages(text, image)
        for part in messages[-1]["content"]:
            if part["type"] == "image_url":
                part.update(type="image", image=str(image))
        ours = embedder.collate([EncodeInput(text, image)])
        theirs = embedder.processor.apply_chat_template(
            messages, chat_template=template, tokenize=True, return_dict=True, return_tensors="pt"
        )
        assert theirs["input_ids"].tolist() == ours["input_ids"].tolist()
        if image is not None:
            assert torch.equal(theirs["pixel_values"], ours["pixel_values"])


def test_chat_template_refuses_two_images(pooled_models):
    embedder = Embedder.from_pretrained(pooled_models["mean"])
    template = embedding_chat_template(embedder.config, embedder.adapter.image_block)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image_url"}]}]
    with pytest.raises(Exception, match="one image per input"):
        embedder.processor.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_vllm_client_pooling_equals_coma(pooled_models, pooling, image_files, tmp_path):
    """The helper's pooling of per-token states (what vLLM's ALL pooling returns) equals coma's embedding."""
    folder = export_model(pooled_models[pooling], "vllm", tmp_path / "vllm").folder
    embedder = Embedder.from_pretrained(folder)
    client = VllmPooling.from_folder(folder)
    inputs = [
        ("a red circle", None),
        ("What is <|image_1|> here?", str(image_files[0])),
        ("", str(image_files[2])),
    ]
    rows = []
    for text, image in inputs:
        batch = embedder.collate([EncodeInput(text, image)])
        with torch.no_grad():
            hidden = embedder.adapter.hidden_states(embedder.model.backbone, batch)[0]
        rows.append({"data": hidden.tolist()})
    got = client({"data": rows})
    want = embedder.encode([EncodeInput(text, image) for text, image in inputs], show_progress=False)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="L >= 32"):
        client.pool(np.zeros((3, embedder.model.hidden_size)))
