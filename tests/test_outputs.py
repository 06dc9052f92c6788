"""Poisoned buffers: the kernel writes every element of its output and nothing else, and reads
nothing outside its inputs.

fusedattn._C.attention_forward is called directly with caller-owned `out` / `lse` buffers:
  - pre-filled with NaN: every element must be overwritten (and match the reference);
  - `out` a strided view into a bigger NaN-filled buffer: the NaNs outside the view must survive;
  - q, k, v views into NaN-filled buffers: a read outside the inputs would turn the result NaN.
Run under every CPU ISA, for dtypes and head dims that hit the vector tails (59, 111) and not.
"""

import numpy as np
import pytest
import torch

from conftest import (DTYPES, ISAS, assert_close_to_reference, assert_lse_close, force_isa, lse_dtype_for,
                      torch_attention_lowp)
from fusedattn import _C, _runtime
from fusedattn.reference import attention_reference

CASES = [  # dtype, head_dim, seqlen_q, seqlen_k, heads, heads_kv, causal
    (torch.float32, 59, 17, 129, 4, 2, True),
    (torch.float64, 8, 129, 17, 2, 2, True),
    (torch.float16, 111, 33, 65, 4, 1, False),
    (torch.bfloat16, 64, 129, 129, 2, 1, True),
    (torch.float32, 1, 5, 70, 2, 2, False),
    (torch.bfloat16, 256, 17, 17, 2, 2, False),
]


def _nan_view(shape, dtype, pad=(1, 2, 3, 5)):
    """A view of `shape` inside a NaN-filled buffer padded on both sides of every dim; (view, buffer)."""
    big_shape = tuple(n + 2 * p for n, p in zip(shape, pad))
    buffer = torch.full(big_shape, float("nan"), dtype=dtype)
    view = buffer[tuple(slice(p, p + n) for n, p in zip(shape, pad))]
    return view, buffer


def _random_in_nan(shape, dtype):
    view, buffer = _nan_view(shape, dtype)
    view.copy_(torch.randn(shape, dtype=dtype))
    return view, buffer


def _variant(scale, causal=False, q_offset=0, left=-1, right=-1):
    """The extension's variant tuple with no mask, ALiBi, softcap, sinks or dropout (see functional._Call)."""
    return (scale, causal, q_offset, left, right, 0.0, None, None, None, 0.0, 0, 0)


