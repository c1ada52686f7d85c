"""coma: Compression-then-Matching multimodal embeddings on top of transformers' VLMs."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from coma.embedder import Embedder

__all__ = ["Embedder", "__version__"]


def __getattr__(name: str):
    # Importing torch/transformers costs seconds; do it only when the API is used.
    if name == "Embedder":
        from coma.embedder import Embedder

        return Embedder
    raise AttributeError(f"module 'coma' has no attribute {name!r}")
