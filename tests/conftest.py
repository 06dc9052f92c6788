"""Shared fixtures and helpers of the fusedattn test suite.

- every test gets freshly seeded torch / numpy RNGs (``rng`` is a numpy Generator);
- ``make_qkv`` draws random q, k, v in either layout, optionally non-contiguous;
- ``assert_close_to_reference`` is DESIGN.md's tolerance rule: fp32 / fp64 compare directly with
  the fp64 reference; fp16 / bf16 may err at most 2x as much as PyTorch's own math in that dtype
  (``torch_attention_lowp``) plus a rounding-sized slack (flash-attn's ``ref + 0.3 - 0.3`` trick);
- ``check_attention`` runs the reference and all the checks on one result, including the
  fully-masked-row rule (output exactly 0, LSE -inf) and "no NaN anywhere"; the LSE is float32,
  float64 for float64 inputs (so that fp64 gradients stay fp64-accurate);
- ``torch_attention`` is a small differentiable torch attention with every variant of the score
  pipeline (softcap, ALiBi, masks, sinks, dropout with a given keep mask): in float64 its autograd
  gives the reference gradients, in fp16 / bf16 it is PyTorch's own low-precision math (values and
  gradients) for the tolerance rule; ``assert_grads_close`` applies the rule (3x) to gradients;
- ``force_isa`` forces one CPU ISA and always restores the default;
- tests marked ``cuda`` are skipped without a GPU.
"""

from __future__ import annotations

import contextlib
import zlib

import numpy as np
import pytest
import torch

import fusedattn
from fusedattn import _C, _runtime
from fusedattn.reference import attention_reference, visible_mask

ISAS = list(_C.available_isas())
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LOW_PRECISION = (torch.float16, torch.bfloat16)
FP32_ATOL, FP32_RTOL = 2e-5, 1e-5
FP64_ATOL, FP64_RTOL = 1e-12, 1e-12
LSE_ATOL, LSE_RTOL = 2e-5, 2e-6  # the LSE is fp32 whatever the input dtype


def _have_gpu() -> bool:
    """A usable NVIDIA GPU: torch sees one, or fusedattn's CUDA module does (torch may be a CPU build)."""
    if torch.cuda.is_available():
        return True
    try:
        from fusedattn import _cuda
    except ImportError:
        return False
    try:
        return _cuda.device_count() > 0
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _have_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (none found by torch or fusedattn._cuda)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_make_parametrize_id(config, val, argname):
    if isinstance(val, torch.dtype):  # "bfloat16" rather than "dtype3" in test ids
        return str(val).replace("torch.", "")
    return None


