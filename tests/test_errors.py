"""Bad input raises ValueError / TypeError naming the argument (DESIGN.md "Bad input"), also for the
variant arguments (mask, ALiBi, sinks, softcap, dropout, seed); the features that used to raise
NotImplementedError are accepted; empty sizes (Lq = 0, Lk = 0, batch 0) work.
"""

import numpy as np
import pytest
import torch

import fusedattn
from conftest import check_attention, make_qkv
from fusedattn.reference import attention_probabilities, attention_reference


def _qkv(shape_q=(2, 4, 9, 16), shape_kv=(2, 4, 11, 16), dtype=torch.float32):
    return torch.randn(shape_q, dtype=dtype), torch.randn(shape_kv, dtype=dtype), torch.randn(shape_kv, dtype=dtype)


@pytest.mark.parametrize("which,shape,match", [
    ("q", (4, 9, 16), r"q must be 4-D .*\(4, 9, 16\)"),
    ("k", (1, 2, 4, 11, 16), r"k must be 4-D"),
    ("v", (2, 4, 11), r"v must be 4-D"),
])
def test_wrong_rank(which, shape, match):
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v)
    args[which] = torch.randn(shape)
    with pytest.raises(ValueError, match=match):
        fusedattn.attention(args["q"], args["k"], args["v"])


@pytest.mark.parametrize("shape_k,shape_v,match", [
    ((3, 4, 11, 16), (3, 4, 11, 16), r"k has batch size 3 .* q has 2"),
    ((2, 4, 11, 16), (3, 4, 11, 16), r"v has batch size 3 .* q has 2"),
    ((2, 4, 11, 8), (2, 4, 11, 8), r"k has head_dim 8 .* q has 16"),
    ((2, 4, 11, 16), (2, 4, 12, 16), r"v has seqlen 12 .* k has 11"),
    ((2, 4, 11, 16), (2, 2, 11, 16), r"v has num_heads 2 .* k has 4"),
    ((2, 3, 11, 16), (2, 3, 11, 16), r"q has 4 heads.*not a multiple of the 3 heads of k"),
    ((2, 8, 11, 16), (2, 8, 11, 16), r"q has 4 heads.*not a multiple of the 8 heads of k"),
])
def test_mismatched_sizes(shape_k, shape_v, match):
    q = torch.randn(2, 4, 9, 16)
    with pytest.raises(ValueError, match=match):
        fusedattn.attention(q, torch.randn(shape_k), torch.randn(shape_v))


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.int64, torch.uint8])
def test_unsupported_dtype(dtype):
    q, k, v = (x.to(dtype) for x in _qkv())
    with pytest.raises(TypeError, match=r"q has dtype .*supported: float32, float64, float16, bfloat16"):
        fusedattn.attention(q, k, v)


def test_unsupported_numpy_dtype():
    q = np.ones((1, 2, 3, 4), dtype=np.int32)
    with pytest.raises(TypeError, match=r"q has dtype int32"):
        fusedattn.attention(q, q, q)


@pytest.mark.parametrize("which,dtype", [("k", torch.float64), ("v", torch.float16), ("k", torch.bfloat16)])
def test_dtypes_differ(which, dtype):
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v)
    args[which] = args[which].to(dtype)
    with pytest.raises(TypeError, match=rf"{which} has dtype .* but q has float32"):
        fusedattn.attention(args["q"], args["k"], args["v"])


@pytest.mark.parametrize("head_dim", [0, 257, 512])
def test_bad_head_dim(head_dim):
    q, k, v = _qkv((1, 2, 5, head_dim), (1, 2, 5, head_dim))
    with pytest.raises(ValueError, match=rf"q has head_dim {head_dim}; supported: 1..256"):
        fusedattn.attention(q, k, v)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_non_contiguous_last_dim(which):
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v)
    args[which] = torch.randn(args[which].shape[:-1] + (32,))[..., ::2]
    with pytest.raises(ValueError, match=rf"{which} must be contiguous in its last dim"):
        fusedattn.attention(args["q"], args["k"], args["v"])


@pytest.mark.parametrize("layout", ["bsdh", "BHSD", "", None])
def test_bad_layout(layout):
    with pytest.raises(ValueError, match="layout must be 'bhsd' or 'bshd'"):
        fusedattn.attention(*_qkv(), layout=layout)


