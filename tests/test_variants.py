"""Attention variants: causal, window, ALiBi, softcap, attn_mask, sinks, dropout, alone and combined.

Every case is checked forward (out and LSE, against the numpy fp64 reference) AND backward (dq, dk,
dv, a float mask's and the sinks' gradients, against torch float64 autograd of conftest's
torch_attention) with DESIGN.md's tolerance rule; a subset under each CPU ISA. Masks: broadcast
shapes, bool / float32 / q's dtype, non-contiguous strides, all-False / -inf / finfo.min rows.
Dropout: drop rate, seeds, the kernels' Philox equal to reference.dropout_keep_mask, gradients with
that mask, torch.manual_seed. Drop-ins: torch SDPA (a seeded loop of random argument combinations)
and flash_attn_func (window_size, softcap, alibi_slopes, return_attn_probs).
"""

import numpy as np
import pytest
import torch

import fusedattn
from conftest import (DTYPES, LOW_PRECISION, assert_close_to_reference, assert_grads_close, assert_lse_close,
                      lowp_grads, make_qkv, reference_grads, torch_attention)
from fusedattn.reference import attention_probabilities, attention_reference, dropout_keep_mask

BATCH, HEADS = 2, 4
TENSOR_ARGS = ("attn_mask", "alibi_slopes", "sinks")


def _slopes(shape):
    return torch.rand(shape) * 0.5 + 0.05


def _sinks():
    return torch.randn(HEADS, requires_grad=True)


def _float_mask(shape, dtype=torch.float32, grad=True):
    return (torch.randn(shape) * 2).to(dtype).requires_grad_(grad)


# name: (Lq, Lk, Hkv, options(Lq, Lk) -> kwargs)
CONFIGS = {
    "causal": (17, 29, HEADS, lambda lq, lk: dict(causal=True)),
    "window": (29, 17, HEADS, lambda lq, lk: dict(window=(4, 2))),
    "alibi-h": (17, 29, HEADS, lambda lq, lk: dict(alibi_slopes=_slopes(HEADS))),
    "alibi-bh": (29, 17, HEADS, lambda lq, lk: dict(alibi_slopes=_slopes((BATCH, HEADS)))),
    "softcap": (17, 29, HEADS, lambda lq, lk: dict(softcap=3.0)),
    "bool-mask": (17, 29, HEADS, lambda lq, lk: dict(attn_mask=torch.rand(BATCH, HEADS, lq, lk) > 0.3)),
    "float-mask": (29, 17, HEADS, lambda lq, lk: dict(attn_mask=_float_mask((1, 1, lq, lk)))),
    "sinks": (17, 29, HEADS, lambda lq, lk: dict(sinks=_sinks())),
    "gqa": (17, 29, 1, lambda lq, lk: dict()),
    "all": (29, 17, 2, lambda lq, lk: dict(causal=True, window=(6, -1), alibi_slopes=_slopes(HEADS), softcap=4.0,
                                            attn_mask=_float_mask((BATCH, 1, 1, lk)), sinks=_sinks())),
    "causal-alibi-bh-bool-sinks": (33, 17, 1, lambda lq, lk: dict(
        causal=True, alibi_slopes=_slopes((BATCH, HEADS)), attn_mask=torch.rand(lq, lk) > 0.2, sinks=_sinks())),
    "window-softcap-mask-offset": (17, 40, 2, lambda lq, lk: dict(
        window=(3, 5), softcap=2.0, attn_mask=_float_mask((BATCH, HEADS, lq, lk)), q_offset=7, scale=0.3)),
}


def _split(kwargs):
    return ({n: kwargs[n] for n in TENSOR_ARGS if n in kwargs},
            {n: x for n, x in kwargs.items() if n not in TENSOR_ARGS and n != "seed"})


def check_variant(q, k, v, layout="bhsd", dropout_mask=None, **kwargs):
    """One fusedattn.attention call, forward and backward, against the references (with dropout,
    dropout_mask is the reference's keep mask)."""
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    tensors, options = _split(kwargs)
    out, lse = fusedattn.attention(q, k, v, layout=layout, return_lse=True, **kwargs)
    assert out.dtype == q.dtype and out.shape == q.shape
    if dropout_mask is not None:
        options["dropout_mask"] = dropout_mask
    ref_kwargs = dict(layout=layout, **options, **tensors)
    ref, ref_lse = attention_reference(q, k, v, **ref_kwargs)
    lowp = q.dtype in LOW_PRECISION
    assert_close_to_reference(out, torch_attention(q, k, v, **ref_kwargs)[0] if lowp else None, ref)
    assert_lse_close(lse, ref_lse, q.dtype)
    probs, _ = attention_probabilities(q, k, **{n: x for n, x in ref_kwargs.items() if "dropout" not in n})
    empty = probs.sum(-1) == 0  # rows that see no key: exactly 0
    got = out.detach().transpose(1, 2) if layout == "bshd" else out.detach()
    assert torch.all(got[torch.from_numpy(empty)] == 0)

    dout = torch.randn(out.shape, dtype=q.dtype)
    out.backward(dout)
    inputs = dict(q=q, k=k, v=v, **tensors)
    ref_grads, _, _ = reference_grads(inputs, dout, layout=layout, **options)
    lowp_g = lowp_grads(inputs, dout, layout=layout, **options)[0] if lowp else None
    got_grads = {name: x.grad for name, x in inputs.items() if x.requires_grad}
    assert set(got_grads) == set(ref_grads)
    assert_grads_close(got_grads, ref_grads, lowp_g)
    for name, grad in got_grads.items():  # a broadcast mask's gradient has the mask's own shape
        assert grad.shape == inputs[name].shape and grad.dtype == inputs[name].dtype


def _config_inputs(name, dtype, layout="bhsd", head_dim=40):
    seqlen_q, seqlen_k, heads_kv, options = CONFIGS[name]
    q, k, v = make_qkv(BATCH, HEADS, heads_kv, seqlen_q, seqlen_k, head_dim, dtype, layout, k_scale=2.0)
    return q, k, v, options(seqlen_q, seqlen_k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_variant(name, dtype):
    q, k, v, kwargs = _config_inputs(name, dtype)
    check_variant(q, k, v, **kwargs)


@pytest.mark.parametrize("head_dim", [40, 64])  # 64: cache rows read in place; 40: converted and padded
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_variant_decode(name, dtype, head_dim):
    """Decode-sized queries run the decode kernel, whose blocks hold the heads of several kv heads
    (one thread: all of them) and split the 600 keys when blocks are few; 5 and 7 query rows of
    MHA take two unequal lane groups per kv head (3 + 2, 4 + 3)."""
    _, _, heads_kv, options = CONFIGS[name]
    for seqlen_q, threads in ((1, 1), (1, 2), (3, 2), (5, 2), (7, 1)):
        q, k, v = make_qkv(BATCH, HEADS, heads_kv, seqlen_q, 600, head_dim, dtype, k_scale=2.0)
        fusedattn.set_num_threads(threads)
        try:
            check_variant(q, k, v, **options(seqlen_q, 600))
        finally:
            fusedattn.set_num_threads(None)


@pytest.mark.parametrize("name", ["all", "causal-alibi-bh-bool-sinks", "window-softcap-mask-offset"])
def test_variant_bshd(name):
    q, k, v, kwargs = _config_inputs(name, torch.bfloat16, layout="bshd", head_dim=59)
    check_variant(q, k, v, layout="bshd", **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["all", "causal-alibi-bh-bool-sinks", "softcap"])
def test_variant_under_each_isa(isa, name, dtype):
    q, k, v, kwargs = _config_inputs(name, dtype, head_dim=59)
    check_variant(q, k, v, **kwargs)


@pytest.mark.parametrize("which", ["sinks", "alibi_slopes"])
def test_float64_per_head_parameters_are_not_rounded_to_float32(which):
    """fp64 inputs give fp64-accurate results: float64 sinks / ALiBi slopes must not be rounded to float32."""
    q, k, v = make_qkv(1, 2, 2, 9, 13, 16, torch.float64)
    kwargs = {which: torch.tensor([0.1, 0.3], dtype=torch.float64)}  # not representable in float32
    out = fusedattn.attention(q, k, v, **kwargs)
    ref, _ = attention_reference(q, k, v, **kwargs)
    assert_close_to_reference(out, None, ref)


def test_float64_mask_gradient_is_float64_accurate():
    """fp64 stays fp64-accurate: the gradient of a float64 attn_mask too (not accumulated in float32)."""
    q, k, v = make_qkv(1, 2, 2, 13, 21, 16, torch.float64)
    mask = torch.randn(1, 2, 13, 21, dtype=torch.float64, requires_grad=True)
    out = fusedattn.attention(q, k, v, attn_mask=mask)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref, _, _ = reference_grads(dict(q=q, k=k, v=v, attn_mask=mask), dout)
    error = (mask.grad - ref["attn_mask"]).abs().max().item() / ref["attn_mask"].abs().max().item()
    assert error < 1e-10, f"the float64 mask's gradient is only {error:.1e}-accurate (relative to its max)"


def test_sink_of_minus_infinity_over_rows_that_see_no_key():
    """A sink of -inf is no sink: rows that see no key then have LSE -inf, and add nothing to its
    gradient (exp(-inf - (-inf)) was NaN); the gradients equal those without that sink."""
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 2, 2, 6, 4, 16))  # bottom-right causal: rows 0-1 see no key
    sinks = torch.tensor([float("-inf"), 0.5], requires_grad=True)
    out = fusedattn.attention(q, k, v, causal=True, sinks=sinks)
    dout = torch.randn_like(out)
    out.backward(dout)
    assert torch.isfinite(sinks.grad).all() and sinks.grad[0] == 0
    ref, _, _ = reference_grads(dict(q=q, k=k, v=v), dout, causal=True, sinks=sinks.detach())
    assert_grads_close({name: x.grad for name, x in zip("qkv", (q, k, v))}, ref)