@pytest.fixture(autouse=True)
def rng(request):
    """Seeds torch and numpy from the test's id, so every test draws its own reproducible inputs."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def _restore_runtime():
    """No test leaks a forced ISA or thread count into the next one."""
    yield
    _runtime._set_cpu_isa(None)
    fusedattn.set_num_threads(None)


@contextlib.contextmanager
def force_isa(name):
    """Runs the body with the CPU ISA `name` forced (as FUSEDATTN_CPU_ISA does), then restores the default."""
    try:
        _runtime._set_cpu_isa(name)
        yield name
    finally:
        _runtime._set_cpu_isa(None)


@pytest.fixture(params=ISAS)
def isa(request):
    """Each CPU ISA this machine runs, forced for the duration of the test."""
    with force_isa(request.param) as name:
        yield name


# ---------------------------------------------------------------- inputs

def _strided_like(shape, dtype, kind):
    """A random tensor of `shape` (4-D) that is contiguous, a slice of a bigger one, or permuted-dense."""
    if kind == "contiguous":
        return torch.randn(shape, dtype=dtype)
    if kind == "slice":  # padded along every dim: strides of batch, dim 1, dim 2 and the row all grow
        b, s1, s2, d = shape
        big = torch.randn(b + 1, s1 + 2, s2 + 3, d + 5, dtype=dtype)
        return big[1:, 2:, 1 : 1 + s2, 3 : 3 + d]
    if kind == "permuted":  # dense, but dims 1 and 2 swapped in memory
        return torch.randn(shape, dtype=dtype).transpose(1, 2).contiguous().transpose(1, 2)
    raise ValueError(kind)


def make_qkv(batch, heads, heads_kv, seqlen_q, seqlen_k, head_dim, dtype=torch.float32, layout="bhsd",
             strides="contiguous", k_scale=1.0):
    """Random q, k, v in `layout` ("bhsd" or "bshd"); `strides` picks the memory layout (see _strided_like)."""
    def shape(h, s):
        return (batch, h, s, head_dim) if layout == "bhsd" else (batch, s, h, head_dim)

    q = _strided_like(shape(heads, seqlen_q), dtype, strides)
    k = _strided_like(shape(heads_kv, seqlen_k), dtype, strides)
    v = _strided_like(shape(heads_kv, seqlen_k), dtype, strides)
    if k_scale != 1.0:
        k.mul_(k_scale)  # in place keeps k's strides
    return q, k, v


# ---------------------------------------------------------------- PyTorch's own math and the tolerance rule

def torch_attention_lowp(q, k, v, *, causal=False, scale=None, q_offset=None, window=(-1, -1), layout="bhsd"):
    """Plain matmul-softmax-matmul attention computed by torch in the inputs' own dtype (bhsd/bshd)."""
    if layout == "bshd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(group, dim=1) for x in (k, v))
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-1, -2)) * scale
    visible = torch.from_numpy(visible_mask(q.shape[2], k.shape[2], causal=causal, q_offset=q_offset, window=window))
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows: 0, as the contract says
    out = probs @ v
    return out.transpose(1, 2) if layout == "bshd" else out


def _as_float64(x):
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def assert_close_to_reference(out, out_torch_lowp, ref, factor=2.0, what="output"):
    """DESIGN.md's rule. out: kernel result; ref: the fp64 reference (numpy); out_torch_lowp: torch's
    math in out's dtype. fp32 / fp64 compare directly when out_torch_lowp is None; with it (always for
    fp16 / bf16) the kernel may err up to `factor` (2x; 3x for gradients) as much as torch did, plus a
    rounding-sized slack."""
    dtype = out.dtype
    got = _as_float64(out)
    assert got.shape == ref.shape
    assert not np.isnan(got).any(), f"{what} contains NaN"
    err = np.abs(got - ref)
    if dtype in (torch.float32, np.float32) and out_torch_lowp is None:
        bound = FP32_ATOL + FP32_RTOL * np.abs(ref)
    elif dtype in (torch.float64, np.float64) and out_torch_lowp is None:
        bound = FP64_ATOL + FP64_RTOL * np.abs(ref)
    else:
        torch_dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, np.dtype(dtype).name)
        ref_lowp = torch.from_numpy(ref).to(torch_dtype)
        slack = 2 * ((ref_lowp + 0.3 - 0.3) - ref_lowp).abs().max().item() if ref.size else 0.0
        torch_err = np.abs(_as_float64(out_torch_lowp) - ref).max() if ref.size else 0.0
        bound = factor * torch_err + slack + 1e-5
    bad = err > bound
    if bad.any():
        index = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(
            f"{what}: {bad.sum()} of {err.size} elements out of tolerance ({dtype}); worst at {index}: "
            f"got {got[index]!r}, reference {ref[index]!r}, error {err[index]:.3g} > bound "
            f"{np.broadcast_to(bound, err.shape)[index]:.3g}"
        )


def lse_dtype_for(dtype):
    """The LSE's dtype for inputs of `dtype`: float32, or float64 for float64 inputs (torch or numpy)."""
    return {torch.float64: torch.float64, np.dtype(np.float64): np.float64}.get(
        dtype if isinstance(dtype, torch.dtype) else np.dtype(dtype), torch.float32 if isinstance(dtype, torch.dtype)
        else np.float32)