@pytest.mark.parametrize("window", [(-2, 0), (0, -5), 3, (1, 2, 3), "ab", (None, 1), (2**64, -1)])
def test_bad_window(window):
    with pytest.raises(ValueError, match="window"):
        fusedattn.attention(*_qkv(), window=window)


@pytest.mark.parametrize("case, error, message", [
    ("sdpa scale", TypeError, "scale must be a number"),
    ("sdpa dropout_p", TypeError, "dropout_p must be a number"),
    ("flash softcap", TypeError, "softcap must be a number"),
    ("q_offset str", TypeError, "q_offset must be an int"),
    ("window float", ValueError, "window must be a pair"),
    ("varlen max_seqlen_q None", TypeError, "max_seqlen_q must be an int"),
    ("varlen max_seqlen_k str", TypeError, "max_seqlen_k must be an int"),
    ("varlen window_size", ValueError, "window_size"),
    ("kvcache window_size", ValueError, "window_size"),
    ("flash softmax_scale", TypeError, "softmax_scale must be a number"),
    ("varlen softmax_scale", TypeError, "softmax_scale must be a number"),
    ("kvcache softmax_scale", TypeError, "softmax_scale must be a number"),
])
def test_bad_scalar_arguments_name_themselves(case, error, message):
    """Bad scalars are errors naming the argument (they were float()'s and int()'s own messages, or
    accepted: q_offset "1" parsed, a window of 1.5 truncated); the flash-attn drop-ins say window_size
    and softmax_scale."""
    q, k, v = _qkv()
    qb, kb, vb = (x.transpose(1, 2) for x in (q, k, v))
    packed = [torch.randn(4, 2, 8) for _ in range(3)]
    call = {
        "sdpa scale": lambda: fusedattn.scaled_dot_product_attention(q, k, v, scale="a"),
        "sdpa dropout_p": lambda: fusedattn.scaled_dot_product_attention(q, k, v, dropout_p=None),
        "flash softcap": lambda: fusedattn.flash_attn_func(qb, kb, vb, softcap=None),
        "q_offset str": lambda: fusedattn.attention(q, k, v, q_offset="1"),
        "window float": lambda: fusedattn.attention(q, k, v, window=(1.5, 0)),
        "varlen max_seqlen_q None": lambda: fusedattn.flash_attn_varlen_func(*packed, [0, 4], [0, 4], None, 4),
        "varlen max_seqlen_k str": lambda: fusedattn.flash_attn_varlen_func(*packed, [0, 4], [0, 4], 4, "4"),
        "varlen window_size": lambda: fusedattn.flash_attn_varlen_func(*packed, [0, 4], [0, 4], 4, 4,
                                                                       window_size=(-3, 0)),
        "kvcache window_size": lambda: fusedattn.flash_attn_with_kvcache(
            qb[:, :1], torch.zeros(2, 8, 2, 16), torch.zeros(2, 8, 2, 16), cache_seqlens=2, window_size=(-3, 0)),
        "flash softmax_scale": lambda: fusedattn.flash_attn_func(qb, kb, vb, softmax_scale="a"),
        "varlen softmax_scale": lambda: fusedattn.flash_attn_varlen_func(*packed, [0, 4], [0, 4], 4, 4,
                                                                         softmax_scale=[1.0]),
        "kvcache softmax_scale": lambda: fusedattn.flash_attn_with_kvcache(
            qb[:, :1], torch.zeros(2, 8, 2, 16), torch.zeros(2, 8, 2, 16), cache_seqlens=2, softmax_scale="a"),
    }[case]
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("q_offset", [2**63, -2**63 - 1, 2**64])
def test_q_offset_beyond_int64(q_offset):
    """A ValueError naming q_offset (it was pybind11's RuntimeError 'Unable to cast')."""
    with pytest.raises(ValueError, match="q_offset"):
        fusedattn.attention(*_qkv(), q_offset=q_offset)


