"""Positions and masks: explicit q_offset, sliding windows (with and without causal), explicit
scale, and fully masked rows (output exactly 0, LSE -inf, never NaN).

Every case is checked against the fp64 reference, which implements DESIGN.md's positions:
query row i sits at i + q_offset (default Lk - Lq), key j at j.
"""

import numpy as np
import pytest
import torch

import fusedattn
from conftest import check_attention, make_qkv

WINDOWS = [(0, 0), (0, -1), (-1, 0), (3, -1), (-1, 5), (7, 2), (16, 16), (100, 1)]
SEQLENS = [(1, 17), (17, 17), (33, 129), (129, 33)]


@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLENS)
def test_window(window, causal, seqlen_q, seqlen_k):
    dtype = torch.float32 if seqlen_q != 33 else torch.bfloat16
    q, k, v = make_qkv(1, 4, 2, seqlen_q, seqlen_k, 40, dtype)
    result = fusedattn.attention(q, k, v, causal=causal, window=window, return_lse=True)
    check_attention(result, q, k, v, causal=causal, window=window, return_lse=True)


@pytest.mark.parametrize("q_offset", [-300, -20, -1, 0, 5, 60, 300])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (-1, 4)), (True, (9, -1))],
                         ids=["full", "causal", "window-1,4", "causal-window9,-1"])
def test_q_offset(q_offset, causal, window):
    """Explicit q_offset, including ones that put every query before the first key or after the last."""
    q, k, v = make_qkv(2, 2, 1, 70, 90, 24, torch.float64)
    result = fusedattn.attention(q, k, v, causal=causal, window=window, q_offset=q_offset, return_lse=True)
    check_attention(result, q, k, v, causal=causal, window=window, q_offset=q_offset, return_lse=True)


@pytest.mark.parametrize("seqlen_q,q_offset", [(2, 100), (70, 100), (8, 1000)])
def test_window_after_the_last_key_sees_nothing(q_offset, seqlen_q):
    """Queries at positions q_offset.. >> Lk with a bounded left window see no key at all: output 0 and
    LSE -inf. The keys are slices of a NaN-filled buffer, so reading past the last key shows up as NaN."""
    big_k = torch.full((1, 2, 17 + 2000, 16), float("nan"))
    big_v = torch.full((1, 2, 17 + 2000, 16), float("nan"))
    big_k[:, :, :17] = torch.randn(1, 2, 17, 16)
    big_v[:, :, :17] = torch.randn(1, 2, 17, 16)
    k, v = big_k[:, :, :17], big_v[:, :, :17]
    q = torch.randn(1, 2, seqlen_q, 16)
    out, lse = fusedattn.attention(q, k, v, q_offset=q_offset, window=(4, -1), return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)), f"rows that see no key must be 0, got max |out| {out.abs().max()}"
    assert torch.isneginf(lse).all(), f"LSE must be -inf on rows that see no key, got {lse}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", ["causal_lq_gt_lk", "negative_offset", "empty_window"])
def test_fully_masked_rows_are_zero_with_lse_minus_inf(dtype, case):
    if case == "causal_lq_gt_lk":  # bottom-right: the first Lq - Lk rows see no key
        kwargs, seqlen_q, seqlen_k, masked = dict(causal=True), 40, 9, slice(0, 31)
    elif case == "negative_offset":  # every position < 0
        kwargs, seqlen_q, seqlen_k, masked = dict(causal=True, q_offset=-50), 40, 9, slice(0, 40)
    else:  # window (0, 0) around positions >= Lk
        kwargs, seqlen_q, seqlen_k, masked = dict(window=(0, 0), q_offset=0), 40, 9, slice(9, 40)
    q, k, v = make_qkv(2, 2, 2, seqlen_q, seqlen_k, 32, dtype)
    out, lse = fusedattn.attention(q, k, v, return_lse=True, **kwargs)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(out[:, :, masked], torch.zeros_like(out[:, :, masked]))
    assert torch.isneginf(lse[:, :, masked]).all()
    check_attention((out, lse), q, k, v, return_lse=True, **kwargs)


@pytest.mark.parametrize("scale", [0.0, 0.05, 1.0, -0.7, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_explicit_scale(scale, dtype):
    q, k, v = make_qkv(2, 3, 3, 21, 45, 59, dtype)
    result = fusedattn.attention(q, k, v, causal=True, scale=scale, return_lse=True)
    check_attention(result, q, k, v, causal=True, scale=scale, return_lse=True)


def test_scale_zero_averages_visible_values():
    """scale=0 makes every visible key equally likely: out[i] = mean(v[:i+1]) under causal (Lq = Lk)."""
    q, k, v = make_qkv(1, 1, 1, 12, 12, 8, torch.float64)
    out = fusedattn.attention(q, k, v, causal=True, scale=0.0)
    expected = v.cumsum(dim=2) / torch.arange(1, 13, dtype=torch.float64)[:, None]
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = make_qkv(1, 2, 2, 10, 14, 50)
    torch.testing.assert_close(fusedattn.attention(q, k, v), fusedattn.attention(q, k, v, scale=50**-0.5),
                               atol=0, rtol=0)


def test_default_q_offset_is_bottom_right():
    q, k, v = make_qkv(1, 2, 2, 10, 30, 16)
    default = fusedattn.attention(q, k, v, causal=True)
    assert torch.equal(default, fusedattn.attention(q, k, v, causal=True, q_offset=20))
    assert not torch.allclose(default, fusedattn.attention(q, k, v, causal=True, q_offset=0))


def test_single_visible_key_returns_its_value():
    """A window (0, 0) with Lq = Lk shows each query only its own key: out == v exactly (P = 1)."""
    q, k, v = make_qkv(1, 2, 2, 37, 37, 24)
    out, lse = fusedattn.attention(q, k, v, window=(0, 0), return_lse=True)
    assert torch.equal(out, v)
    expected_lse = (q * k).sum(-1) * 24**-0.5
    np.testing.assert_allclose(lse.numpy(), expected_lse.numpy(), atol=2e-5, rtol=2e-6)
