"""A small client for a coma model served by ``vllm serve --runner pooling`` (see ``coma export --format vllm``).

vLLM has no pooling that averages the last T tokens, so for every pooling but ``last`` the server returns every
token's last-layer state (``token_embed`` with ``ALL`` pooling, unnormalised) and :class:`VllmPooling` pools the
last T rows, which are the compression tokens because coma's chat template ends the input with them. The pooling
is coma's own :class:`coma.pooling.Pooler`, with the folder's learned head for ``gated`` and ``latent``.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from coma.config import ComaConfig
from coma.pooling import Pooler


class VllmPooling:
    """coma's pooling of per-token hidden states as vLLM's ``/pooling`` endpoint returns them."""

    def __init__(
        self, config: ComaConfig, hidden_size: int, head_state: dict[str, torch.Tensor] | None = None
    ):
        self.config = config
        self.pooler = Pooler(config, hidden_size).eval()
        if self.pooler.head is not None:
            if head_state is None:
                raise ValueError(
                    f"{config.pooling} pooling needs the pooler head's weights (pooler.safetensors)"
                )
            self.pooler.load_state_dict(head_state)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> VllmPooling:
        """Read the coma config and, for a learned head, its weights from an exported model folder."""
        from coma.embedder import POOLER_WEIGHTS
        from coma.serving.export import read_model_folder

        model = read_model_folder(folder)
        weights = Path(folder) / POOLER_WEIGHTS
        head = load_file(str(weights)) if weights.is_file() else None
        return cls(model.config, model.hidden_size, head)

    @torch.no_grad()
    def pool(self, token_embeddings: np.ndarray | list) -> np.ndarray:
        """One input's (L, D) per-token states -> its embedding, from the last T rows."""
        rows = np.asarray(token_embeddings, dtype=np.float32)
        count = self.config.num_tokens
        if rows.ndim != 2 or rows.shape[0] < count:
            raise ValueError(
                f"expected (L, D) token states with L >= {count} (the compression tokens end the input), "
                f"got shape {rows.shape}"
            )
        states = torch.from_numpy(rows[-count:]).unsqueeze(0)
        return self.pooler(states)[0].numpy()

    def __call__(self, response: dict[str, Any]) -> np.ndarray:
        """The (N, D') embeddings of a ``/pooling`` response (``data[i].data`` nested lists)."""
        return np.stack([self.pool(item["data"]) for item in response["data"]])


def image_data_url(image: Image.Image | str | os.PathLike) -> str:
    """A PNG data URL of an image (or image file), as OpenAI-style ``image_url`` parts carry it."""
    if not isinstance(image, Image.Image):
        with Image.open(image) as opened:
            image = opened.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def embedding_messages(
    text: str = "", image: Image.Image | str | os.PathLike | None = None, instruction: str | None = None
) -> list[dict[str, Any]]:
    """One input as chat messages for vLLM's ``/v1/embeddings`` / ``/pooling`` (coma's template renders them)."""
    messages: list[dict[str, Any]] = []
    if instruction:
        messages.append({"role": "system", "content": [{"type": "text", "text": instruction}]})
    content: list[dict[str, Any]] = []
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": image_data_url(image)}})
    if text:
        content.append({"type": "text", "text": text})
    if not content:
        raise ValueError("an embedding input needs a text or an image")
    messages.append({"role": "user", "content": content})
    return messages
