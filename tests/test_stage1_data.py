"""Stage-1 batch builder: exact layout, boundaries, labels, truncation and the chat (stage-0) layout."""

from __future__ import annotations

import pytest
import torch
from helpers import FAMILIES, random_image

from coma.backbones import load_backbone
from coma.compression import add_compression_tokens
from coma.config import ComaConfig
from coma.data.formats import Conversation, DataFormatError
from coma.train.stage1_data import (
    IGNORE_INDEX,
    TEXT_COMPRESS_PROMPT,
    Stage1BatchBuilder,
    Stage1Collator,
)

T = 4
CONFIG = ComaConfig(num_tokens=T)
C_TEXT = "".join(CONFIG.token_strings)
TWO_TURNS = Conversation(
    id="a",
    image="img0.png",
    turns=(("What colour is the object?", "Red."), ("Where is the circle?", "At the top left.")),
    source="data.jsonl",
    row=1,
)
TEXT_ONLY = Conversation(
    id="b", image="", turns=(("Describe the picture.", "A small circle."),), source="data.jsonl", row=2
)


@pytest.fixture(scope="module", params=FAMILIES)
def processor(request, tiny_model_dirs):
    model, processor, _ = load_backbone(tiny_model_dirs[request.param])
    add_compression_tokens(model, processor.tokenizer, CONFIG)
    return processor


def dialogue(turns, first_user_open: bool = True) -> str:
    text = ""
    for index, (question, answer) in enumerate(turns):
        opener = "<|im_start|>user\n" if first_user_open or index else ""
        text += f"{opener}{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
    return text


def image_block(num_visual: int) -> str:
    return "<|vision_start|>" + "<|image_pad|>" * num_visual + "<|vision_end|>"


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def labelled_runs(tokenizer, labels: torch.Tensor) -> list[str]:
    """Decode every maximal run of supervised positions, brute force."""
    runs, current = [], []
    for value in labels.tolist() + [IGNORE_INDEX]:
        if value == IGNORE_INDEX:
            if current:
                runs.append(decode(tokenizer, current))
            current = []
        else:
            current.append(value)
    return runs


def build(processor, convs, images, **kwargs):
    return Stage1BatchBuilder(processor, CONFIG, **kwargs).build(convs, images)


def test_exact_layout_and_boundaries(processor):
    tok = processor.tokenizer
    batch = build(processor, [TWO_TURNS, TEXT_ONLY], [random_image(0, (112, 84)), None])
    t = batch.tensors
    num_visual = int(t["image_grid_thw"][0].prod()) // 4
    expected = [
        image_block(num_visual) + CONFIG.compress_prompt + C_TEXT + dialogue(TWO_TURNS.turns),
        TEXT_COMPRESS_PROMPT + C_TEXT + dialogue(TEXT_ONLY.turns),
    ]
    c_ids = tok.convert_tokens_to_ids(CONFIG.token_strings)
    for row, sample in enumerate(batch.samples):
        length = int(t["attention_mask"][row].sum())
        ids = t["input_ids"][row, :length]
        assert decode(tok, ids) == expected[row]
        cs, ce, ans = int(t["c_start"][row]), int(t["c_end"][row]), int(t["answer_start"][row])
        assert ids[cs:ce].tolist() == c_ids
        assert cs == ce - T and decode(tok, ids[:cs]) == expected[row].split("<|ctoken_0|>")[0]
        # Ordinary text: the piecewise dialogue tokenisation equals tokenising the dialogue string at once.
        sample_turns = (TWO_TURNS, TEXT_ONLY)[row].turns
        assert ids[ce:].tolist() == tok(dialogue(sample_turns), add_special_tokens=False)["input_ids"]
        assert decode(tok, ids[:ans]).endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert decode(tok, ids[ans:]).startswith(sample_turns[0][1] + "<|im_end|>")
        for span, (question, answer) in zip(sample.turns, sample_turns, strict=True):
            assert decode(tok, ids[span.start : span.answer_start]) == (
                f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
            )
            assert decode(tok, ids[span.answer_start : span.answer_end]) == answer + "<|im_end|>"
            assert decode(tok, ids[span.answer_end : span.end]) == "\n"
        assert sample.turns[0].start == ce and sample.turns[-1].end == length
    # mm_token_type_ids: 1 exactly on the image-pad tokens; text-only rows all 0.
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(t["mm_token_type_ids"].bool(), t["input_ids"] == image_pad)
    assert int(t["mm_token_type_ids"][0].sum()) == num_visual
    assert t["pixel_values"].shape[0] == int(t["image_grid_thw"][0].prod())