@pytest.mark.parametrize("mask_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(13, 1), (1, 2, 1, 21)], ids=["per-row", "per-head-and-key"])
def test_broadcast_mask_gradient_is_reduced_before_rounding(shape, mask_dtype):
    """A broadcast float mask's gradient is the dense one summed in float32 and rounded to the
    mask's dtype once, as torch does (each dense element rounded to bf16 first, then summed by
    autograd's expand, gave a per-row mask's gradient, exactly 0, errors of 2e-3). Against the
    float64 reference of the reduced gradient, to within the mask dtype's rounding of it."""
    q, k, v = make_qkv(1, 2, 2, 13, 21, 64)
    mask = torch.randn(shape).to(mask_dtype).requires_grad_()
    out = fusedattn.attention(q, k, v, attn_mask=mask)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref, _, _ = reference_grads(dict(q=q, k=k, v=v, attn_mask=mask), dout)
    expected = ref["attn_mask"].to(torch.float64)
    error = (mask.grad.to(torch.float64) - expected).abs()
    ulp = torch.finfo(mask_dtype).eps
    assert (error <= ulp * expected.abs() + 1e-5).all(), f"max error {error.max().item():.1e}"


@pytest.mark.parametrize("lead", [(), (2, 3)], ids=["3-D", "5-D"])
def test_sdpa_folded_mask_gradient_is_reduced_before_rounding(lead):
    """scaled_dot_product_attention with other than 4-D inputs folds their leading dims into one;
    a broadcast bf16 mask keeps its size-1 dims there, so its gradient is reduced before it is
    rounded as in fusedattn.attention (expanded and copied first, it was rounded per element)."""
    generator = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(*lead, 2, n, 32, generator=generator) for n in (13, 21, 21))
    mask = torch.randn(13, 1, generator=generator).bfloat16().requires_grad_()
    out = fusedattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    dout = torch.randn(out.shape, generator=generator)
    out.backward(dout)
    mask64 = mask.detach().double().requires_grad_()
    scores = q.double() @ k.double().transpose(-1, -2) / 32**0.5 + mask64
    (torch.softmax(scores, -1) @ v.double() * dout.double()).sum().backward()
    assert (mask.grad.double() - mask64.grad).abs().max().item() < 1e-5  # (exactly 0 in exact arithmetic)


# ---------------------------------------------------------------- masks

MASK_SHAPES = [(1, 1, 13, 21), (BATCH, 1, 1, 21), (BATCH, HEADS, 13, 21), (13, 21)]


def _mask(shape, kind, q_dtype, strided):
    """A mask of `shape`; strided: a view with a column stride of 2 and a bigger row stride."""
    big_shape = shape[:-2] + (shape[-2] + 3, 2 * shape[-1])
    if kind == "bool":
        big = torch.rand(big_shape) > 0.25
    else:
        big = (torch.randn(big_shape) * 2).to(torch.float32 if kind.startswith("float32") else q_dtype)
    mask = big[..., 1 : 1 + shape[-2], ::2] if strided else big[..., : shape[-2], : shape[-1]].contiguous()
    return mask.detach().requires_grad_(kind in ("float32", "qdtype"))


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("kind,dtype", [("bool", torch.float32), ("float32", torch.float32),
                                        ("float32-nograd", torch.float16), ("float32", torch.bfloat16),
                                        ("qdtype", torch.bfloat16), ("qdtype", torch.float64)])
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_mask_broadcast_dtype_strides(shape, kind, dtype, strided):
    q, k, v = make_qkv(BATCH, HEADS, 2, 13, 21, 24, dtype, k_scale=2.0)
    check_variant(q, k, v, causal=kind == "bool", attn_mask=_mask(shape, kind, dtype, strided))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["bool", "-inf", "all-False"])
def test_fully_masked_rows_give_zero_and_zero_gradients(kind, dtype):
    """Mask rows that are all False (or all -inf), or a mask that is False everywhere: output 0 there,
    zero gradients, never NaN (as SDPA)."""
    q, k, v = (x.requires_grad_(True) for x in make_qkv(BATCH, HEADS, HEADS, 9, 12, 16, dtype))
    rows = range(9) if kind == "all-False" else (0, 4, 8)
    if kind != "-inf":
        mask = torch.rand(BATCH, 1, 9, 12) > 0.3
        mask[:, :, list(rows)] = False
    else:
        mask = torch.randn(BATCH, 1, 9, 12)
        mask[:, :, [0, 4, 8]] = float("-inf")
        mask.requires_grad_(True)
    out = fusedattn.attention(q, k, v, attn_mask=mask)
    out.backward(torch.randn_like(out))
    expected = torch.nn.functional.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), attn_mask=mask)
    for row in rows:
        assert torch.equal(out[:, :, row], torch.zeros_like(out[:, :, row]))
        assert torch.equal(q.grad[:, :, row], torch.zeros_like(q.grad[:, :, row]))
        assert torch.equal(expected[:, :, row], out.detach()[:, :, row])
        if mask.requires_grad:
            assert torch.equal(mask.grad[:, :, row], torch.zeros_like(mask.grad[:, :, row]))
    grads = (q.grad, k.grad, v.grad) + ((mask.grad,) if mask.requires_grad else ())
    if kind == "all-False":
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    assert not any(torch.isnan(g).any() for g in grads) and not torch.isnan(out).any()
    check_variant(q, k, v, attn_mask=mask.detach().requires_grad_(mask.requires_grad))


def test_finfo_min_rows_give_torch_uniform_average():
    """Float mask rows of finfo.min are not 'masked': every key gets the same weight, as in torch."""
    q, k, v = make_qkv(BATCH, HEADS, HEADS, 9, 12, 16)
    mask = torch.randn(9, 12)
    mask[[2, 7]] = torch.finfo(torch.float32).min
    out = fusedattn.attention(q, k, v, attn_mask=mask)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, :, [2, 7]], v.mean(2, keepdim=True).expand(-1, -1, 2, -1), atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------- dropout

def _identity_values(batch, heads, seqlen_q, seqlen_k, p, seed):
    """With v = identity (head_dim = Lk), out[b, h, i, j] = probs[i, j] * keep / (1 - p): the kernel's
    own dropout decisions are the zeros of out (probs > 0 with no masking)."""
    q = torch.randn(batch, heads, seqlen_q, seqlen_k) * 0.3
    k = torch.randn(batch, heads, seqlen_k, seqlen_k) * 0.3
    v = torch.eye(seqlen_k).expand(batch, heads, seqlen_k, seqlen_k)
    return fusedattn.attention(q, k, v, dropout_p=p, seed=seed) != 0


@pytest.mark.parametrize("p", [0.17, 0.5])
def test_dropout_rate(p):
    kept = _identity_values(2, 4, 1024, 256, p, seed=987654321)
    assert abs((1.0 - kept.float().mean().item()) - p) < 0.01 * p
    expected = dropout_keep_mask(2, 4, 64, 256, p, 987654321)  # rows 0..63; the numpy Philox is the kernels'
    np.testing.assert_array_equal(kept[:, :, :64].numpy(), expected)


def test_dropout_seeds():
    q, k, v = make_qkv(BATCH, HEADS, 2, 33, 47, 40)
    first = fusedattn.attention(q, k, v, dropout_p=0.3, seed=2**40 + 7)
    assert torch.equal(first, fusedattn.attention(q, k, v, dropout_p=0.3, seed=2**40 + 7))
    assert not torch.equal(first, fusedattn.attention(q, k, v, dropout_p=0.3, seed=2**40 + 8))
    assert not torch.equal(first, fusedattn.attention(q, k, v, dropout_p=0.3, seed=7))  # high word of the seed used