def test_flash_attn_func_bad_window_names_window_size():
    q, k, v = (x.transpose(1, 2) for x in _qkv())
    with pytest.raises(ValueError, match="window_size"):
        fusedattn.flash_attn_func(q, k, v, window_size=(-2, 0))


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_non_finite_scale(scale):
    with pytest.raises(ValueError, match="scale must be finite"):
        fusedattn.attention(*_qkv(), scale=scale)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_non_array_input(which):
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v)
    args[which] = args[which].tolist()
    with pytest.raises(TypeError, match=rf"{which} must be a torch tensor, a numpy array"):
        fusedattn.attention(args["q"], args["k"], args["v"])


@pytest.mark.parametrize("requires_grad", [False, True], ids=["plain", "autograd"])
def test_sdpa_errors_name_its_arguments(requires_grad):
    q, k, v = _qkv((2, 4, 9, 16), (2, 2, 11, 16))
    q.requires_grad_(requires_grad)  # with grad, the call goes through the torch.library op
    with pytest.raises(ValueError, match="enable_gqa"):
        fusedattn.scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match=r"query must be at least 3-D"):
        fusedattn.scaled_dot_product_attention(torch.randn(9, 16), k, v)
    with pytest.raises(ValueError, match=r"value has seqlen 12 .* key has 11"):
        fusedattn.scaled_dot_product_attention(q, torch.randn(2, 4, 11, 16), torch.randn(2, 4, 12, 16))
    with pytest.raises(TypeError, match=r"key must be a torch tensor"):
        fusedattn.scaled_dot_product_attention(q, [1.0], v)


def test_sdpa_mismatched_leading_dims_raise():
    """(2, 3) and (3, 2) leading dims have the same product but do not broadcast: torch raises, and
    fusedattn must not silently pair query batch (i, j) with key batch (i * 3 + j) // 2 ...."""
    q = torch.randn(2, 3, 2, 5, 8)
    k, v = torch.randn(3, 2, 2, 5, 8), torch.randn(3, 2, 2, 5, 8)
    with pytest.raises(RuntimeError):
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="key"):
        fusedattn.scaled_dot_product_attention(q, k, v)


FORMERLY_NOT_IMPLEMENTED = [  # (api, kwargs): these raised NotImplementedError before the variants landed
    ("sdpa", dict(attn_mask="bool")), ("sdpa", dict(attn_mask="float")), ("sdpa", dict(dropout_p=0.1)),
    ("flash", dict(softcap=3.0)), ("flash", dict(alibi_slopes="slopes")), ("flash", dict(dropout_p=0.2)),
    ("flash", dict(return_attn_probs=True)),
]