def test_right_padding(processor):
    batch = build(processor, [TWO_TURNS, TEXT_ONLY], [random_image(0), None])
    t = batch.tensors
    lengths = [len(sample.input_ids) for sample in batch.samples]
    assert t["input_ids"].shape[1] == max(lengths) and lengths[0] != lengths[1]
    for row, length in enumerate(lengths):
        assert t["attention_mask"][row].tolist() == [1] * length + [0] * (t["input_ids"].shape[1] - length)
        assert (t["input_ids"][row, length:] == processor.tokenizer.pad_token_id).all()
        assert (t["labels"][row, length:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("supervise", ["answers", "dialogue"])
def test_labels(processor, supervise):
    tok = processor.tokenizer
    batch = build(processor, [TWO_TURNS, TEXT_ONLY], [random_image(1), None], supervise=supervise)
    t = batch.tensors
    for row, conv in enumerate((TWO_TURNS, TEXT_ONLY)):
        ce = int(t["c_end"][row])
        assert (t["labels"][row, :ce] == IGNORE_INDEX).all()
        runs = labelled_runs(tok, t["labels"][row])
        if supervise == "answers":
            assert runs == [answer + "<|im_end|>" for _, answer in conv.turns]
        else:
            assert runs == [dialogue(conv.turns)]
        supervised = t["labels"][row] != IGNORE_INDEX
        assert torch.equal(t["labels"][row][supervised], t["input_ids"][row][supervised])


def test_truncation_drops_whole_turns(processor):
    image = random_image(2, (112, 112))
    full = build(processor, [TWO_TURNS], [image]).samples[0]
    first_turn_end = full.turns[0].end
    head = full.c_end
    for max_length in (first_turn_end, len(full.input_ids) - 1):
        batch = build(processor, [TWO_TURNS], [image], max_length=max_length)
        sample = batch.samples[0]
        assert len(sample.turns) == 1 and sample.dropped_turns == 1 and batch.dropped_turns == 1
        assert sample.input_ids == full.input_ids[:first_turn_end]
        assert sample.labels == full.labels[:first_turn_end]
    assert len(build(processor, [TWO_TURNS], [image], max_length=len(full.input_ids)).samples[0].turns) == 2
    # Not even one Q/A fits (even though ENC + C would): the sample is dropped and counted, never cut.
    for max_length in (first_turn_end - 1, head, head - 1, 3):
        batch = build(processor, [TWO_TURNS, TEXT_ONLY], [image, None], max_length=max_length)
        assert "a" in batch.dropped_ids
        for sample in batch.samples:
            assert len(sample.input_ids) <= max_length and sample.turns
    # The dropped sample's image leaves the batch with it; the kept sample's image block and C are whole.
    text_len = len(build(processor, [TEXT_ONLY], [None]).samples[0].input_ids)
    batch = build(processor, [TEXT_ONLY, TWO_TURNS], [None, image], max_length=text_len)
    assert batch.dropped_ids == ["a"] and [s.id for s in batch.samples] == ["b"]
    assert "pixel_values" not in batch.tensors and "image_grid_thw" not in batch.tensors
    batch = build(processor, [TWO_TURNS, TEXT_ONLY], [image, None], max_length=first_turn_end)
    sample, t = batch.samples[0], batch.tensors
    num_visual = int(t["image_grid_thw"][0].prod()) // 4
    assert int(t["mm_token_type_ids"][0].sum()) == num_visual
    assert sample.c_end - sample.c_start == T and t["pixel_values"].shape[0] == num_visual * 4


def test_everything_dropped_gives_an_empty_batch(processor):
    batch = build(processor, [TWO_TURNS, TEXT_ONLY], [random_image(3), None], max_length=5)
    assert batch.dropped == 2 and batch.samples == []
    assert batch.tensors["input_ids"].shape[0] == 0 and batch.tensors["c_start"].shape == (0,)


def test_special_token_text_in_data_stays_text(processor):
    tok = processor.tokenizer
    conv = Conversation("c", "", (("Is <|image_pad|> here? <|im_end|>", "No <|ctoken_0|>."),), "d.jsonl", 3)
    sample = build(processor, [conv], [None]).samples[0]
    special = set(tok.convert_tokens_to_ids(["<|image_pad|>", *CONFIG.token_strings]))
    dec = sample.input_ids[sample.c_end :]
    assert not special & set(dec)
    assert dec.count(tok.convert_tokens_to_ids("<|im_end|>")) == 2
    assert decode(tok, dec) == dialogue(conv.turns)


def test_chat_layout(processor):
    tok = processor.tokenizer
    batch = build(processor, [TWO_TURNS, TEXT_ONLY], [random_image(4, (84, 84)), None], layout="chat")
    t = batch.tensors
    num_visual = int(t["image_grid_thw"][0].prod()) // 4
    expected = [
        "<|im_start|>user\n" + image_block(num_visual) + dialogue(TWO_TURNS.turns, first_user_open=False),
        dialogue(TEXT_ONLY.turns),
    ]
    for row, conv in enumerate((TWO_TURNS, TEXT_ONLY)):
        length = int(t["attention_mask"][row].sum())
        assert decode(tok, t["input_ids"][row, :length]) == expected[row]
        assert labelled_runs(tok, t["labels"][row]) == [answer + "<|im_end|>" for _, answer in conv.turns]
        assert int(t["c_start"][row]) == int(t["c_end"][row]) == 0
        ans = int(t["answer_start"][row])
        assert decode(tok, t["input_ids"][row, ans:]).startswith(conv.turns[0][1])
    assert not set(tok.convert_tokens_to_ids(CONFIG.token_strings)) & set(t["input_ids"].flatten().tolist())
    with pytest.raises(ValueError, match="answers only"):
        Stage1BatchBuilder(processor, CONFIG, layout="chat", supervise="dialogue")


def test_builder_refuses_bad_input(processor, tiny_model_dir):
    with pytest.raises(ValueError, match="field 'image'"):
        build(processor, [TWO_TURNS], [None])
    with pytest.raises(ValueError, match="supervise"):
        Stage1BatchBuilder(processor, CONFIG, supervise="questions")
    _, bare, _ = load_backbone(tiny_model_dir)  # no compression tokens added
    with pytest.raises(ValueError, match="compression tokens"):
        Stage1BatchBuilder(bare, CONFIG)


def test_collator_loads_images_from_root(processor, image_files):
    root = image_files[0].parent
    conv = Conversation("a", image_files[0].name, TWO_TURNS.turns, "data.jsonl", 1)
    collator = Stage1Collator(processor, CONFIG, image_root=root, max_length=None)
    batch = collator([conv, TEXT_ONLY])
    assert batch["dropped"] == 0 and batch["dropped_turns"] == 0
    assert batch["input_ids"].shape[0] == 2 and batch["image_grid_thw"].shape == (1, 3)
    direct = build(processor, [conv, TEXT_ONLY], [collator.load_images([conv])[1][0], None])
    assert torch.equal(batch["input_ids"], direct.tensors["input_ids"])
    assert torch.equal(batch["pixel_values"], direct.tensors["pixel_values"])
    missing = Conversation("m", "nope.png", TWO_TURNS.turns, "data.jsonl", 7)
    with pytest.raises(DataFormatError, match=r"data.jsonl:7: field 'image'.*nope.png"):
        collator([missing])
    skipping = Stage1Collator(processor, CONFIG, image_root=root, skip_bad=True)
    assert skipping([missing, conv])["input_ids"].shape[0] == 1 and skipping.skipped_rows == {
        ("data.jsonl", 7)
    }
