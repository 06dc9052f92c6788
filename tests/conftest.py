"""Shared fixtures and helpers of the fusedattn test suite.

- every test gets freshly seeded torch / numpy RNGs (``rng`` is a numpy Generator);
- ``make_qkv`` draws random q, k, v in either layout, optionally non-contiguous;
- ``assert_close_to_reference`` is DESIGN.md's tolerance rule: fp32 / fp64 compare directly with
  the fp64 reference; fp16 / bf16 may err at most 2x as much as PyTorch's own math in that dtype
  (``torch_attention_lowp``) plus a rounding-sized slack (flash-attn's ``ref + 0.3 - 0.3`` trick);
- ``check_attention`` runs the reference and all the checks on one result, including the
  fully-masked-row rule (output exactly 0, LSE -inf) and "no NaN anywhere";
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


def assert_close_to_reference(out, out_torch_lowp, ref):
    """DESIGN.md's rule. out: kernel result; ref: the fp64 reference (numpy); out_torch_lowp: torch's
    math in out's dtype. fp32 / fp64 compare directly when out_torch_lowp is None; with it (always for
    fp16 / bf16) the kernel may err up to 2x as much as torch did, plus a rounding-sized slack."""
    dtype = out.dtype
    got = _as_float64(out)
    assert got.shape == ref.shape
    assert not np.isnan(got).any(), "output contains NaN"
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
        bound = 2 * torch_err + slack + 1e-5
    bad = err > bound
    if bad.any():
        index = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(
            f"{bad.sum()} of {err.size} elements out of tolerance ({dtype}); worst at {index}: "
            f"got {got[index]!r}, reference {ref[index]!r}, error {err[index]:.3g} > bound "
            f"{np.broadcast_to(bound, err.shape)[index]:.3g}"
        )


def assert_lse_close(lse, ref_lse):
    """LSE: fp32, finite where the reference is, -inf exactly where the reference is -inf."""
    assert lse.dtype in (torch.float32, np.float32)
    got = _as_float64(lse)
    assert got.shape == ref_lse.shape
    assert not np.isnan(got).any(), "LSE contains NaN"
    masked = np.isneginf(ref_lse)
    np.testing.assert_array_equal(np.isneginf(got), masked, err_msg="LSE is -inf exactly on fully masked rows")
    np.testing.assert_allclose(got[~masked], ref_lse[~masked], atol=LSE_ATOL, rtol=LSE_RTOL)


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
        assert_lse_close(lse, ref_lse)
    return ref, ref_lse