def _call(q, k, v, out, lse, *, causal, q_offset=None, left=-1, right=-1, scale=None):
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_offset = seqlen_k - seqlen_q if q_offset is None else q_offset
    _C.attention_forward(q, k, v, out, lse, _variant(scale, causal, q_offset, left, right), _runtime.cpu_isa(), 2,
                         ("q", "k", "v"))


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("dtype,head_dim,seqlen_q,seqlen_k,heads,heads_kv,causal", CASES)
def test_every_output_element_written_and_nothing_outside(isa_name, dtype, head_dim, seqlen_q, seqlen_k, heads,
                                                          heads_kv, causal):
    q, q_buf = _random_in_nan((2, heads, seqlen_q, head_dim), dtype)
    k, k_buf = _random_in_nan((2, heads_kv, seqlen_k, head_dim), dtype)
    v, v_buf = _random_in_nan((2, heads_kv, seqlen_k, head_dim), dtype)
    out, out_buf = _nan_view(q.shape, dtype)
    lse = torch.full((2, heads, seqlen_q), float("nan"), dtype=lse_dtype_for(dtype))
    outside = torch.isnan(out_buf).clone()
    outside[tuple(slice(p, p + n) for n, p in zip(out.shape, (1, 2, 3, 5)))] = False

    inputs_before = [buf.nan_to_num(7.0) for buf in (q_buf, k_buf, v_buf)]
    with force_isa(isa_name):
        _call(q, k, v, out, lse, causal=causal)

    assert not torch.isnan(out).any(), f"{torch.isnan(out).sum()} output elements were never written"
    assert not torch.isnan(lse).any(), f"{torch.isnan(lse).sum()} LSE elements were never written"
    assert torch.isnan(out_buf[outside]).all(), "the kernel wrote outside the out view"
    ref, ref_lse = attention_reference(q, k, v, causal=causal)
    lowp = torch_attention_lowp(q, k, v, causal=causal) if dtype in (torch.float16, torch.bfloat16) else None
    assert_close_to_reference(out, lowp, ref)
    assert_lse_close(lse, ref_lse, dtype)
    for buf, before in zip((q_buf, k_buf, v_buf), inputs_before):  # inputs are never written
        assert torch.equal(buf.nan_to_num(7.0), before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bshd_out_view_in_nan_buffer(dtype):
    """A bshd out (seq and heads strides swapped) inside a NaN buffer: all written, nothing outside."""
    q, k, v = (torch.randn(2, 19, 4, 40, dtype=dtype) for _ in range(3))
    out_bshd, out_buf = _nan_view((2, 19, 4, 40), dtype)
    lse = torch.full((2, 4, 19), float("nan"), dtype=lse_dtype_for(dtype))
    _call(*(x.transpose(1, 2) for x in (q, k, v, out_bshd)), lse, causal=True, left=5, right=-1)
    assert not torch.isnan(out_bshd).any()
    assert torch.isnan(out_buf).sum() == out_buf.numel() - out_bshd.numel()
    ref, _ = attention_reference(q, k, v, causal=True, window=(5, -1), layout="bshd")
    lowp = (torch_attention_lowp(q, k, v, causal=True, window=(5, -1), layout="bshd")
            if dtype in (torch.float16, torch.bfloat16) else None)
    assert_close_to_reference(out_bshd, lowp, ref)
    assert not torch.isnan(lse).any()


def test_fully_masked_rows_overwrite_poison():
    """Rows that see no key are written too (0 and -inf), not skipped."""
    q, k, v = (torch.randn(1, 2, n, 16) for n in (30, 10, 10))
    out = torch.full((1, 2, 30, 16), float("nan"))
    lse = torch.full((1, 2, 30), float("nan"))
    _call(q, k, v, out, lse, causal=True)  # bottom-right: rows 0..19 see nothing
    assert torch.equal(out[:, :, :20], torch.zeros(1, 2, 20, 16))
    assert torch.isneginf(lse[:, :, :20]).all()
    assert not torch.isnan(out).any() and torch.isfinite(lse[:, :, 20:]).all()


def test_without_lse_buffer():
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    out = torch.full_like(q, float("nan"))
    _call(q, k, v, out, None, causal=False)
    ref, _ = attention_reference(q, k, v)
    assert_close_to_reference(out, None, ref)


def test_read_only_out_is_rejected():
    q = np.random.randn(1, 2, 9, 16).astype(np.float32)
    out = np.full_like(q, np.nan)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        _C.attention_forward(q, q, q, out, None, _variant(0.25), _runtime.cpu_isa(), 1, ("q", "k", "v"))
    assert np.isnan(out).all()


@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_mismatched_out_is_rejected(bad):
    q = torch.randn(1, 2, 9, 16)
    out = torch.empty(1, 2, 8, 16) if bad == "shape" else torch.empty(1, 2, 9, 16, dtype=torch.float64)
    with pytest.raises((ValueError, TypeError), match="out"):
        _call(q, q, q, out, None, causal=False)


@pytest.mark.parametrize("bad", ["shape", "dtype", "float32-for-float64", "strided"])
def test_mismatched_lse_is_rejected(bad):
    """The LSE buffer is float32, or float64 for float64 inputs; contiguous, of shape (b, h, Lq)."""
    q = torch.randn(1, 2, 9, 16, dtype=torch.float64 if bad == "float32-for-float64" else torch.float32)
    lse = {"shape": torch.empty(1, 2, 8), "dtype": torch.empty(1, 2, 9, dtype=torch.float64),
           "float32-for-float64": torch.empty(1, 2, 9), "strided": torch.empty(1, 9, 2).transpose(1, 2)}[bad]
    with pytest.raises((ValueError, TypeError), match="lse"):
        _call(q, q, q, torch.empty_like(q), lse, causal=False)
