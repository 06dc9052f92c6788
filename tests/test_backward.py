"""Training: gradients dq, dk, dv (and through the LSE) of fusedattn.attention.

- a sampled grid over the forward's axes (dtype, head_dim, (Lq, Lk), causal, GQA / MQA, layout,
  strides) checked against the fp64 reference gradients (torch float64 autograd of conftest's
  torch_attention) AND against torch SDPA's gradients, with DESIGN.md's 3x rule in fp16 / bf16;
- fully masked rows and never-seen keys give exact zero gradients, every gradient element written;
- bitwise determinism, `.grad is None` for inputs that need none, the public attention_backward
  (numpy and torch) equal to autograd, torch.autograd.gradcheck in float64 (also with every variant),
  torch.library.opcheck of the ops, torch.compile(fullgraph=True) of a function and a module
  (also dynamic=True), non-contiguous / expanded dout, and gradients through the returned LSE.
"""

import itertools
import random

import numpy as np
import pytest
import torch

import fusedattn
from conftest import (DTYPES, LOW_PRECISION, assert_close_to_reference, assert_grads_close, lowp_grads, make_qkv,
                      reference_grads)
from fusedattn import _C, _runtime
from fusedattn.reference import visible_mask

HEAD_DIMS = [1, 40, 59, 64, 128, 256]
SEQLENS = [(1, 1), (1, 17), (17, 17), (17, 129), (129, 17), (129, 129)]
HEADS = [(2, 2), (4, 1), (4, 2)]  # MHA, MQA, GQA
LAYOUTS = ["bhsd", "bshd"]
STRIDES = ["contiguous", "slice", "permuted"]