@pytest.mark.parametrize("api,kwargs", FORMERLY_NOT_IMPLEMENTED, ids=lambda x: x if isinstance(x, str) else "-".join(x))
def test_formerly_not_implemented_features_are_accepted(api, kwargs):
    """The arguments are accepted and give the reference's answer (test_variants.py covers them in depth)."""
    q, k, v = _qkv()
    values = {"bool": torch.rand(9, 11) > 0.3, "float": torch.randn(9, 11), "slopes": torch.rand(4)}
    kwargs = {name: values.get(x, x) if isinstance(x, str) else x for name, x in kwargs.items()}
    if api == "sdpa":
        out = fusedattn.scaled_dot_product_attention(q, k, v, **kwargs)
        ref_kwargs = dict(q_offset=0, attn_mask=kwargs.get("attn_mask"))
    else:
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        out = fusedattn.flash_attn_func(q, k, v, **kwargs)
        ref_kwargs = dict(layout="bshd", softcap=kwargs.get("softcap", 0.0), alibi_slopes=kwargs.get("alibi_slopes"))
    if kwargs.get("return_attn_probs"):
        out, lse, probs = out
        ref_probs, ref_lse = attention_probabilities(q, k, **ref_kwargs)
        np.testing.assert_allclose(probs.numpy(), ref_probs, atol=1e-6)
        np.testing.assert_allclose(lse.numpy(), ref_lse, atol=2e-5, rtol=2e-6)
    assert out.shape == q.shape and torch.isfinite(out).all()
    if not kwargs.get("dropout_p"):
        ref, _ = attention_reference(q, k, v, **ref_kwargs)
        np.testing.assert_allclose(out.numpy(), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(attn_mask=torch.ones(9, 10, dtype=torch.bool)), ValueError, r"attn_mask of shape \(9, 10\) does not"),
    (dict(attn_mask=torch.ones(1, 2, 4, 9, 11)), ValueError, "attn_mask must have at most 4 dims"),
    (dict(attn_mask=torch.ones(9, 11, dtype=torch.int32)), TypeError, "attn_mask must be bool or floating point"),
    (dict(attn_mask=np.ones((9, 11), bool)), TypeError, "attn_mask must be of the same kind as q"),
    (dict(alibi_slopes=torch.rand(3)), ValueError, r"alibi_slopes must have shape \(4,\) or \(2, 4\), got \(3,\)"),
    (dict(sinks=torch.rand(2, 4)), ValueError, r"sinks must have shape \(4,\), got \(2, 4\)"),
    (dict(softcap=-1.0), ValueError, "softcap must be >= 0"),
    (dict(dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\]"),
    (dict(dropout_p=0.1, seed=-1), ValueError, "seed must be an int"),
    (dict(dropout_p=0.1, seed=1.5), ValueError, "seed must be an int"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_variant_arguments(kwargs, error, match):
    q, k, v = _qkv()
    with pytest.raises(error, match=match):
        fusedattn.attention(q, k, v, **kwargs)


def test_alibi_slopes_requiring_grad_raise_under_autograd():
    """ALiBi slopes are fixed: asking for their gradient is an error, not a silent None."""
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        fusedattn.attention(q.requires_grad_(True), k, v, alibi_slopes=torch.rand(4, requires_grad=True))


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_inputs_requiring_grad(which):
    """Inputs that require grad are read correctly; the output tracks grad unless under no_grad."""
    q, k, v = make_qkv(1, 2, 2, 9, 11, 16)
    args = dict(q=q, k=k, v=v)
    args[which].requires_grad_(True)
    out = fusedattn.attention(args["q"], args["k"], args["v"], causal=True)
    assert out.requires_grad
    check_attention(out.detach(), q.detach(), k.detach(), v.detach(), causal=True)
    with torch.no_grad():
        out = fusedattn.attention(args["q"], args["k"], args["v"], causal=True)
    assert not out.requires_grad
    check_attention(out, q.detach(), k.detach(), v.detach(), causal=True)


@pytest.mark.parametrize("which", ["k", "v"])
def test_mixed_array_kinds(which):
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v)
    args[which] = args[which].numpy()
    with pytest.raises(TypeError, match=rf"{which} must be of the same kind as q"):
        fusedattn.attention(args["q"], args["k"], args["v"])


# ---------------------------------------------------------------- empty sizes work

@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_empty_queries(layout):
    q, k, v = make_qkv(2, 4, 2, 0, 11, 16, layout=layout)
    out, lse = fusedattn.attention(q, k, v, causal=True, layout=layout, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (2, 4, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_keys_give_zeros_and_minus_inf(dtype):
    q, k, v = make_qkv(2, 4, 2, 9, 0, 16, dtype)
    out, lse = fusedattn.attention(q, k, v, return_lse=True)
    assert torch.equal(out, torch.zeros_like(q))
    assert lse.shape == (2, 4, 9) and torch.isneginf(lse).all()


def test_empty_batch_and_heads():
    q, k, v = make_qkv(0, 4, 2, 9, 11, 16)
    out, lse = fusedattn.attention(q, k, v, causal=True, return_lse=True)
    assert out.shape == (0, 4, 9, 16) and lse.shape == (0, 4, 9)
    q, k, v = make_qkv(2, 0, 0, 9, 11, 16)
    assert fusedattn.attention(q, k, v).shape == (2, 0, 9, 16)


@pytest.mark.parametrize("empty", ["queries", "keys"])
def test_empty_numpy(empty):
    """numpy gives zero-size arrays all-zero strides (e.g. after astype); they are still valid input."""
    seqlen_q, seqlen_k = (0, 5) if empty == "queries" else (7, 0)
    q = np.random.randn(1, 2, seqlen_q, 8).astype(np.float32)
    k = np.random.randn(1, 2, seqlen_k, 8).astype(np.float32)
    out, lse = fusedattn.attention(q, k, k, return_lse=True)
    assert isinstance(out, np.ndarray) and out.shape == (1, 2, seqlen_q, 8) and lse.shape == (1, 2, seqlen_q)
    assert (out == 0).all() and np.isneginf(lse).all()