def assert_lse_close(lse, ref_lse, input_dtype=None):
    """LSE: float32 (float64 for float64 inputs: fp64-tight then), finite where the reference is, -inf
    exactly where the reference is -inf. input_dtype (q's dtype), when given, pins the LSE's dtype."""
    assert lse.dtype in (torch.float32, np.float32, torch.float64, np.float64)
    if input_dtype is not None:
        assert lse.dtype == lse_dtype_for(input_dtype), f"LSE of {input_dtype} inputs has dtype {lse.dtype}"
    fp64 = lse.dtype in (torch.float64, np.float64)
    got = _as_float64(lse)
    assert got.shape == ref_lse.shape
    assert not np.isnan(got).any(), "LSE contains NaN"
    masked = np.isneginf(ref_lse)
    np.testing.assert_array_equal(np.isneginf(got), masked, err_msg="LSE is -inf exactly on fully masked rows")
    tol = dict(atol=FP64_ATOL, rtol=FP64_RTOL) if fp64 else dict(atol=LSE_ATOL, rtol=LSE_RTOL)
    np.testing.assert_allclose(got[~masked], ref_lse[~masked], **tol)


def check_attention(result, q, k, v, *, causal=False, scale=None, q_offset=None, window=(-1, -1),
                    layout="bhsd", return_lse=False):
    """All checks of one fusedattn.attention result against the reference and PyTorch's own math."""
    out, lse = result if return_lse else (result, None)
    assert type(out) is type(q)
    assert out.dtype == q.dtype and tuple(out.shape) == tuple(q.shape)
    kwargs = dict(causal=causal, scale=scale, q_offset=q_offset, window=window, layout=layout)
    ref, ref_lse = attention_reference(q, k, v, **kwargs)
    lowp = torch_attention_lowp(q, k, v, **kwargs) if q.dtype in LOW_PRECISION else None
    assert_close_to_reference(out, lowp, ref)

    # Rows that see no key: output exactly 0 (the reference's LSE is -inf there).
    empty_rows = np.isneginf(ref_lse)  # (batch, heads, seqlen_q)
    got = _as_float64(out)
    got_bhsd = got.swapaxes(1, 2) if layout == "bshd" else got
    assert np.all(got_bhsd[empty_rows] == 0.0), "fully masked rows must be exactly 0"
    if return_lse:
        assert tuple(lse.shape) == tuple(ref_lse.shape)
        assert_lse_close(lse, ref_lse, q.dtype)
    return ref, ref_lse


# ---------------------------------------------------------------- differentiable torch attention (all variants)