@pytest.mark.parametrize("dtype,layout,extra", [
    (torch.float32, "bhsd", {}), (torch.float64, "bhsd", dict(causal=True)),
    (torch.float32, "bshd", dict(window=(5, 5), sinks=_sinks())), (torch.bfloat16, "bhsd", dict(causal=True)),
    (torch.float64, "bhsd", dict(attn_mask=_float_mask((1, HEADS, 21, 35), torch.float64), alibi_slopes=_slopes(4))),
], ids=["float32", "float64-causal", "float32-bshd-window-sinks", "bfloat16-causal", "float64-mask-alibi"])
def test_dropout_matches_reference_mask(dtype, layout, extra):
    """out and gradients equal the reference computed with reference.dropout_keep_mask (GQA, both layouts)."""
    q, k, v = make_qkv(BATCH, HEADS, 2, 21, 35, 24, dtype, layout)
    keep = dropout_keep_mask(BATCH, HEADS, 21, 35, 0.25, seed=123456789)
    check_variant(q, k, v, layout=layout, dropout_p=0.25, seed=123456789, dropout_mask=keep, **extra)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seqlen_q,head_dim", [(12, 32), (16, 64), (10, 24), (9, 96)])
def test_dropout_short_queries(seqlen_q, head_dim, dtype):
    """Blocks with dropout hold one head; with 9-16 query rows of a GQA head they run the decode
    kernel's lane groups of 4 and the rest (kManyLaneGroups): out and gradients equal the
    reference computed with reference.dropout_keep_mask, causal."""
    q, k, v = make_qkv(BATCH, HEADS, 2, seqlen_q, 35, head_dim, dtype, "bhsd")
    keep = dropout_keep_mask(BATCH, HEADS, seqlen_q, 35, 0.25, seed=123456789)
    check_variant(q, k, v, layout="bhsd", dropout_p=0.25, seed=123456789, dropout_mask=keep, causal=True)


@pytest.mark.parametrize("api", ["sdpa", "flash_attn_func", "attention", "attention-numpy"])
def test_manual_seed_makes_dropout_reproducible(api):
    """Without an explicit seed, dropout draws one from torch's default generator (numpy's global
    RNG for numpy inputs): torch.manual_seed / np.random.seed make runs reproducible."""
    q, k, v = make_qkv(BATCH, HEADS, HEADS, 17, 23, 16, layout="bshd" if api == "flash_attn_func" else "bhsd")
    run = {"sdpa": lambda: fusedattn.scaled_dot_product_attention(q, k, v, dropout_p=0.4),
           "flash_attn_func": lambda: fusedattn.flash_attn_func(q, k, v, dropout_p=0.4, causal=True),
           "attention": lambda: fusedattn.attention(q, k, v, dropout_p=0.4, causal=True),
           "attention-numpy": lambda: torch.from_numpy(fusedattn.attention(q.numpy(), k.numpy(), v.numpy(),
                                                                           dropout_p=0.4))}[api]
    reseed = (lambda: np.random.seed(11)) if api.endswith("numpy") else (lambda: torch.manual_seed(11))
    reseed()
    first = run()
    second = run()
    reseed()
    assert torch.equal(first, run())
    assert not torch.equal(first, second)


def test_dropout_p_one_gives_zeros():
    q, k, v = (x.requires_grad_(True) for x in make_qkv(1, 2, 2, 7, 9, 8))
    out = fusedattn.attention(q, k, v, dropout_p=1.0, seed=5)
    out.backward(torch.randn_like(out))
    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.equal(x.grad, torch.zeros_like(x)) for x in (q, k, v))


# ---------------------------------------------------------------- drop-ins

def _sdpa_case(draw):
    """One random combination of SDPA's arguments: (q, k, v, kwargs), inputs of rank 3, 4 or 5."""
    lead = [(), (2,), (2, 3)][draw.integers(3)]
    heads_kv = int(draw.choice([1, 2]))
    heads = heads_kv * int(draw.choice([1, 2, 3]))
    seqlen_q, seqlen_k = (int(n) for n in draw.integers(1, 40, size=2))
    head_dim = int(draw.choice([8, 16, 40, 59]))
    dtype = torch.float64 if draw.random() < 0.25 else torch.float32
    q = torch.randn(*lead, heads, seqlen_q, head_dim, dtype=dtype)
    k, v = (torch.randn(*lead, heads_kv, seqlen_k, head_dim, dtype=dtype) for _ in range(2))
    kwargs = dict(enable_gqa=heads != heads_kv)
    if draw.random() < 0.5:
        kwargs["scale"] = float(draw.uniform(0.05, 1.0))
    mask_kind = draw.choice(["none", "bool", "float", "causal"])
    full = lead + (heads, seqlen_q, seqlen_k)
    if mask_kind == "causal":
        kwargs["is_causal"] = True
    elif mask_kind != "none":
        shape = [n if draw.random() < 0.5 else 1 for n in full][int(draw.integers(len(full) - 1)):]
        shape[-1] = seqlen_k if draw.random() < 0.8 else 1
        kwargs["attn_mask"] = (torch.rand(shape) > 0.3 if mask_kind == "bool"
                               else torch.randn(shape, dtype=dtype).requires_grad_(True))
    return q, k, v, kwargs


