"""Compression tokens: adding them to a model and laying them out in the text (DESIGN §2.1, §2.3)."""

from __future__ import annotations

import torch
from torch import nn

from coma.config import ComaConfig
from coma.data.formats import drop_orphan_placeholder


def compression_token_ids(tokenizer, config: ComaConfig) -> list[int]:
    """Ids of the configured compression tokens; every one must already be in the tokenizer."""
    vocab = tokenizer.get_vocab()
    missing = [token for token in config.token_strings if token not in vocab]
    if missing:
        present = sum(1 for token in config.token_strings if token in vocab)
        raise ValueError(
            f"the coma config asks for {config.num_tokens} compression tokens ({config.token_strings[0]} …) but the "
            f"tokenizer has {present} of them; the model folder and its coma_config.json disagree"
        )
    return [vocab[token] for token in config.token_strings]


def add_compression_tokens(model: nn.Module, tokenizer, config: ComaConfig) -> list[int]:
    """Add the T compression tokens as special tokens and mean-initialise their embedding rows.

    The embedding matrix is resized only when the tokenizer outgrows it (real Qwen checkpoints have spare rows).
    Calling it on a model that already has exactly these tokens is a no-op that returns their ids.
    """
    vocab = tokenizer.get_vocab()
    prefix = config.token_format.split("{i}")[0]
    existing = {token for token in vocab if token.startswith(prefix)}
    if existing == set(config.token_strings):
        return compression_token_ids(tokenizer, config)
    if existing:
        raise ValueError(
            f"tokenizer already holds {len(existing)} compression tokens ({prefix}…) but T={config.num_tokens} "
            "was requested"
        )
    rows_before = len(tokenizer)
    tokenizer.add_tokens(config.token_strings, special_tokens=True)
    ids = compression_token_ids(tokenizer, config)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    _mean_init_rows(model.get_input_embeddings(), ids, rows_before)
    output = model.get_output_embeddings()
    if output is not None and output.weight is not model.get_input_embeddings().weight:
        _mean_init_rows(output, ids, rows_before)
    return ids


@torch.no_grad()
def _mean_init_rows(module: nn.Module, ids: list[int], rows_before: int) -> None:
    weight = module.weight
    weight[ids] = weight[:rows_before].mean(dim=0, keepdim=True).to(weight.dtype)


def embedding_text(text: str, has_image: bool, config: ComaConfig, image_block: str) -> str:
    """The encoder input of stage 2 and inference: the text with the image block in place, then C_0 … C_{T-1}.

    An image without a placeholder goes first, on its own line (the MMEB-train convention); a placeholder without an
    image is dropped with its newline (real WebQA / EDIS queries carry one; readers count those before this point).
    """
    placeholder = config.image_placeholder
    text, _ = drop_orphan_placeholder(text, has_image, placeholder)
    count = text.count(placeholder)
    if has_image:
        if count == 0:
            text = f"{placeholder}\n{text}" if text else placeholder
        elif count > 1:
            raise ValueError(
                f"input text has {count} image placeholders {placeholder!r}; one image per input"
            )
    return text.replace(placeholder, image_block) + "".join(config.token_strings)
