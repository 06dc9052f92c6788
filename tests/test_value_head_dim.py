"""A value head_dim unlike the query's (DeepSeek-V2/V3's multi-head latent attention: q and k of
192, v of 128), which torch's SDPA takes and fusedattn runs by zero padding (functional._pad_head_dims).

Checked against the fp64 reference and torch float64 autograd with DESIGN.md's rule, for v narrower
and wider than q, both layouts, GQA, the score variants (causal, window, ALiBi, softcap, a float mask
with its gradient, sinks): attention (torch and numpy), attention_backward, attention_varlen against
per-sequence calls, the SDPA and flash-attn drop-ins against torch, torch.compile against eager; the
errors that stay (k unlike q, v wider than 256, a KV cache, dout of the wrong width).
"""

import numpy as np
import pytest
import torch

import fusedattn
from conftest import assert_close_to_reference, assert_grads_close, assert_lse_close, lowp_grads, reference_grads
from fusedattn.reference import attention_reference

DIMS = [(192, 128), (40, 59), (16, 1)]  # (q's and k's head_dim, v's)


def _qkv(dims, dtype, layout="bhsd", heads=(4, 2), seqlens=(17, 29)):
    def shape(h, s, d):
        return (2, h, s, d) if layout == "bhsd" else (2, s, h, d)

    dim_qk, dim_v = dims
    q = torch.randn(shape(heads[0], seqlens[0], dim_qk), dtype=dtype)
    k = torch.randn(shape(heads[1], seqlens[1], dim_qk), dtype=dtype)
    v = torch.randn(shape(heads[1], seqlens[1], dim_v), dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dims", DIMS, ids=str)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_and_backward_match_reference(dtype, dims, layout, causal):
    q, k, v = (x.requires_grad_() for x in _qkv(dims, dtype, layout))
    out, lse = fusedattn.attention(q, k, v, causal=causal, layout=layout, return_lse=True)
    expected_shape = q.shape[:3] + (dims[1],)
    assert tuple(out.shape) == tuple(expected_shape) and out.is_contiguous() and out.dtype == dtype
    dout = torch.randn(expected_shape, dtype=dtype)
    grads = dict(zip("qkv", torch.autograd.grad(out, (q, k, v), dout)))
    inputs = dict(q=q, k=k, v=v)
    ref_grads, ref_out, ref_lse = reference_grads(inputs, dout, causal=causal, layout=layout)
    lowp = None
    if dtype == torch.bfloat16:
        lowp_grad, lowp_out, _ = lowp_grads(inputs, dout, causal=causal, layout=layout)
        lowp = lowp_grad
    assert_close_to_reference(out, None if lowp is None else lowp_out, ref_out.numpy())
    assert_lse_close(lse, ref_lse.numpy(), dtype)
    assert_grads_close(grads, ref_grads, lowp)


def test_score_variants_and_their_gradients():
    q, k, v = _qkv((192, 128), torch.float32)
    mask = (torch.randn(1, 4, 17, 29) * 0.5).requires_grad_()
    sinks = torch.randn(4, requires_grad=True)
    slopes = torch.rand(4) * 0.3
    variant = dict(causal=True, window=(9, 2), softcap=3.0)
    for x in (q, k, v):
        x.requires_grad_()
    out, lse = fusedattn.attention(q, k, v, attn_mask=mask, sinks=sinks, alibi_slopes=slopes, return_lse=True,
                                   **variant)
    dout = torch.randn_like(out)
    got = dict(zip(["q", "k", "v", "attn_mask", "sinks"],
                   torch.autograd.grad(out, (q, k, v, mask, sinks), dout)))
    inputs = dict(q=q, k=k, v=v, attn_mask=mask, sinks=sinks, alibi_slopes=slopes)
    ref_grads, ref_out, ref_lse = reference_grads(inputs, dout, **variant)
    assert_close_to_reference(out, None, ref_out.numpy())
    assert_lse_close(lse, ref_lse.numpy(), torch.float32)
    assert_grads_close(got, ref_grads)


@pytest.mark.parametrize("dims", DIMS, ids=str)
def test_numpy_forward_and_attention_backward(dims):
    q, k, v = (x.numpy() for x in _qkv(dims, torch.float64))
    out, lse = fusedattn.attention(q, k, v, causal=True, return_lse=True)
    ref, ref_lse = attention_reference(q, k, v, causal=True)
    assert type(out) is np.ndarray and out.flags.c_contiguous
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)
    dout = np.random.randn(*out.shape)
    grads = fusedattn.attention_backward(dout, q, k, v, out, lse, causal=True)
    inputs = {name: torch.from_numpy(x) for name, x in zip("qkv", (q, k, v))}
    ref_grads, _, _ = reference_grads(inputs, torch.from_numpy(dout), causal=True)
    for name, grad in zip("qkv", grads):
        assert grad.shape == inputs[name].shape, f"d{name}"
        np.testing.assert_allclose(grad, ref_grads[name].numpy(), rtol=1e-9, atol=1e-11, err_msg=f"d{name}")


