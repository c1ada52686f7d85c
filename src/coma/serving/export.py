"""``coma export``: make a coma model folder loadable by sentence-transformers and servable by vLLM.

Both exports only add small files to the folder (or to a copy of it, with ``out``); the weights are never re-saved,
so the folder still loads in :meth:`coma.embedder.Embedder.from_pretrained` with bit-identical embeddings.
What each tool reads, and why it is written this way: ``shared/reference/serving.md`` §1 (sentence-transformers)
and §2 (vLLM).

Both tools build model inputs from chat messages, so both get :func:`embedding_chat_template`, which renders coma's
exact input text. Both load the processor with ``AutoProcessor``, which needs transformers' own processor class
name in the folder (coma saves its image-only subclass, which ``AutoProcessor`` cannot resolve) and, for the video
slot of Qwen-VL processors, a legacy ``preprocessor_config.json``, as the hub checkpoints have.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coma.backbones import adapter_for, read_model_type
from coma.backbones.base import BackboneAdapter
from coma.config import CONFIG_NAME, ComaConfig
from coma.io import atomic_write_text, write_json
from coma.serving.chat_template import embedding_chat_template

FORMATS = ("sentence-transformers", "vllm")
VLLM_TEMPLATE = "coma_vllm_template.jinja"
VLLM_SETTINGS = "coma_vllm.json"
ST_TRANSFORMER = "sentence_transformers.base.modules.transformer.Transformer"
ST_POOLING = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
ST_NORMALIZE = "sentence_transformers.base.modules.normalize.Normalize"
COMA_POOLING = "coma.serving.st_modules.CompressionPooling"
COMA_TRANSFORMER = "coma.serving.st_modules.ComaTransformer"
_LAST_HIDDEN = {"method": "forward", "method_output_name": "last_hidden_state"}


@dataclass
class ModelFolder:
    """A plain coma model folder: the coma config, the family adapter and the backbone's config.json."""

    path: Path
    config: ComaConfig
    adapter: BackboneAdapter
    backbone_config: dict[str, Any]

    @property
    def hidden_size(self) -> int:
        text_config = self.backbone_config.get("text_config") or {}
        return int(text_config.get("hidden_size") or self.backbone_config["hidden_size"])

    def token_ids(self) -> list[int]:
        from coma.compression import compression_token_ids

        return compression_token_ids(self.adapter.load_processor(str(self.path)).tokenizer, self.config)


@dataclass
class Export:
    """What an export wrote, and how to use it."""

    folder: Path
    format: str
    files: list[str]
    instructions: list[str] = field(default_factory=list)


def read_model_folder(path: str | Path) -> ModelFolder:
    """Check that ``path`` is a merged coma model folder and read what the exports need."""
    path = Path(path)
    if not (path / "config.json").is_file():
        hint = (
            " (a training run: merge it first with `coma merge --model RUN --out DIR`)"
            if (path / "run_config.json").is_file() or (path / "trainer_state.json").is_file()
            else ""
        )
        raise FileNotFoundError(f"{path} is not a model folder: no config.json{hint}")
    config = ComaConfig.load(path)
    if config is None:
        raise FileNotFoundError(
            f"{path} has no {CONFIG_NAME}: export a model that coma trained or saved (Embedder.save_pretrained)"
        )
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path} holds no .safetensors weights")
    backbone_config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return ModelFolder(path, config, adapter_for(read_model_type(path)), backbone_config)


