"""Stage-1 batches: conversations -> the exact token layout of DESIGN §2.2, with boundaries and labels.

``layout="compress"`` (stage 1)::

    ENC = image block + compress prompt           (text-only: TEXT_COMPRESS_PROMPT, no image block)
    C   = C_0 … C_{T-1}
    DEC = <|im_start|>user\\n{Q}<|im_end|>\\n<|im_start|>assistant\\n{A}<|im_end|>\\n   (every turn, no system prompt)

``layout="chat"`` ("stage 0", plain LLaVA-style instruction tuning, no compression tokens)::

    <|im_start|>user\\n{image block}{Q1}<|im_end|>\\n<|im_start|>assistant\\n{A1}<|im_end|>\\n …

The part holding the image block goes through the processor (so it expands to the right number of visual tokens);
the compression tokens and the dialogue are tokenised piece by piece and concatenated, so every boundary is exact.
Question and answer text is tokenised with special tokens split, so a literal ``<|image_pad|>`` or ``<|im_end|>``
inside data is plain text and can never fake a vision slot or a turn end. Each answer is tokenised on its own,
as it is produced at generation time after ``<|im_start|>assistant\\n``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from coma.backbones.qwen_vl import QWEN_IMAGE_BLOCK
from coma.compression import compression_token_ids
from coma.config import ComaConfig
from coma.data.formats import Conversation, DataFormatError
from coma.data.images import ImageLoadError, load_image
from coma.embedder import apply_pixel_bounds

logger = logging.getLogger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "LAYOUTS",
    "SUPERVISE_MODES",
    "TEXT_COMPRESS_PROMPT",
    "SampleLayout",
    "Stage1Batch",
    "Stage1BatchBuilder",
    "Stage1Collator",
    "TurnPieces",
    "TurnSpan",
    "layout_sample",
]

IGNORE_INDEX = -100
SUPERVISE_MODES = ("answers", "dialogue")
LAYOUTS = ("compress", "chat")
# Encoder prompt of a record without an image (the released code's text-only variant). A config may override it
# with extra["text_compress_prompt"].
TEXT_COMPRESS_PROMPT = "\nSummarize above text in a few words."
USER_OPEN = "<|im_start|>user\n"
QUESTION_CLOSE = "<|im_end|>\n<|im_start|>assistant\n"
ANSWER_CLOSE = "<|im_end|>\n"


@dataclass(frozen=True)
class TurnSpan:
    """Token positions of one Q/A turn in the unpadded sequence (ends are exclusive)."""

    start: int  # first token of the turn (`<|im_start|>` of the user line; in the chat layout turn 0 starts at 0)
    answer_start: int  # first token of the answer text
    answer_end: int  # one past the answer's closing `<|im_end|>`
    end: int  # one past the turn's trailing newline


@dataclass(frozen=True)
class SampleLayout:
    """One assembled sample before padding."""

    id: str
    input_ids: list[int]
    labels: list[int]
    mm_token_type_ids: list[int]
    c_start: int  # first compression token (== c_end == 0 in the chat layout)
    c_end: int  # one past the last compression token: the first dialogue token
    turns: tuple[TurnSpan, ...]
    dropped_turns: int

    @property
    def answer_start(self) -> int:
        """First token of the first answer (the split-layer masks' answer boundary)."""
        return self.turns[0].answer_start


@dataclass(frozen=True)
class TurnPieces:
    question: list[int]  # everything before the answer text, template tokens included
    answer: list[int]
    close: list[int]  # `<|im_end|>` + newline


def layout_sample(
    sample_id: str,
    prefix_ids: Sequence[int],
    prefix_types: Sequence[int],
    compression_ids: Sequence[int],
    turns: Sequence[TurnPieces],
    supervise: str = "answers",
    max_length: int | None = None,
) -> SampleLayout | None:
    """Assemble ``prefix + C + turns`` with labels; None when not even the first turn fits in ``max_length``.

    Trailing turns that do not fit are dropped whole; the prefix (image block) and C are never cut.
    """
    head = len(prefix_ids) + len(compression_ids)
    kept, length = 0, head
    for turn in turns:
        size = len(turn.question) + len(turn.answer) + len(turn.close)
        if max_length is not None and length + size > max_length:
            break
        kept, length = kept + 1, length + size
    if kept == 0:
        return None
    ids = [*prefix_ids, *compression_ids]
    labels = [IGNORE_INDEX] * head
    spans = []
    for turn in turns[:kept]:
        start = len(ids)
        answer_start = start + len(turn.question)
        answer_end = answer_start + len(turn.answer) + 1  # the closing <|im_end|> is part of the answer
        ids += [*turn.question, *turn.answer, *turn.close]
        if supervise == "dialogue":
            labels += [*turn.question, *turn.answer, *turn.close]
        else:
            labels += [IGNORE_INDEX] * len(turn.question)
            labels += [*turn.answer, turn.close[0]]
            labels += [IGNORE_INDEX] * (len(turn.close) - 1)
        spans.append(TurnSpan(start, answer_start, answer_end, len(ids)))
    types = [*prefix_types, *[0] * (len(ids) - len(prefix_types))]
    c_start = len(prefix_ids) if compression_ids else 0
    return SampleLayout(
        id=sample_id,
        input_ids=ids,
        labels=labels,
        mm_token_type_ids=types,
        c_start=c_start,
        c_end=c_start + len(compression_ids),
        turns=tuple(spans),
        dropped_turns=len(turns) - kept,
    )


def pad_layouts(layouts: Sequence[SampleLayout], pad_id: int) -> dict[str, Tensor]:
    """Right-padded tensors: input_ids, attention_mask, labels, mm_token_type_ids, c_start, c_end, answer_start."""
    batch = len(layouts)
    length = max((len(layout.input_ids) for layout in layouts), default=0)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    token_types = torch.zeros((batch, length), dtype=torch.long)
    for row, layout in enumerate(layouts):
        size = len(layout.input_ids)
        input_ids[row, :size] = torch.tensor(layout.input_ids)
        labels[row, :size] = torch.tensor(layout.labels)
        attention_mask[row, :size] = 1
        token_types[row, :size] = torch.tensor(layout.mm_token_type_ids)

    def column(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long)

    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "mm_token_type_ids": token_types,
        "c_start": column([layout.c_start for layout in layouts]),
        "c_end": column([layout.c_end for layout in layouts]),
        "answer_start": column([layout.answer_start for layout in layouts]),
    }