def test_attention_backward_on_torch_equals_autograd():
    q, k, v = (x.requires_grad_() for x in _qkv((40, 59), torch.float32))
    out, lse = fusedattn.attention(q, k, v, causal=True, return_lse=True)
    dout = torch.randn_like(out)
    expected = torch.autograd.grad(out, (q, k, v), dout)
    got = fusedattn.attention_backward(dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, causal=True)
    for name, a, b in zip("qkv", got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"d{name}")
    with pytest.raises(ValueError, match="dout has head_dim 40; expected v's, 59"):
        fusedattn.attention_backward(torch.randn(q.shape), q, k, v, out.detach(), lse, causal=True)


@pytest.mark.parametrize("dims", [(192, 128), (24, 40)], ids=str)
def test_varlen_equals_per_sequence_calls(dims):
    lengths_q, lengths_k = [5, 0, 17, 1], [9, 3, 17, 12]
    cu_q, cu_k = (torch.tensor(np.concatenate([[0], np.cumsum(n)]), dtype=torch.int32) for n in (lengths_q, lengths_k))
    q = torch.randn(sum(lengths_q), 4, dims[0], requires_grad=True)
    k = torch.randn(sum(lengths_k), 2, dims[0], requires_grad=True)
    v = torch.randn(sum(lengths_k), 2, dims[1], requires_grad=True)
    out = fusedattn.attention_varlen(q, k, v, cu_q, cu_k, 17, 17, causal=True)
    assert tuple(out.shape) == (sum(lengths_q), 4, dims[1])
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    pieces = []
    for b in range(len(lengths_q)):
        rows_q, rows_k = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        pieces.append(fusedattn.attention(q[None, rows_q], k[None, rows_k], v[None, rows_k], causal=True,
                                          layout="bshd")[0])
    expected = torch.cat(pieces)
    expected_grads = torch.autograd.grad(expected, (q, k, v), dout)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for name, a, b in zip("qkv", grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"d{name}")
    numpy_out = fusedattn.attention_varlen(q.detach().numpy(), k.detach().numpy(), v.detach().numpy(),
                                           cu_q.numpy(), cu_k.numpy(), 17, 17, causal=True)
    np.testing.assert_allclose(numpy_out, out.detach().numpy(), rtol=0, atol=0)


def test_drop_ins_match_torch():
    query, key, value = _qkv((192, 128), torch.float32, heads=(4, 2))
    mask = torch.randn(17, 29)
    got = fusedattn.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6)
    got = fusedattn.scaled_dot_product_attention(query[0], key[0], value[0], is_causal=True, enable_gqa=True)
    expected = torch.nn.functional.scaled_dot_product_attention(query[0], key[0], value[0], is_causal=True,
                                                                enable_gqa=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6)
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # flash-attn's (batch, seqlen, heads, head_dim)
    out = fusedattn.flash_attn_func(q, k, v, causal=True)
    ref, _ = attention_reference(q, k, v, causal=True, layout="bshd")
    assert_close_to_reference(out, None, ref)


def test_compiled_equals_eager():
    q, k, v = _qkv((40, 24), torch.float32)

    def step(q, k, v):
        return fusedattn.attention(q, k, v, causal=True).square().sum()

    compiled = torch.compile(step, fullgraph=True)
    grads = []
    for fn in (step, compiled):
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        loss = fn(*inputs)
        grads.append((loss.detach(), *torch.autograd.grad(loss, inputs)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_errors():
    q, k, v = _qkv((64, 32), torch.float32)
    with pytest.raises(ValueError, match="v has head_dim 300"):
        fusedattn.attention(q, k, torch.randn(2, 2, 29, 300))
    with pytest.raises(ValueError, match="v must be contiguous in its last dim"):  # as with one head_dim
        fusedattn.attention(q, k, torch.randn(2, 2, 29, 64)[..., ::2])
    with pytest.raises(ValueError, match="head_dim"):  # k must keep q's head_dim
        fusedattn.attention(q, torch.randn(2, 2, 29, 32), v)
    k_cache, v_cache = torch.zeros(2, 32, 2, 64), torch.zeros(2, 32, 2, 32)
    with pytest.raises(ValueError, match="v_cache"):  # a KV cache keeps one head_dim
        fusedattn.attention_with_kvcache(torch.randn(2, 1, 4, 64), k_cache, v_cache,
                                         cache_seqlens=torch.tensor([3, 5], dtype=torch.int32))