def torch_attention(q, k, v, *, causal=False, scale=None, q_offset=None, window=(-1, -1), layout="bhsd",
                    attn_mask=None, alibi_slopes=None, softcap=0.0, sinks=None, dropout_p=0.0, dropout_mask=None):
    """(out, lse): DESIGN.md's score pipeline as plain torch math in q's dtype, differentiable in
    q, k, v, a float attn_mask and sinks. Rows that see no key give 0 (and LSE -inf) with zero,
    finite gradients. dropout_mask: bool (batch, heads, Lq, Lk), True = keep (reference.dropout_keep_mask)."""
    if layout == "bshd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    dtype = q.dtype
    batch, num_heads, seqlen_q, head_dim = q.shape
    seqlen_k = k.shape[2]
    k, v = (x.repeat_interleave(num_heads // k.shape[1], dim=1) for x in (k, v))
    scale = head_dim**-0.5 if scale is None else scale
    q_offset = seqlen_k - seqlen_q if q_offset is None else q_offset
    scores = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(dtype).reshape(-1 if alibi_slopes.ndim == 2 else 1, num_heads)[:, :, None, None]
        distance = (torch.arange(seqlen_q)[:, None] + q_offset - torch.arange(seqlen_k)[None, :]).abs().to(dtype)
        scores = scores - slopes * distance
    visible = torch.from_numpy(visible_mask(seqlen_q, seqlen_k, causal=causal, q_offset=q_offset, window=window))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            scores = scores + attn_mask.to(dtype)
    scores = scores.masked_fill(~visible.expand(scores.shape), float("-inf"))
    row_max = scores.detach().amax(-1, keepdim=True)  # softmax is invariant to it: no gradient needed
    if sinks is not None:
        sink = sinks.to(dtype)[None, :, None, None].expand(batch, num_heads, seqlen_q, 1)
        row_max = torch.maximum(row_max, sink.detach())
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    total = weights.sum(-1, keepdim=True)
    if sinks is not None:
        total = total + torch.exp(sink - row_max)
    seen = total > 0
    safe_total = torch.where(seen, total, torch.ones_like(total))
    probs = weights / safe_total
    lse = torch.where(seen, safe_total.log() + row_max, torch.full_like(total, float("-inf")))[..., 0]
    if dropout_p > 0.0:
        keep = torch.as_tensor(np.asarray(dropout_mask, dtype=bool))
        probs = probs * keep.to(dtype) / (1.0 - dropout_p) if dropout_p < 1.0 else probs * 0.0
    out = probs @ v
    return (out.transpose(1, 2) if layout == "bshd" else out), lse


def reference_grads(inputs, dout, dlse=None, **kwargs):
    """Gradients of <out, dout> (+ <lse, dlse>) w.r.t. `inputs` (dict name -> tensor or None) by
    torch autograd of torch_attention in float64; also returns (out, lse). inputs: q, k, v and
    optionally attn_mask, sinks (gradients only for float tensors that require grad)."""
    wrt = {}
    args = {}
    for name, x in inputs.items():
        if x is None:
            continue
        if x.dtype == torch.bool or name == "alibi_slopes":
            args[name] = x
            continue
        args[name] = x.detach().to(torch.float64).requires_grad_(x.requires_grad or name in "qkv")
        if args[name].requires_grad:
            wrt[name] = args[name]
    return _grads_of(torch_attention, args, wrt, dout, dlse, torch.float64, **kwargs)


def lowp_grads(inputs, dout, dlse=None, **kwargs):
    """Like reference_grads, but torch's own math in the inputs' (low-precision) dtype."""
    args, wrt = {}, {}
    for name, x in inputs.items():
        if x is None:
            continue
        args[name] = x.detach().requires_grad_(x.dtype != torch.bool and name != "alibi_slopes"
                                               and (x.requires_grad or name in "qkv"))
        if args[name].requires_grad:
            wrt[name] = args[name]
    return _grads_of(torch_attention, args, wrt, dout, dlse, None, **kwargs)


def _grads_of(fn, args, wrt, dout, dlse, dtype, **kwargs):
    out, lse = fn(args.pop("q"), args.pop("k"), args.pop("v"), **args, **kwargs)
    dout = dout.to(out.dtype)
    loss = (out * dout).sum()
    if dlse is not None:
        finite = torch.isfinite(lse)
        loss = loss + (torch.where(finite, lse, 0.0) * dlse.to(lse.dtype)).sum()
    grads = torch.autograd.grad(loss, list(wrt.values()))
    return dict(zip(wrt, grads)), out.detach(), lse.detach()


def _np64(x):
    return x.detach().to(torch.float64).numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)


def assert_grads_close(got, ref, lowp=None):
    """Gradients (dicts name -> tensor) vs the fp64 reference gradients. fp16 / bf16: DESIGN.md's rule
    with 3x torch's own low-precision gradient error (lowp). fp32: relative to the gradient's scale
    (a gradient sums Lq or Lk terms, so its rounding grows with the largest term, not the element);
    fp64 likewise, 1e-10 of the scale (its LSE is float64)."""
    for name, expected in ref.items():
        value = got[name]
        assert value is not None, f"no gradient for {name}"
        assert tuple(value.shape) == tuple(expected.shape), f"d{name} has shape {tuple(value.shape)}"
        if value.dtype in LOW_PRECISION or (lowp is not None and name in lowp):
            assert_close_to_reference(value, lowp[name], _np64(expected), factor=3.0, what=f"d{name}")
            continue
        got64, ref64 = _np64(value), _np64(expected)
        assert not np.isnan(got64).any(), f"d{name} contains NaN"
        rtol, atol = (FP32_RTOL, FP32_ATOL) if value.dtype == torch.float32 else (1e-10, FP64_ATOL)
        bound = rtol * (np.abs(ref64).max(initial=0.0) + np.abs(ref64)) + atol
        np.testing.assert_array_less(np.abs(got64 - ref64), bound + 1e-300, err_msg=f"d{name} out of tolerance")