@dataclass
class Stage1Batch:
    """Model tensors of the kept samples, their layouts (in batch order), and what was cut."""

    tensors: dict[str, Tensor]
    samples: list[SampleLayout]
    dropped_ids: list[str]

    @property
    def dropped(self) -> int:
        return len(self.dropped_ids)

    @property
    def dropped_turns(self) -> int:
        return sum(sample.dropped_turns for sample in self.samples)


class Stage1BatchBuilder:
    """Builds stage-1 (``layout="compress"``) or stage-0 (``layout="chat"``) batches from conversations.

    ``processor`` is the loaded model's processor (its tokenizer must already hold the compression tokens for the
    compress layout); ``image_block`` is the backbone adapter's (``adapter.image_block``).
    """

    def __init__(
        self,
        processor: Any,
        config: ComaConfig,
        *,
        max_length: int | None = None,
        supervise: str = "answers",
        layout: str = "compress",
        image_block: str = QWEN_IMAGE_BLOCK,
    ) -> None:
        if supervise not in SUPERVISE_MODES:
            raise ValueError(f"supervise must be one of {SUPERVISE_MODES}, got {supervise!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if layout == "chat" and supervise != "answers":
            raise ValueError("the chat layout supervises answers only (supervise='answers')")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be a positive integer or None, got {max_length}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.config = config
        self.max_length = max_length
        self.supervise = supervise
        self.layout = layout
        self.image_block = image_block
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            raise ValueError(
                "the tokenizer has no pad token; set tokenizer.pad_token before building batches"
            )
        self.compression_ids = compression_token_ids(self.tokenizer, config) if layout == "compress" else []
        self.text_prompt = config.extra.get("text_compress_prompt", TEXT_COMPRESS_PROMPT)
        self._user_open, self._question_close, self._answer_close = self._template_ids(
            [USER_OPEN, QUESTION_CLOSE, ANSWER_CLOSE]
        )

    def _template_ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _content_ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def prefix_text(self, has_image: bool) -> str:
        """The text that goes through the processor: everything up to the compression tokens or first question."""
        image = self.image_block if has_image else ""
        if self.layout == "chat":
            return USER_OPEN + image
        return image + (self.config.compress_prompt if has_image else self.text_prompt)

    def _turn_pieces(self, conversations: Sequence[Conversation]) -> list[list[TurnPieces]]:
        questions = self._content_ids([q for conv in conversations for q, _ in conv.turns])
        answers = self._content_ids([a for conv in conversations for _, a in conv.turns])
        pieces, index = [], 0
        for conv in conversations:
            turns = []
            for number in range(len(conv.turns)):
                # In the chat layout the first user line is opened in the processed prefix, before the image.
                opener = [] if self.layout == "chat" and number == 0 else self._user_open
                question = [*opener, *questions[index], *self._question_close]
                turns.append(TurnPieces(question, answers[index], self._answer_close))
                index += 1
            pieces.append(turns)
        return pieces

    def _process_prefixes(
        self, conversations: Sequence[Conversation], images: Sequence[Image.Image | None]
    ) -> tuple[list[list[int]], list[list[int]], list[tuple[Tensor, Tensor] | None]]:
        """Per sample: prefix ids, prefix token types, and (pixel rows, grid) of its image or None."""
        texts = [self.prefix_text(image is not None) for image in images]
        present = [image for image in images if image is not None]
        processed = self.processor(
            text=texts,
            images=present or None,
            return_tensors="pt",
            padding=True,
            padding_side="right",
        )
        lengths = processed["attention_mask"].sum(dim=1).tolist()
        ids = [row[:n].tolist() for row, n in zip(processed["input_ids"], lengths, strict=True)]
        token_types = processed.get("mm_token_type_ids")
        if token_types is None:
            types = [[0] * n for n in lengths]
        else:
            types = [row[:n].tolist() for row, n in zip(token_types, lengths, strict=True)]
        per_image: list[tuple[Tensor, Tensor]] = []
        if present:
            grids = processed["image_grid_thw"]
            rows = grids.prod(dim=1).tolist()
            chunks = processed["pixel_values"].split(rows)
            per_image = [(chunk, grid) for chunk, grid in zip(chunks, grids, strict=True)]
        image_iter = iter(per_image)
        visual = [next(image_iter) if image is not None else None for image in images]
        return ids, types, visual

    def build(
        self, conversations: Sequence[Conversation], images: Sequence[Image.Image | None]
    ) -> Stage1Batch:
        """Lay out, truncate, label and right-pad; ``images[i]`` is conversation i's loaded image or None."""
        if len(images) != len(conversations):
            raise ValueError(f"got {len(conversations)} conversations but {len(images)} images")
        for conv, image in zip(conversations, images, strict=True):
            if bool(conv.image) != (image is not None):
                state = "has no image" if image is None else "has an image"
                raise ValueError(
                    f"{conv.source}, row {conv.row}, field 'image': conversation {conv.id!r} {state} loaded"
                    f" but its record says image={conv.image!r}"
                )
        if not conversations:
            return Stage1Batch(pad_layouts([], self.pad_id), [], [])
        prefix_ids, prefix_types, visual = self._process_prefixes(conversations, images)
        kept: list[SampleLayout] = []
        kept_visual: list[tuple[Tensor, Tensor]] = []
        dropped: list[str] = []
        for conv, ids, types, pieces, vis in zip(
            conversations, prefix_ids, prefix_types, self._turn_pieces(conversations), visual, strict=True
        ):
            layout = layout_sample(
                str(conv.id), ids, types, self.compression_ids, pieces, self.supervise, self.max_length
            )
            if layout is None:
                dropped.append(str(conv.id))
                continue
            kept.append(layout)
            if vis is not None:
                kept_visual.append(vis)
        tensors = pad_layouts(kept, self.pad_id)
        if kept_visual:
            tensors["pixel_values"] = torch.cat([pixels for pixels, _ in kept_visual])
            tensors["image_grid_thw"] = torch.stack([grid for _, grid in kept_visual])
        return Stage1Batch(tensors, kept, dropped)


class Stage1Collator:
    """``list[Conversation] -> batch dict`` for a DataLoader.

    The dict holds the model tensors (input_ids, attention_mask, labels, mm_token_type_ids, c_start, c_end,
    answer_start, and pixel_values / image_grid_thw when any kept sample has an image) plus two ints for logging:
    ``dropped`` (samples where not even one Q/A fits ``max_length``) and ``dropped_turns`` (trailing turns cut
    from kept samples). If every sample is dropped the tensors have zero rows.
    The image processor's pixel bounds are set from ``config.min_pixels`` / ``config.max_pixels``. With
    ``skip_bad`` a conversation whose image cannot be read is left out and recorded in ``skipped_rows``.
    """

    def __init__(
        self,
        processor: Any,
        config: ComaConfig,
        image_root: str | os.PathLike | None = None,
        max_length: int | None = None,
        supervise: str = "answers",
        layout: str = "compress",
        image_block: str = QWEN_IMAGE_BLOCK,
        skip_bad: bool = False,
    ) -> None:
        apply_pixel_bounds(processor, config)
        self.skip_bad = skip_bad
        self.skipped_rows: set[tuple[str, int]] = set()
        self.builder = Stage1BatchBuilder(
            processor,
            config,
            max_length=max_length,
            supervise=supervise,
            layout=layout,
            image_block=image_block,
        )
        self.image_root = image_root

    def load_images(
        self, conversations: Sequence[Conversation]
    ) -> tuple[list[Conversation], list[Image.Image | None]]:
        """The conversations whose image loads (all of them, or an error, without ``skip_bad``) and their images."""
        kept, images = [], []
        for conv in conversations:
            image = None
            if conv.image:
                try:
                    image = load_image(conv.image, self.image_root)
                except ImageLoadError as error:
                    error = DataFormatError(conv.source, conv.row, "image", str(error))
                    if not self.skip_bad:
                        raise error from None
                    if (conv.source, conv.row) not in self.skipped_rows:
                        self.skipped_rows.add((conv.source, conv.row))
                        logger.warning("skipping a conversation (--skip-bad): %s", error)
                    continue
            kept.append(conv)
            images.append(image)
        return kept, images

    def build(self, conversations: Sequence[Conversation]) -> Stage1Batch:
        return self.builder.build(*self.load_images(conversations))

    def __call__(self, conversations: Sequence[Conversation]) -> dict[str, Any]:
        batch = self.build(conversations)
        return {**batch.tensors, "dropped": batch.dropped, "dropped_turns": batch.dropped_turns}
