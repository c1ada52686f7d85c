"""Stage-1 objective: the attention bottleneck holds in the real model, and the loss is the masked CE."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import FAMILIES, random_image

from coma.backbones import load_backbone
from coma.compression import add_compression_tokens
from coma.config import ComaConfig
from coma.data.formats import Conversation
from coma.train.config import LoraSettings
from coma.train.stage1_data import IGNORE_INDEX, Stage1BatchBuilder
from coma.train.stage1_model import Stage1Objective
from coma.train.trainable import make_trainable

CONFIG = ComaConfig(num_tokens=4)
TURNS = (("What colour is the object?", "Red."), ("Where is the circle?", "At the top left."))


def load(folder, attn_implementation="eager"):
    model, processor, adapter = load_backbone(folder, attn_implementation=attn_implementation)
    add_compression_tokens(model, processor.tokenizer, CONFIG)
    return model.eval(), processor, adapter


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request, tiny_model_dirs):
    return load(tiny_model_dirs[request.param])


def make_batch(processor, images, supervise="answers", text_only=False):
    convs = [Conversation(f"s{i}", "x.png", TURNS[: 1 + i % 2], "d.jsonl", i) for i in range(len(images))]
    if text_only:
        convs.append(Conversation("t", "", TURNS[1:], "d.jsonl", 9))
        images = [*images, None]
    return Stage1BatchBuilder(processor, CONFIG, supervise=supervise).build(convs, images).tensors


def rows(batch, row):
    """(length, c_start, c_end, answer_start) of one sample."""
    length = int(batch["attention_mask"][row].sum())
    return length, *(int(batch[key][row]) for key in ("c_start", "c_end", "answer_start"))


# ---------------------------------------------------------------------------------------------------------------
# Attention mass under eager attention


@pytest.mark.parametrize("mode", ["bottleneck", "none", "split_layer"])
def test_attention_mass_from_dialogue_to_encoder(loaded, mode):
    model, processor, adapter = loaded
    batch = make_batch(processor, [random_image(0), random_image(1, (84, 112))], text_only=True)
    split = 1 if mode == "split_layer" else None
    objective = Stage1Objective(model, adapter, mask_mode=mode, split_layer=split)
    with torch.no_grad():
        attentions = objective.backbone_outputs(batch, output_attentions=True).attentions
    assert len(attentions) == len(adapter.decoder_layers(model)) == 2
    for layer, attention in enumerate(attentions):
        for row in range(batch["input_ids"].shape[0]):
            length, cs, ce, ans = rows(batch, row)
            a = attention[row, :, :length, :length]
            dec_to_enc = a[:, ce:, :cs]
            c_to_enc = a[:, cs:ce, :cs]
            question_to_enc = a[:, ce:ans, :cs]
            answer_to_c = a[:, ans:, cs:ce]
            if mode == "bottleneck":
                assert (dec_to_enc == 0).all(), f"layer {layer} row {row}: dialogue sees ENC"
                assert (c_to_enc.sum(-1) > 0).all() and (a[:, ce:, cs:ce].sum(-1) > 0).all()
            elif mode == "none":
                assert (dec_to_enc.sum(-1) > 0).all()
            elif layer < split:  # lower: C and the question read ENC; the answers see neither ENC nor C
                assert (a[:, ans:, :ce] == 0).all()
                assert (c_to_enc.sum(-1) > 0).all() and (question_to_enc.sum(-1) > 0).all()
            else:  # upper: nothing from C on sees ENC; answers still see no C
                assert (a[:, cs:, :cs] == 0).all() and (answer_to_c == 0).all()
                assert (a[:, ce:ans, cs:ce].sum(-1) > 0).all()
            # No real row attends to padding.
            assert (attention[row, :, :length, length:] == 0).all()


def test_bidirectional_c_sees_later_compression_tokens(loaded):
    model, processor, adapter = loaded
    batch = make_batch(processor, [random_image(0)])
    _, cs, ce, _ = rows(batch, 0)
    with torch.no_grad():
        for bidirectional in (False, True):
            objective = Stage1Objective(model, adapter, bidirectional_c=bidirectional)
            attention = objective.backbone_outputs(batch, output_attentions=True).attentions[-1][0]
            later = torch.ones(ce - cs, ce - cs, dtype=torch.bool).triu(diagonal=1)
            upper = attention[:, cs:ce, cs:ce][:, later]
            assert (upper > 0).all() if bidirectional else (upper == 0).all()
            assert (attention[:, ce:, :cs] == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# End to end: the dialogue reads the image only through the compression tokens' states


@contextlib.contextmanager
def on_layer_inputs(layers, edit):
    """``edit(layer_index, hidden_states) -> hidden_states | None`` on every decoder layer's input."""

    def hook(index, module, args, kwargs):
        new = edit(index, args[0])
        return None if new is None else ((new, *args[1:]), kwargs)

    handles = [
        layer.register_forward_pre_hook(lambda m, a, k, i=i: hook(i, m, a, k), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run(objective, batch, edit=None):
    """(DEC logits of sample 0, per-layer input hidden states)."""
    recorded = {}

    def record(index, hidden):
        recorded[index] = hidden.detach().clone()
        return edit(index, hidden) if edit is not None else None

    with torch.no_grad(), on_layer_inputs(objective.adapter.decoder_layers(objective.backbone), record):
        logits = objective.backbone_outputs(batch).logits
    length, _, ce, _ = rows(batch, 0)
    return logits[0, ce:length].float(), recorded


def replace_positions(*replacements):
    """Edit that overwrites, at every layer input, ``positions`` by the recorded ``states`` of another run."""

    def edit(index, hidden):
        hidden = hidden.clone()
        for states, positions in replacements:
            hidden[:, positions] = states[index][:, positions]
        return hidden

    return edit


@pytest.mark.parametrize("mode", ["bottleneck", "none"])
def test_dialogue_depends_on_image_only_through_compression_states(loaded, mode):
    model, processor, adapter = loaded
    objective = Stage1Objective(model, adapter, mask_mode=mode)
    # Same size images: same visual-token count and positions, only the pixels differ.
    batch_a = make_batch(processor, [random_image(10, (112, 112))])
    batch_b = make_batch(processor, [random_image(11, (112, 112))])
    _, cs, ce, _ = rows(batch_a, 0)
    enc, comp = torch.arange(0, cs), torch.arange(cs, ce)
    dec_a, states_a = run(objective, batch_a)
    dec_b, states_b = run(objective, batch_b)
    assert (dec_a - dec_b).abs().max() > 1e-3  # the image matters to the dialogue
    # B's pixels, but every layer's compression-token states taken from A's run: the dialogue follows A.
    c_from_a, _ = run(objective, batch_b, replace_positions((states_a, comp)))
    # A's image/prompt states but B's compression states at every layer: the dialogue stays B's.
    enc_from_a, _ = run(objective, batch_b, replace_positions((states_a, enc), (states_b, comp)))
    if mode == "bottleneck":
        torch.testing.assert_close(c_from_a, dec_a, atol=1e-5, rtol=0)
        torch.testing.assert_close(enc_from_a, dec_b, atol=1e-5, rtol=0)
    else:  # without the bottleneck the dialogue reads the image tokens directly
        assert (c_from_a - dec_a).abs().max() > 1e-3
        assert (enc_from_a - dec_b).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# The loss


def brute_force_loss(logits, labels):
    total, count = 0.0, 0
    for row in range(labels.shape[0]):
        for position in range(labels.shape[1] - 1):
            target = int(labels[row, position + 1])
            if target != IGNORE_INDEX:
                total -= torch.log_softmax(logits[row, position].double(), dim=-1)[target].item()
                count += 1
    return total / count, count


@pytest.mark.parametrize("supervise", ["answers", "dialogue"])
def test_loss_is_masked_token_cross_entropy(loaded, supervise):
    model, processor, adapter = loaded
    batch = make_batch(processor, [random_image(2), random_image(3, (56, 84))], supervise, text_only=True)
    objective = Stage1Objective(model, adapter)
    with torch.no_grad():
        output = objective(batch)
        full_logits = objective.backbone_outputs(batch).logits
    expected, count = brute_force_loss(full_logits, batch["labels"])
    assert output.supervised_tokens == count == int((batch["labels"] != IGNORE_INDEX).sum())
    assert output.total_tokens == int(batch["attention_mask"].sum())
    assert output.loss.item() == pytest.approx(expected, abs=1e-5)
    summed = Stage1Objective(model, adapter, reduction="sum")
    with torch.no_grad():
        assert summed(batch).loss.item() == pytest.approx(expected * count, rel=1e-5)


def to_left_padding(batch):
    left = dict(batch)
    lengths = batch["attention_mask"].sum(dim=1)
    shifts = batch["attention_mask"].shape[1] - lengths
    for key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
        left[key] = torch.stack([row.roll(int(s)) for row, s in zip(batch[key], shifts, strict=True)])
    for key in ("c_start", "c_end", "answer_start"):
        left[key] = batch[key] + shifts
    return left


@pytest.mark.parametrize("mode", ["bottleneck", "split_layer"])
def test_padding_side_does_not_change_the_loss(loaded, mode):
    model, processor, adapter = loaded
    batch = make_batch(processor, [random_image(4), random_image(5, (56, 56))], text_only=True)
    left = to_left_padding(batch)
    assert left["attention_mask"][:, 0].tolist() != batch["attention_mask"][:, 0].tolist()
    objective = Stage1Objective(
        model, adapter, mask_mode=mode, split_layer=1 if mode == "split_layer" else None
    )
    with torch.no_grad():
        assert objective(left).loss.item() == pytest.approx(objective(batch).loss.item(), abs=1e-5)


def test_sdpa_matches_eager_and_applies_the_mask(loaded, tiny_model_dirs):
    model, processor, adapter = loaded
    family = adapter.family
    sdpa_model, _, _ = load(tiny_model_dirs[family], attn_implementation="sdpa")
    batch = make_batch(processor, [random_image(6), random_image(7, (84, 56))], text_only=True)
    losses = {}
    with torch.no_grad():
        for mode, split in (("bottleneck", None), ("none", None), ("split_layer", 1)):
            eager = Stage1Objective(model, adapter, mask_mode=mode, split_layer=split)(batch).loss.item()
            sdpa = Stage1Objective(sdpa_model, adapter, mask_mode=mode, split_layer=split)(batch).loss.item()
            assert sdpa == pytest.approx(eager, abs=1e-5), mode
            losses[mode] = sdpa
    assert abs(losses["bottleneck"] - losses["none"]) > 1e-4
    assert abs(losses["split_layer"] - losses["bottleneck"]) > 1e-4


def gradients(model, objective, batch):
    model.zero_grad(set_to_none=True)
    objective(batch).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_split_layer_survives_gradient_checkpointing(tiny_model_dirs):
    model, processor, adapter = load(tiny_model_dirs["qwen2_vl"])
    batch = make_batch(processor, [random_image(8)], text_only=True)
    objective = Stage1Objective(model, adapter, mask_mode="split_layer", split_layer=1)
    model.train()
    plain = gradients(model, objective, batch)
    adapter.enable_activation_checkpointing(model)
    checkpointed = gradients(model, objective, batch)
    assert adapter.decoder_layers(model)[0].gradient_checkpointing
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_peft_wrapped_backbone(tiny_model_dirs):
    model, processor, adapter = load(tiny_model_dirs["qwen2_5_vl"])
    batch = make_batch(processor, [random_image(9)], text_only=True)
    with torch.no_grad():
        before = Stage1Objective(model, adapter, mask_mode="split_layer", split_layer=1)(batch).loss.item()
    token_ids = processor.tokenizer.convert_tokens_to_ids(CONFIG.token_strings)
    wrapped = make_trainable(model, adapter, token_ids, LoraSettings(dropout=0.0)).eval()
    # The split-layer hooks find the decoder layers through the peft wrapper; LoRA/DoRA start as the identity.
    output = Stage1Objective(wrapped, adapter, mask_mode="split_layer", split_layer=1)(batch)
    assert output.loss.item() == pytest.approx(before, abs=1e-5)
    output.loss.backward()
    lora = [p.grad for name, p in wrapped.named_parameters() if "lora_B" in name]
    assert lora and all(g is not None and g.abs().sum() > 0 for g in lora)


def test_bf16_backbone_with_fp32_adapter_weights(tiny_model_dirs):
    # The GPU recipe: bf16 weights, peft keeps LoRA/DoRA and token deltas in fp32; sdpa needs the mask in bf16.
    model, processor, adapter = load_backbone(tiny_model_dirs["qwen2_vl"], dtype=torch.bfloat16)
    token_ids = add_compression_tokens(model, processor.tokenizer, CONFIG)
    wrapped = make_trainable(model, adapter, token_ids, LoraSettings())
    assert any(p.dtype == torch.float32 for p in wrapped.parameters() if p.requires_grad)
    batch = make_batch(processor, [random_image(12)])
    objective = Stage1Objective(wrapped, adapter, mask_mode="split_layer", split_layer=1)
    assert all(mask.dtype == torch.bfloat16 for mask in objective.attention_masks(batch))
    output = objective(batch)
    output.loss.backward()
    assert output.loss.dtype == torch.float32 and torch.isfinite(output.loss)


def test_empty_batch_and_bad_arguments(loaded):
    model, processor, adapter = loaded
    builder = Stage1BatchBuilder(processor, CONFIG, max_length=4)
    empty = builder.build([Conversation("a", "", TURNS, "d.jsonl", 1)], [None])
    assert empty.dropped == 1
    output = Stage1Objective(model, adapter)(empty.tensors)
    assert output.loss.item() == 0.0 and output.supervised_tokens == output.total_tokens == 0
    output.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="mask_mode"):
        Stage1Objective(model, adapter, mask_mode="causal")
    with pytest.raises(ValueError, match="split_layer must be in"):
        Stage1Objective(model, adapter, mask_mode="split_layer", split_layer=2)
    with pytest.raises(ValueError, match="needs split_layer"):
        Stage1Objective(model, adapter, mask_mode="split_layer")
    with pytest.raises(ValueError, match="only used with"):
        Stage1Objective(model, adapter, split_layer=1)
    with pytest.raises(ValueError, match="bidirectional_c"):
        Stage1Objective(model, adapter, mask_mode="split_layer", split_layer=1, bidirectional_c=True)


def test_split_layer_masks_stay_with_their_own_forward(loaded):
    """The split-layer hooks outlive the forward (for backward's recompute) but must not touch any other call."""
    model, processor, adapter = loaded
    batch = make_batch(processor, [random_image(9), random_image(10)], text_only=True)
    bottleneck = Stage1Objective(model, adapter, mask_mode="bottleneck")
    split = Stage1Objective(model, adapter, mask_mode="split_layer", split_layer=1)
    with torch.no_grad():
        before = bottleneck(batch).loss.item()
        split_loss = split(batch).loss.item()
        assert abs(split_loss - before) > 1e-4
        assert bottleneck(batch).loss.item() == before
        assert split(batch).loss.item() == split_loss
