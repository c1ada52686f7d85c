"""Stage-1 attention masks against a brute-force reference over every (b, i, j)."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from coma.masks import (
    allowed_from_additive,
    compression_attention_mask,
    per_layer_masks,
    split_layer_masks,
)


def random_layout(gen: torch.Generator, batch: int, length: int, side: str):
    """Random ENC | C | Q | A lengths per sample, padded on `side` ("right", "left" or "mixed" per sample)."""
    padding = torch.zeros(batch, length, dtype=torch.long)
    c_start, c_end, answer_start = (torch.zeros(batch, dtype=torch.long) for _ in range(3))
    for b in range(batch):
        n_enc = int(torch.randint(1, 6, (1,), generator=gen))
        n_c = int(torch.randint(1, 5, (1,), generator=gen))
        n_dec = int(torch.randint(1, length - n_enc - n_c + 1, (1,), generator=gen))
        n_q = int(torch.randint(0, n_dec + 1, (1,), generator=gen))
        real = n_enc + n_c + n_dec
        left = side == "left" or (side == "mixed" and b % 2 == 1)
        offset = length - real if left else 0
        padding[b, offset : offset + real] = 1
        c_start[b] = offset + n_enc
        c_end[b] = offset + n_enc + n_c
        answer_start[b] = offset + n_enc + n_c + n_q
    return padding, c_start, c_end, answer_start


def brute_compression(padding, c_start, c_end, mode, bidirectional_c):
    batch, length = padding.shape
    allowed = torch.zeros(batch, length, length, dtype=torch.bool)
    for b in range(batch):
        cs, ce = int(c_start[b]), int(c_end[b])
        for i in range(length):
            for j in range(length):
                if not padding[b, i]:
                    ok = i == j
                else:
                    ok = j <= i and bool(padding[b, j])
                    if mode == "bottleneck" and i >= ce and j < cs:
                        ok = False
                    if bidirectional_c and cs <= i < ce and cs <= j < ce and padding[b, j]:
                        ok = True
                allowed[b, i, j] = ok
    return allowed


def brute_split(padding, c_start, c_end, answer_start):
    batch, length = padding.shape
    lower = torch.zeros(batch, length, length, dtype=torch.bool)
    upper = torch.zeros_like(lower)
    for b in range(batch):
        cs, ce, ans = int(c_start[b]), int(c_end[b]), int(answer_start[b])
        for i in range(length):
            for j in range(length):
                if not padding[b, i]:
                    lower[b, i, j] = upper[b, i, j] = i == j
                    continue
                ok = j <= i and bool(padding[b, j]) and not (i >= ans and j < ce)
                lower[b, i, j] = ok
                upper[b, i, j] = ok and not (i >= cs and j < cs)
    return lower, upper


def assert_additive(mask: torch.Tensor, dtype: torch.dtype) -> None:
    assert mask.dtype == dtype
    blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype)
    assert bool(((mask == 0) | (mask == blocked)).all())
    assert bool((mask == 0).any(dim=-1).all()), "a row is fully masked"


@pytest.mark.parametrize("side", ["right", "left", "mixed"])
@pytest.mark.parametrize("mode", ["bottleneck", "none"])
@pytest.mark.parametrize("bidirectional_c", [False, True])
def test_compression_mask_matches_brute_force(side, mode, bidirectional_c):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{side}-{mode}-{bidirectional_c}".encode()))
    for _ in range(3):
        length = int(torch.randint(8, 20, (1,), generator=gen))
        padding, c_start, c_end, _ = random_layout(gen, 4, length, side)
        mask = compression_attention_mask(padding, c_start, c_end, mode=mode, bidirectional_c=bidirectional_c)
        assert mask.shape == (4, 1, length, length)
        assert_additive(mask, torch.float32)
        expected = brute_compression(padding, c_start, c_end, mode, bidirectional_c)
        assert torch.equal(allowed_from_additive(mask)[:, 0], expected)


def test_compression_mask_on_arbitrary_padding_pattern():
    # Holes in the middle are not a real layout, but the rules are defined per position and must still hold.
    gen = torch.Generator().manual_seed(7)
    padding = (torch.rand(5, 16, generator=gen) > 0.3).long()
    c_start = torch.randint(0, 9, (5,), generator=gen)
    c_end = c_start + torch.randint(0, 8, (5,), generator=gen)
    for mode in ("bottleneck", "none"):
        for bidirectional_c in (False, True):
            mask = compression_attention_mask(
                padding, c_start, c_end, mode=mode, bidirectional_c=bidirectional_c
            )
            assert_additive(mask, torch.float32)
            expected = brute_compression(padding, c_start, c_end, mode, bidirectional_c)
            assert torch.equal(allowed_from_additive(mask)[:, 0], expected)


@pytest.mark.parametrize("side", ["right", "left", "mixed"])
def test_split_layer_masks_match_brute_force(side):
    gen = torch.Generator().manual_seed(11 + len(side))
    for _ in range(3):
        length = int(torch.randint(8, 20, (1,), generator=gen))
        padding, c_start, c_end, answer_start = random_layout(gen, 4, length, side)
        lower, upper = split_layer_masks(padding, c_start, c_end, answer_start)
        assert_additive(lower, torch.float32)
        assert_additive(upper, torch.float32)
        exp_lower, exp_upper = brute_split(padding, c_start, c_end, answer_start)
        assert torch.equal(allowed_from_additive(lower)[:, 0], exp_lower)
        assert torch.equal(allowed_from_additive(upper)[:, 0], exp_upper)


def test_split_layer_upper_reads_as_the_released_chain():
    # One unpadded sample: ENC 0-2, C 3-4, Q 5-6, A 7-8.
    # At layers >= k: C sees only C, Q sees C + Q, A sees Q + A.
    padding = torch.ones(1, 9, dtype=torch.long)
    lower, upper = split_layer_masks(padding, torch.tensor([3]), torch.tensor([5]), torch.tensor([7]))
    up, low = allowed_from_additive(upper)[0, 0], allowed_from_additive(lower)[0, 0]
    assert up[4].tolist() == [False] * 3 + [True] * 2 + [False] * 4
    assert up[6].tolist() == [False] * 3 + [True] * 4 + [False] * 2
    assert up[8].tolist() == [False] * 5 + [True] * 4
    assert low[6].tolist() == [True] * 7 + [False] * 2, "below k the question still reads the image"
    assert low[8].tolist() == [False] * 5 + [True] * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtype_and_exact_values(dtype):
    padding = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]])
    c_start, c_end = torch.tensor([1, 3]), torch.tensor([3, 5])
    mask = compression_attention_mask(padding, c_start, c_end, dtype=dtype)
    assert_additive(mask, dtype)
    assert mask[1, 0, 0, 0] == 0, "a left-padding row sees its own position"
    assert mask[1, 0, 0, 1] == torch.finfo(dtype).min
    for part in split_layer_masks(padding, c_start, c_end, c_end, dtype=dtype):
        assert_additive(part, dtype)


def manual_attention(q, k, v, bias):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    return scores.softmax(dim=-1) @ v


def test_none_mask_as_bias_equals_causal_sdpa():
    gen = torch.Generator().manual_seed(3)
    batch, heads, length, dim = 2, 3, 10, 8
    q, k, v = (torch.randn(batch, heads, length, dim, generator=gen) for _ in range(3))
    padding = torch.ones(batch, length, dtype=torch.long)
    mask = compression_attention_mask(padding, torch.tensor([3, 4]), torch.tensor([6, 8]), mode="none")
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(manual_attention(q, k, v, mask), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), expected)


def test_bottleneck_hides_enc_from_dec_in_attention():
    gen = torch.Generator().manual_seed(5)
    heads, length, dim = 2, 12, 8
    padding = torch.tensor([[1] * 10 + [0] * 2, [0] * 3 + [1] * 9])
    c_start, c_end = torch.tensor([3, 6]), torch.tensor([6, 8])
    q, k, v = (torch.randn(2, heads, length, dim, generator=gen) for _ in range(3))
    mask = compression_attention_mask(padding, c_start, c_end)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert not out.isnan().any()
    k2, v2 = k.clone(), v.clone()
    for b in range(2):
        enc = slice(0, int(c_start[b]))
        k2[b, :, enc] += torch.randn_like(k2[b, :, enc])
        v2[b, :, enc] += 5.0
    out2 = F.scaled_dot_product_attention(q, k2, v2, attn_mask=mask)
    for b in range(2):
        real = padding[b].bool()
        dec = real & (torch.arange(length) >= c_end[b])
        c_rows = slice(int(c_start[b]), int(c_end[b]))
        torch.testing.assert_close(out2[b, :, dec], out[b, :, dec])
        assert not torch.allclose(out2[b, :, c_rows], out[b, :, c_rows]), "C tokens must still read ENC"


def test_per_layer_masks_schedule():
    lower, upper = torch.zeros(1), torch.ones(1)
    layers = per_layer_masks(4, 1, lower, upper)
    assert [m is lower for m in layers] == [True, False, False, False]
    assert all(m is upper for m in layers[1:])
    for bad in (0, 4):
        with pytest.raises(ValueError, match="split_layer"):
            per_layer_masks(4, bad, lower, upper)


def test_invalid_inputs_are_refused():
    padding = torch.ones(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="mode"):
        compression_attention_mask(padding, torch.tensor([1, 1]), torch.tensor([2, 2]), mode="split")
    with pytest.raises(ValueError, match="c_start must be <= c_end"):
        compression_attention_mask(padding, torch.tensor([3, 1]), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match=r"c_end must have shape \(2,\)"):
        compression_attention_mask(padding, torch.tensor([1, 1]), torch.tensor([2]))
    with pytest.raises(ValueError, match=r"c_end must lie in \[0, 6\]"):
        compression_attention_mask(padding, torch.tensor([1, 1]), torch.tensor([2, 7]))
    with pytest.raises(ValueError, match="floating-point"):
        compression_attention_mask(padding, torch.tensor([1, 1]), torch.tensor([2, 2]), dtype=torch.bool)
    with pytest.raises(ValueError, match="c_end must be <= answer_start"):
        split_layer_masks(padding, torch.tensor([1, 1]), torch.tensor([3, 3]), torch.tensor([2, 4]))