def export_model(
    model: str | Path, format: str, out: str | Path | None = None, query_prompt: str | None = None
) -> Export:
    """Export ``model`` in ``format`` (in place, or into a copy at ``out``)."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    folder = read_model_folder(model)
    if out is not None and Path(out).resolve() != folder.path.resolve():
        out = Path(out)
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not empty; choose another --out")
        shutil.copytree(folder.path, out, dirs_exist_ok=True)
        folder = read_model_folder(out)
    files = publish_processor(folder)
    if format == "sentence-transformers":
        return write_sentence_transformers(folder, files, query_prompt or "")
    return write_vllm(folder, files)


def publish_processor(folder: ModelFolder) -> list[str]:
    """Name transformers' processor class in the folder and add the legacy image-processor file.

    coma loads its processors with the concrete class, whatever name the folder holds, so this changes nothing for
    coma; ``AutoProcessor`` (sentence-transformers, vLLM) can then resolve the processor where torchvision is
    installed (the video slot needs it).
    """
    name = folder.adapter.published_processor_class
    processor_file = folder.path / "processor_config.json"
    processor_config = json.loads(processor_file.read_text(encoding="utf-8"))
    processor_config["processor_class"] = name
    write_json(processor_file, processor_config)
    tokenizer_file = folder.path / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    tokenizer_config["processor_class"] = name
    write_json(tokenizer_file, tokenizer_config)
    write_json(
        folder.path / "preprocessor_config.json",
        {**processor_config["image_processor"], "processor_class": name},
    )
    return ["processor_config.json", "tokenizer_config.json", "preprocessor_config.json"]


def write_sentence_transformers(folder: ModelFolder, files: list[str], query_prompt: str) -> Export:
    """modules.json, the Transformer's config with coma's chat template, the pooling and normalisation modules."""
    from sentence_transformers.base.modules import Normalize
    from sentence_transformers.sentence_transformer.modules import Pooling

    config, path = folder.config, folder.path
    template = embedding_chat_template(config, folder.adapter.image_block)
    transformer_type = ST_TRANSFORMER if config.pooling == "last" else COMA_TRANSFORMER
    modules = [{"idx": 0, "name": "0", "path": "", "type": transformer_type}]
    if config.pooling == "last":
        pooling_type, pooling_path = ST_POOLING, "1_Pooling"
        pooling = Pooling(folder.hidden_size, pooling_mode="lasttoken")
    else:
        from coma.serving.st_modules import CompressionPooling

        pooling_type, pooling_path = COMA_POOLING, "1_CompressionPooling"
        pooling = CompressionPooling(
            config.pooling,
            folder.token_ids(),
            folder.hidden_size,
            config.gated_temperature,
            config.latent_queries,
            config.latent_heads,
        )
        if pooling.pooler.head is not None:
            pooling.pooler.load_state_dict(_pooler_head_state(folder))
    modules.append({"idx": 1, "name": "1", "path": pooling_path, "type": pooling_type})
    _save_module(pooling, path / pooling_path)
    files.append(f"{pooling_path}/")
    if config.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": ST_NORMALIZE})
        _save_module(Normalize(), path / "2_Normalize")
        files.append("2_Normalize/")
    write_json(path / "modules.json", modules)
    write_json(
        path / "sentence_bert_config.json",
        {
            "transformer_task": "feature-extraction",
            "modality_config": {
                "text": _LAST_HIDDEN,
                "image": _LAST_HIDDEN,
                "message": {**_LAST_HIDDEN, "format": "structured"},
            },
            "module_output_name": "token_embeddings",
            # Passed to apply_chat_template on every encode: the folder's own chat template stays untouched.
            "processing_kwargs": {"chat_template": {"chat_template": template}},
        },
    )
    write_json(
        path / "config_sentence_transformers.json",
        {
            "model_type": "SentenceTransformer",
            "prompts": {"query": query_prompt, "document": ""},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
            "requirements": {"sentence_transformers": ">=6"},
        },
    )
    files += ["modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"]
    remote = "" if config.pooling == "last" else ", trust_remote_code=True"
    return Export(
        path,
        "sentence-transformers",
        files,
        [
            "from sentence_transformers import SentenceTransformer",
            f'model = SentenceTransformer("{path}"{remote})',
            'model.encode(["a text", "photo.jpg", {"text": "a caption", "image": "photo.jpg"}])',
        ],
    )


def vllm_pooler_config(config: ComaConfig) -> dict[str, Any]:
    """vLLM's ``--pooler-config`` for this model (serving.md §2.3-§2.5).

    ``last`` is vLLM's own LAST pooling (with L2 normalisation as ``use_activation``). Every other pooling needs the
    T compression states: vLLM returns every token's hidden state, unnormalised, and
    :class:`coma.serving.vllm.VllmPooling` pools the last T rows on the client.
    """
    if config.pooling == "last":
        return {"task": "embed", "pooling_type": "LAST", "use_activation": config.normalize}
    return {"task": "token_embed", "pooling_type": "ALL", "use_activation": False}


def write_vllm(folder: ModelFolder, files: list[str]) -> Export:
    """The embedding chat template and the pooler settings next to the (already merged) weights."""
    config, path = folder.config, folder.path
    atomic_write_text(path / VLLM_TEMPLATE, embedding_chat_template(config, folder.adapter.image_block))
    pooler = vllm_pooler_config(config)
    pooler_json = json.dumps(pooler, separators=(",", ":"))
    serve = (
        f"vllm serve {path} --runner pooling --pooler-config '{pooler_json}' "
        f"--chat-template {path / VLLM_TEMPLATE} --chat-template-content-format openai"
    )
    endpoint = "/v1/embeddings" if config.pooling == "last" else "/pooling"
    write_json(
        path / VLLM_SETTINGS,
        {
            "pooler_config": pooler,
            "chat_template": VLLM_TEMPLATE,
            "endpoint": endpoint,
            "num_tokens": config.num_tokens,
            "pooling": config.pooling,
            "serve": serve,
        },
    )
    files += [VLLM_TEMPLATE, VLLM_SETTINGS]
    client = (
        "the response's data[i].embedding is the embedding"
        if config.pooling == "last"
        else f"from coma.serving.vllm import VllmPooling; VllmPooling.from_folder('{path}')(response_json)"
    )
    return Export(
        path,
        "vllm",
        files,
        [serve, f"POST {endpoint} with messages (image parts as image_url data URLs); {client}"],
    )


def _pooler_head_state(folder: ModelFolder) -> dict:
    from safetensors.torch import load_file

    from coma.embedder import POOLER_WEIGHTS

    weights = folder.path / POOLER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights} is missing: a {folder.config.pooling} pooling model keeps its head there"
        )
    return load_file(str(weights))


def _save_module(module: Any, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    module.save(str(folder))