def test_sdpa_matches_torch_for_random_arguments():
    draw = np.random.default_rng(424242)
    for case in range(40):
        q, k, v, kwargs = _sdpa_case(draw)
        results = []
        for sdpa in (torch.nn.functional.scaled_dot_product_attention, fusedattn.scaled_dot_product_attention):
            leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
            mask = kwargs.get("attn_mask")
            mask = mask.detach().requires_grad_(True) if mask is not None and mask.is_floating_point() else mask
            out = sdpa(*leaves, **(dict(kwargs, attn_mask=mask) if mask is not None else kwargs))
            out.backward(torch.ones_like(out) * torch.arange(out.shape[-1], dtype=out.dtype))
            grads = [x.grad for x in leaves] + ([mask.grad] if mask is not None and mask.requires_grad else [])
            results.append([out.detach()] + grads)
        fp32 = q.dtype == torch.float32
        out_tol = dict(atol=2e-5, rtol=1e-5) if fp32 else dict(atol=1e-12, rtol=1e-12)
        scale = max(1.0, *(x.abs().max().item() for x in results[0][1:]))  # gradients: relative to their scale
        grad_tol = dict(atol=2e-5 * scale, rtol=2e-5) if fp32 else dict(atol=1e-10 * scale, rtol=1e-10)
        for index, (expected, got) in enumerate(zip(*results)):
            torch.testing.assert_close(got, expected, **(grad_tol if index else out_tol),
                                       msg=lambda m: f"case {case} {kwargs}, result {index}: {m}")


def test_sdpa_mask_and_is_causal_together_raise():
    q, k, v = make_qkv(1, 2, 2, 5, 5, 8)
    with pytest.raises(ValueError, match="is_causal"):
        fusedattn.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 5, dtype=torch.bool), is_causal=True)


@pytest.mark.parametrize("kwargs", [
    dict(window_size=(3, 2), causal=False), dict(window_size=(4, -1), causal=True, softcap=3.0),
    dict(alibi_slopes=_slopes(HEADS), causal=True), dict(alibi_slopes=_slopes((BATCH, HEADS)), softcap=5.0),
    dict(softmax_scale=0.2, dropout_p=0.3),
], ids=lambda kw: "-".join(kw))
def test_flash_attn_func_variants_and_attn_probs(kwargs):
    """flash_attn_func (bshd, bottom-right): out, lse and S_dmask (probs, negated where dropped)."""
    dropout_p = kwargs.get("dropout_p", 0.0)
    q, k = torch.randn(BATCH, 21, HEADS, 30), torch.randn(BATCH, 30, HEADS, 30)
    v = torch.eye(30).expand(BATCH, HEADS, 30, 30).transpose(1, 2)  # out = the (dropped) probs
    out, lse, s_dmask = fusedattn.flash_attn_func(q, k, v, return_attn_probs=True, **kwargs)
    options = dict(causal=kwargs.get("causal", False), window=kwargs.get("window_size", (-1, -1)),
                   softcap=kwargs.get("softcap", 0.0), alibi_slopes=kwargs.get("alibi_slopes"),
                   scale=kwargs.get("softmax_scale"), layout="bshd")
    probs, ref_lse = attention_probabilities(q, k, **options)
    assert s_dmask.shape == probs.shape and lse.shape == ref_lse.shape
    np.testing.assert_allclose(s_dmask.abs().numpy(), probs, atol=1e-6)
    assert_lse_close(lse, ref_lse)
    kept = s_dmask >= 0
    expected = torch.from_numpy(probs).float() * kept / (1.0 - dropout_p)
    torch.testing.assert_close(out.transpose(1, 2), expected, atol=2e-5, rtol=1e-5)
    if dropout_p:
        assert 0.2 < 1.0 - kept.float().mean().item() < 0.4
