"""Pooling of the T compression-token states into one embedding (DESIGN §2.3).

The states are located by token id, not by position, so pooling cannot depend on the padding side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from coma.config import ComaConfig


def compression_states(
    hidden: torch.Tensor, input_ids: torch.Tensor, token_ids: torch.Tensor
) -> torch.Tensor:
    """Gather the hidden states of the compression tokens: (B, L, D) -> (B, T, D), in sequence order."""
    is_compression = torch.isin(input_ids, token_ids)
    counts = is_compression.sum(dim=1)
    expected = token_ids.numel()
    if not bool((counts == expected).all()):
        raise ValueError(
            f"every input must hold exactly {expected} compression tokens, found {counts.tolist()} "
            "(was an input truncated, or does the text contain compression tokens itself?)"
        )
    return hidden[is_compression].view(hidden.shape[0], expected, hidden.shape[-1])


class GatedPooling(nn.Module):
    """Softmax weights over the T states from a SwiGLU scorer; starts as mean pooling (zero-initialised scorer)."""

    def __init__(self, dim: int, temperature: float = 2.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.gate_up = nn.Linear(dim, 2 * dim)
        self.score = nn.Linear(dim, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(states).chunk(2, dim=-1)
        logits = self.score(F.silu(gate) * up).squeeze(-1) / self.temperature
        weights = logits.softmax(dim=-1)
        return torch.einsum("bt,btd->bd", weights, states)


class LatentPooling(nn.Module):
    """A few learned latent queries attend to the T states through q/k/v projections; mean over the latents."""

    def __init__(self, dim: int, num_queries: int = 4, num_heads: int = 2) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"latent pooling: hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.latents = nn.Parameter(torch.randn(num_queries, dim) * dim**-0.5)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        batch, _, dim = states.shape
        heads, head_dim = self.num_heads, dim // self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, heads, head_dim).transpose(1, 2)

        normed = self.norm(states)
        queries = split(self.q_proj(self.latents).expand(batch, -1, -1))
        attended = F.scaled_dot_product_attention(
            queries, split(self.k_proj(normed)), split(self.v_proj(normed))
        )
        attended = attended.transpose(1, 2).reshape(batch, -1, dim)
        return self.o_proj(attended).mean(dim=1)


class Pooler(nn.Module):
    """Maps (B, T, D) compression states to (B, D') embeddings for every pooling in :data:`coma.config.POOLINGS`."""

    def __init__(self, config: ComaConfig, dim: int) -> None:
        super().__init__()
        self.mode = config.pooling
        self.normalize = config.normalize
        self.head: nn.Module | None = None
        if self.mode == "gated":
            self.head = GatedPooling(dim, config.gated_temperature)
        elif self.mode == "latent":
            self.head = LatentPooling(dim, config.latent_queries, config.latent_heads)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        if self.mode == "mean":
            pooled = states.mean(dim=1)
        elif self.mode == "last":
            pooled = states[:, -1]
        elif self.mode == "concat":
            pooled = states.flatten(1)
        else:
            pooled = self.head(states)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled
