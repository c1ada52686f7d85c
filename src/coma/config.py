"""The `coma` section saved inside every model folder (``coma_config.json``).

It records what every later stage must agree on: the number and spelling of the compression tokens, the prompt
templates and the pooling. It is written with the model and read back by every stage; a mismatch is an error,
never a silent default.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from coma.io import write_json

CONFIG_NAME = "coma_config.json"
POOLINGS = ("mean", "last", "concat", "gated", "latent")


@dataclass
class ComaConfig:
    num_tokens: int = 32
    token_format: str = "<|ctoken_{i}|>"
    # Stage-1 encoder prompt between the image block and the compression tokens (DESIGN §2.2).
    compress_prompt: str = "\nSummarize above image and text in a few words."
    # Placeholder used by MMEB data (Phi-3.5-V convention); replaced by the backbone's image block.
    image_placeholder: str = "<|image_1|>"
    pooling: str = "mean"
    normalize: bool = True
    template_version: str = "coma-v1"
    # Pixel bounds applied by the image processor; None keeps the processor's own.
    min_pixels: int | None = None
    max_pixels: int | None = None
    # Learned pooling heads.
    gated_temperature: float = 2.0
    latent_queries: int = 4
    latent_heads: int = 2
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {self.num_tokens}")
        if "{i}" not in self.token_format:
            raise ValueError(f"token_format must contain '{{i}}', got {self.token_format!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of {', '.join(POOLINGS)}")

    @property
    def token_strings(self) -> list[str]:
        return [self.token_format.format(i=i) for i in range(self.num_tokens)]

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, folder: str | Path) -> None:
        write_json(Path(folder) / CONFIG_NAME, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> ComaConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown coma config field(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def load(cls, folder: str | Path) -> ComaConfig | None:
        """Read the folder's coma config, or None for a plain VLM folder that has none yet."""
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            return None
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle), source=str(path))