def _grid(size=40):
    """`size` cases drawn (fixed seed) from the product; every dtype gets causal and full cases."""
    draw = random.Random(20240817)
    cases = []
    for index in range(size):
        dtype, causal = DTYPES[index % 4], bool(index // 4 % 2)
        seqlens = SEQLENS[index % len(SEQLENS)]
        head_dim, heads = draw.choice(HEAD_DIMS), draw.choice(HEADS)
        layout, strides = draw.choice(LAYOUTS), draw.choice(STRIDES)
        case_id = (f"{str(dtype)[6:]}-d{head_dim}-{seqlens[0]}x{seqlens[1]}-{'causal' if causal else 'full'}"
                   f"-h{heads[0]}kv{heads[1]}-{layout}-{strides}")
        cases.append(pytest.param(dtype, head_dim, seqlens, causal, heads, layout, strides, id=case_id))
    return cases


GRID = _grid()


def test_grid_covers_every_axis_value():
    axes = [set(values) for values in zip(*(case.values for case in GRID))]
    assert axes[0] == set(DTYPES) and axes[1] == set(HEAD_DIMS) and axes[2] == set(SEQLENS)
    assert axes[3] == {False, True} and axes[4] == set(HEADS) and axes[5] == set(LAYOUTS)
    assert axes[6] == set(STRIDES)


def _leaves(*tensors):
    """Fresh leaves that share memory and strides with `tensors` and require grad."""
    return tuple(x.detach().requires_grad_(True) for x in tensors)


def _sdpa_grads(q, k, v, dout, causal, layout):
    """torch SDPA's gradients with the same (bottom-right) causal mask, in the inputs' dtype."""
    q, k, v = _leaves(q, k, v)
    views = [x.transpose(1, 2) if layout == "bshd" else x for x in (q, k, v)]
    seqlen_q, seqlen_k = views[0].shape[2], views[1].shape[2]
    mask = torch.from_numpy(visible_mask(seqlen_q, seqlen_k, causal=causal))
    out = torch.nn.functional.scaled_dot_product_attention(*views, attn_mask=mask, enable_gqa=True)
    out = out.transpose(1, 2) if layout == "bshd" else out
    return dict(zip("qkv", torch.autograd.grad(out, (q, k, v), dout)))


@pytest.mark.parametrize("dtype,head_dim,seqlens,causal,heads,layout,strides", GRID)
def test_backward_grid(dtype, head_dim, seqlens, causal, heads, layout, strides):
    check_backward(dtype, head_dim, seqlens, causal, heads, layout, strides)


ISA_SUBSET = [  # dtype, head_dim, (Lq, Lk), causal, (Hq, Hkv), layout, strides
    (torch.float32, 59, (17, 129), True, (4, 1), "bshd", "slice"),
    (torch.bfloat16, 64, (129, 17), True, (4, 2), "bhsd", "contiguous"),
    (torch.float16, 128, (33, 33), False, (2, 2), "bhsd", "permuted"),
    (torch.float64, 1, (17, 17), True, (2, 2), "bshd", "contiguous"),
]


@pytest.mark.parametrize("dtype,head_dim,seqlens,causal,heads,layout,strides", ISA_SUBSET)
def test_backward_under_each_isa(isa, dtype, head_dim, seqlens, causal, heads, layout, strides):
    assert _runtime.cpu_isa() == isa
    check_backward(dtype, head_dim, seqlens, causal, heads, layout, strides)


def check_backward(dtype, head_dim, seqlens, causal, heads, layout, strides):
    """Kernel gradients vs the fp64 reference (3x torch's own low-precision math) and vs torch SDPA."""
    batch = 2 if seqlens[0] * seqlens[1] * head_dim < 17 * 129 * 64 else 1
    q, k, v = make_qkv(batch, heads[0], heads[1], *seqlens, head_dim, dtype, layout, strides, k_scale=2.0)
    q, k, v = _leaves(q, k, v)
    out, lse = fusedattn.attention(q, k, v, causal=causal, layout=layout, return_lse=True)
    dout = torch.randn(out.shape, dtype=dtype)
    out.backward(dout)
    got = dict(q=q.grad, k=k.grad, v=v.grad)
    for name, x in zip("qkv", (q, k, v)):
        assert got[name].dtype == dtype and got[name].shape == x.shape
    kwargs = dict(causal=causal, layout=layout)
    ref, _, ref_lse = reference_grads(dict(q=q, k=k, v=v), dout, **kwargs)
    lowp = lowp_grads(dict(q=q, k=k, v=v), dout, **kwargs)[0] if dtype in LOW_PRECISION else None
    assert_grads_close(got, ref, lowp)

    sdpa = _sdpa_grads(q, k, v, dout, causal, layout)  # and as close as torch's SDPA is
    if dtype in LOW_PRECISION:
        for name in "qkv":
            assert_close_to_reference(got[name], sdpa[name], ref[name].numpy(), factor=3.0, what=f"d{name} vs SDPA")
    else:
        assert_grads_close(got, sdpa)

    empty_rows = torch.isneginf(ref_lse)  # (batch, heads, Lq): rows that see no key get dq = 0 exactly
    dq = got["q"].transpose(1, 2) if layout == "bshd" else got["q"]
    assert torch.all(dq[empty_rows] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fully_masked_rows_and_unseen_keys_get_zero_gradients(dtype):
    """Bottom-right causal with Lq > Lk: the first Lq - Lk rows see nothing (dq = 0); a window plus
    q_offset leaves keys that no query sees (dk = dv = 0). Never NaN."""
    q, k, v = _leaves(*make_qkv(2, 4, 2, 40, 9, 32, dtype))
    out = fusedattn.attention(q, k, v, causal=True)
    out.backward(torch.randn_like(out))
    assert torch.equal(q.grad[:, :, :31], torch.zeros_like(q.grad[:, :, :31]))
    assert all(not torch.isnan(g).any() for g in (q.grad, k.grad, v.grad))
    assert q.grad[:, :, 31:].abs().sum() > 0

    q, k, v = _leaves(*make_qkv(1, 2, 2, 6, 30, 16, dtype))
    out = fusedattn.attention(q, k, v, causal=True, window=(2, -1), q_offset=0)  # keys 6.. never seen
    out.backward(torch.randn_like(out))
    for grad in (k.grad, v.grad):
        assert torch.equal(grad[:, :, 6:], torch.zeros_like(grad[:, :, 6:]))
        assert not torch.isnan(grad).any()

    q, k, v = _leaves(*make_qkv(1, 2, 1, 7, 5, 16, dtype))
    out = fusedattn.attention(q, k, v, causal=True, q_offset=-20)  # nothing visible at all
    out.backward(torch.randn_like(out))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in (q.grad, k.grad, v.grad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_gradient_element_written(dtype):
    """_C.attention_backward into NaN-poisoned dq / dk / dv: all written, also unseen keys and empty rows."""
    q, k, v = make_qkv(1, 4, 2, 23, 31, 59, dtype)
    variant = (59**-0.5, True, -2, 3, -1, 0.0, None, None, None, 0.0, 0, 0)  # rows 0, 1 and keys 21.. see nothing
    out, lse = torch.empty_like(q), torch.empty(1, 4, 23)
    names = ("q", "k", "v")
    _C.attention_forward(q, k, v, out, lse, variant, _runtime.cpu_isa(), 2, names)
    dq, dk, dv = (torch.full_like(x, float("nan")) for x in (q, k, v))
    dout = torch.randn_like(out)
    _C.attention_backward(dout, None, q, k, v, out, lse, dq, dk, dv, None, variant, _runtime.cpu_isa(), 2, names)
    assert not any(torch.isnan(g).any() for g in (dq, dk, dv)), "some gradient elements were never written"
    ref, _, _ = reference_grads(dict(q=q, k=k, v=v), dout, causal=True, q_offset=-2, window=(3, -1))
    lowp = lowp_grads(dict(q=q, k=k, v=v), dout, causal=True, q_offset=-2, window=(3, -1))[0]
    assert_grads_close(dict(q=dq, k=dk, v=dv), ref, lowp if dtype in LOW_PRECISION else None)


@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_gradients_bitwise_deterministic(num_threads):
    """Two runs with the same thread count give bitwise the same gradients (no atomics)."""
    fusedattn.set_num_threads(num_threads)
    q, k, v = make_qkv(2, 4, 2, 150, 190, 64, k_scale=2.0)
    dout = torch.randn(2, 4, 150, 64)
    runs = []
    for _ in range(2):
        leaves = _leaves(q, k, v)
        out = fusedattn.attention(*leaves, causal=True, window=(70, -1))
        out.backward(dout)
        runs.append([x.grad for x in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("needs", ["q", "k", "v", "kv", "qv", "qkv"])
def test_no_gradient_for_inputs_that_do_not_require_one(needs):
    q, k, v = make_qkv(1, 4, 2, 13, 21, 24)
    mask = torch.randn(1, 1, 13, 21)  # a float mask and sinks that do not require grad
    sinks = torch.randn(4)
    full = _leaves(q, k, v)
    fusedattn.attention(*full, causal=True, attn_mask=mask, sinks=sinks).sum().backward()
    inputs = [x.detach().requires_grad_(name in needs) for name, x in zip("qkv", (q, k, v))]
    out = fusedattn.attention(*inputs, causal=True, attn_mask=mask, sinks=sinks)
    out.sum().backward()
    for name, x, expected in zip("qkv", inputs, full):
        if name in needs:
            assert torch.equal(x.grad, expected.grad)
        else:
            assert x.grad is None
    assert mask.grad is None and sinks.grad is None


PUBLIC_BACKWARD_CASES = [
    dict(),
    dict(causal=True, layout="bshd"),
    dict(causal=True, window=(5, 2), alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625], np.float32), softcap=3.0),
    dict(attn_mask=np.random.default_rng(1).random((1, 1, 11, 19)) > 0.3, sinks=np.float32([0.5, -1.0, 2.0, 0.0])),
    dict(attn_mask=np.random.default_rng(2).standard_normal((11, 19)).astype(np.float32), q_offset=3),
    dict(dropout_p=0.3, seed=1234, causal=True),
]


@pytest.mark.parametrize("kind", ["torch", "numpy"])
@pytest.mark.parametrize("kwargs", PUBLIC_BACKWARD_CASES, ids=lambda kw: "-".join(kw) or "plain")
def test_public_attention_backward_equals_autograd(kind, kwargs):
    layout = kwargs.get("layout", "bhsd")
    q, k, v = make_qkv(2, 4, 2, 11, 19, 24, layout=layout)
    dout = torch.randn(q.shape)
    torch_kwargs = {name: torch.from_numpy(x) if isinstance(x, np.ndarray) else x for name, x in kwargs.items()}
    leaves = _leaves(q, k, v)
    fusedattn.attention(*leaves, **torch_kwargs).backward(dout)
    expected = [x.grad for x in leaves]

    convert = (lambda x: x) if kind == "torch" else (lambda x: x.numpy())
    call_kwargs = torch_kwargs if kind == "torch" else kwargs
    q, k, v, dout = (convert(x) for x in (q, k, v, dout))
    out, lse = fusedattn.attention(q, k, v, return_lse=True, **call_kwargs)
    grads = fusedattn.attention_backward(dout, q, k, v, out, lse, **call_kwargs)
    for got, want in zip(grads, expected):
        assert type(got) is type(q) and tuple(got.shape) == tuple(want.shape)
        np.testing.assert_array_equal(np.asarray(got), want.numpy())


def test_public_attention_backward_needs_the_dropout_seed():
    q, k, v = make_qkv(1, 2, 2, 5, 7, 8)
    out, lse = fusedattn.attention(q, k, v, dropout_p=0.5, seed=3, return_lse=True)
    with pytest.raises(ValueError, match="seed"):
        fusedattn.attention_backward(torch.ones_like(out), q, k, v, out, lse, dropout_p=0.5)


def test_gradcheck_float64():
    """Also through the (float64) LSE output. One thread: hundreds of tiny calls."""
    fusedattn.set_num_threads(1)
    q, k, v = _leaves(*make_qkv(1, 4, 2, 5, 7, 6, torch.float64))
    assert torch.autograd.gradcheck(lambda q, k, v: fusedattn.attention(q, k, v, causal=True, return_lse=True),
                                   (q, k, v))
    q, k, v = _leaves(*make_qkv(2, 2, 1, 6, 3, 4, torch.float64, layout="bshd", strides="slice"))
    assert torch.autograd.gradcheck(lambda q, k, v: fusedattn.attention(q, k, v, layout="bshd"), (q, k, v))


def test_gradcheck_float64_every_variant():
    """causal + window + ALiBi + softcap + sinks + a broadcast float mask, all inputs differentiated,
    through out and LSE."""
    fusedattn.set_num_threads(1)
    q, k, v = _leaves(*make_qkv(2, 2, 1, 5, 7, 4, torch.float64))
    mask = torch.randn(2, 1, 5, 7, dtype=torch.float64, requires_grad=True)
    sinks = torch.tensor([0.5, -0.25], dtype=torch.float64, requires_grad=True)
    slopes = torch.tensor([0.5, 0.125])

    def fn(q, k, v, mask, sinks):
        return fusedattn.attention(q, k, v, causal=True, window=(3, 1), alibi_slopes=slopes, softcap=2.0,
                                   sinks=sinks, attn_mask=mask, return_lse=True)

    assert torch.autograd.gradcheck(fn, (q, k, v, mask, sinks))


def test_float64_gradients_are_float64_accurate():
    """fp64 accumulates in fp64: the gradients are as exact as the forward (the LSE is float64)."""
    q, k, v = _leaves(*make_qkv(1, 2, 2, 33, 47, 64, torch.float64, k_scale=2.0))
    out = fusedattn.attention(q, k, v)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref, _, _ = reference_grads(dict(q=q, k=k, v=v), dout)
    for name, x in zip("qkv", (q, k, v)):
        error = (x.grad - ref[name]).abs().max().item() / ref[name].abs().max().item()
        assert error < 1e-10, f"d{name} of float64 inputs is only {error:.1e}-accurate (relative to max |d{name}|)"


def _op_args(q, k, v, mask=None, sinks=None, bshd=False, causal=True):
    return (q, k, v, mask, None, sinks, None, 0.3, causal, 2, 6, -1, 0.0, 0.0, bshd, "q,k,v")


@pytest.mark.parametrize("case", ["contiguous", "permuted", "permuted-mask-sinks", "bshd-mask"])
def test_opcheck_attention_forward(case):
    layout = "bshd" if case.startswith("bshd") else "bhsd"
    q, k, v = make_qkv(2, 4, 2, 9, 11, 16, layout=layout, strides="permuted" if "permuted" in case else "contiguous")
    q, k, v = _leaves(q, k, v)
    mask = sinks = None
    if "mask" in case:
        mask = torch.randn(2, 1, 9, 11, requires_grad=True).expand(2, 4, 9, 11)
    if "sinks" in case:
        sinks = torch.randn(4, requires_grad=True)
    torch.library.opcheck(torch.ops.fusedattn.attention_forward.default,
                          _op_args(q, k, v, mask, sinks, bshd=layout == "bshd"))


def test_opcheck_attention_backward():
    q, k, v = make_qkv(2, 4, 2, 9, 11, 16)
    sinks = torch.randn(4)
    out, lse = torch.ops.fusedattn.attention_forward.default(*_op_args(q, k, v, sinks=sinks))
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    args = _op_args(q, k, v, sinks=sinks)
    torch.library.opcheck(torch.ops.fusedattn.attention_backward.default,
                          (dout, dlse, q, k, v, out, lse) + args[3:] + (False,))


class _Attention(torch.nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):  # x: (batch, seqlen, dim)
        batch, seqlen, dim = x.shape
        q, k, v = self.qkv(x).view(batch, seqlen, 3, self.heads, dim // self.heads).unbind(2)
        out = fusedattn.attention(q, k, v, causal=True, layout="bshd")
        return self.proj(out.reshape(batch, seqlen, dim))


def _attention_and_lse(q, k, v):
    out, lse = fusedattn.attention(q, k, v, causal=True, window=(6, -1), return_lse=True)
    return out * 2.0, lse


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_function(dynamic):
    """fullgraph=True raises on any graph break; forward, backward (also through lse) match eager."""
    torch._dynamo.reset()
    compiled = torch.compile(_attention_and_lse, fullgraph=True, dynamic=dynamic)
    for seqlens in ([9, 13], [17, 23]) if dynamic else ([9, 13],):
        q, k, v = make_qkv(2, 4, 2, *seqlens, 16)
        results = []
        for fn in (_attention_and_lse, compiled):
            leaves = _leaves(q, k, v)
            out, lse = fn(*leaves)
            (out.square().sum() + lse.sum()).backward()
            results.append([out.detach(), lse.detach()] + [x.grad for x in leaves])
        for eager, comp in zip(*results):
            torch.testing.assert_close(comp, eager, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_module(dynamic):
    torch._dynamo.reset()
    eager = _Attention()
    compiled_module = _Attention()
    compiled_module.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_module, fullgraph=True, dynamic=dynamic)
    x = torch.randn(2, 17, 32)
    out_eager, out_compiled = eager(x), compiled(x)
    torch.testing.assert_close(out_compiled, out_eager, atol=1e-5, rtol=1e-5)
    out_eager.square().sum().backward()
    out_compiled.square().sum().backward()
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled_module.parameters()):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dout_kind", ["expanded", "strided-last-dim", "transposed"])
def test_non_contiguous_dout(dout_kind):
    q, k, v = _leaves(*make_qkv(2, 4, 2, 12, 17, 24))
    out = fusedattn.attention(q, k, v, causal=True)
    if dout_kind == "expanded":  # loss = out.sum(): dout is a stride-0 expand of a scalar
        dout = torch.ones(()).expand(out.shape)
        out.sum().backward()
    else:
        big = torch.randn(2, 12, 4, 48) if dout_kind == "transposed" else torch.randn(2, 4, 12, 48)
        dout = big.transpose(1, 2)[..., :24] if dout_kind == "transposed" else big[..., ::2]
        out.backward(dout)
    ref, _, _ = reference_grads(dict(q=q, k=k, v=v), dout.contiguous(), causal=True)
    assert_grads_close(dict(q=q.grad, k=k.grad, v=v.grad), ref)


@pytest.mark.parametrize("dtype,loss", list(itertools.product([torch.float32, torch.bfloat16], ["lse-only", "both"]))
                         + [(torch.float64, "both")])
def test_gradient_through_lse(dtype, loss):
    """d loss / d (q, k) through the returned LSE (dlse), alone and with dout; also with sinks."""
    q, k, v = _leaves(*make_qkv(2, 4, 2, 21, 33, 40, dtype))
    sinks = torch.randn(4, requires_grad=True)
    out, lse = fusedattn.attention(q, k, v, causal=True, sinks=sinks, return_lse=True)
    dlse = torch.randn(lse.shape)
    dout = torch.zeros(out.shape, dtype=dtype) if loss == "lse-only" else torch.randn(out.shape, dtype=dtype)
    total = (lse * dlse).sum() + (0 if loss == "lse-only" else (out * dout).sum())
    total.backward()
    inputs = dict(q=q, k=k, v=v, sinks=sinks)
    ref, _, _ = reference_grads(inputs, dout, dlse, causal=True)
    lowp = lowp_grads(inputs, dout, dlse, causal=True)[0] if dtype in LOW_PRECISION else None
    if loss == "lse-only":  # the LSE does not depend on v
        assert v.grad is None or torch.equal(v.grad, torch.zeros_like(v))
        del ref["v"]
    assert_grads_close(dict(q=q.grad, k=k.grad, v=v.grad, sinks=sinks.grad), ref, lowp)
