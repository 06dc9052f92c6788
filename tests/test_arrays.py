"""Array kinds: numpy in -> numpy out (same dtype), torch in -> torch out; numpy in both layouts,
with sliced / negative / broadcast strides; the three APIs on numpy; other DLPack producers.
"""

import numpy as np
import pytest
import torch

import fusedattn
from conftest import assert_close_to_reference, assert_lse_close, lse_dtype_for, torch_attention_lowp
from fusedattn.reference import attention_reference

NUMPY_DTYPES = [np.float32, np.float64, np.float16]


def _randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def _check_numpy(out, q, k, v, **kwargs):
    assert isinstance(out, np.ndarray) and out.dtype == q.dtype and out.shape == q.shape
    ref, ref_lse = attention_reference(q, k, v, **kwargs)
    lowp = None
    if q.dtype == np.float16:
        lowp = torch_attention_lowp(*(torch.from_numpy(np.ascontiguousarray(x)) for x in (q, k, v)), **kwargs).numpy()
    assert_close_to_reference(out, lowp, ref)
    return ref_lse


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("causal", [False, True])
def test_numpy_in_numpy_out(rng, dtype, layout, causal):
    shape_q, shape_kv = ((2, 4, 23, 40), (2, 2, 31, 40)) if layout == "bhsd" else ((2, 23, 4, 40), (2, 31, 2, 40))
    q, k, v = _randn(rng, shape_q, dtype), _randn(rng, shape_kv, dtype), _randn(rng, shape_kv, dtype)
    out, lse = fusedattn.attention(q, k, v, causal=causal, layout=layout, return_lse=True)
    ref_lse = _check_numpy(out, q, k, v, causal=causal, layout=layout)
    assert isinstance(lse, np.ndarray) and lse.shape == (2, 4, 23)
    assert_lse_close(lse, ref_lse, dtype)


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_numpy_non_contiguous(rng, dtype):
    """Sliced, reversed (negative stride) and broadcast (stride 0) numpy inputs."""
    big = _randn(rng, (3, 5, 40, 24), dtype)
    q = big[1:, 1:4, 5:25]  # sliced along batch, heads, seq
    k = _randn(rng, (2, 30, 3, 24), dtype).swapaxes(1, 2)[:, :, ::-1]  # seq stride negative
    v = np.broadcast_to(_randn(rng, (2, 1, 30, 24), dtype), (2, 3, 30, 24))  # head stride 0, read-only
    out = fusedattn.attention(q, k, v, causal=True)
    _check_numpy(out, q, k, v, causal=True)


def test_numpy_sdpa_and_flash_attn_func(rng):
    q, k, v = (_randn(rng, (2, 3, 11, 16), np.float32) for _ in range(3))
    out = fusedattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    _check_numpy(out, q, k, v, causal=True, q_offset=0)
    q, k, v = (_randn(rng, (2, 11, 3, 16), np.float64) for _ in range(3))
    out = fusedattn.flash_attn_func(q, k, v, causal=True, window_size=(3, 0))
    _check_numpy(out, q, k, v, causal=True, window=(3, 0), layout="bshd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_torch_in_torch_out(dtype):
    q, k, v = (torch.randn(1, 2, 9, 16, dtype=dtype) for _ in range(3))
    out, lse = fusedattn.attention(q, k, v, return_lse=True)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.device == q.device
    assert isinstance(lse, torch.Tensor) and lse.dtype == lse_dtype_for(dtype)


def test_numpy_and_torch_agree(rng):
    q, k, v = (_randn(rng, (2, 4, 17, 32), np.float32) for _ in range(3))
    from_numpy = fusedattn.attention(q, k, v, causal=True)
    from_torch = fusedattn.attention(*(torch.from_numpy(x) for x in (q, k, v)), causal=True)
    np.testing.assert_array_equal(from_numpy, from_torch.numpy())


class _DLPackOnly:
    """An array that only speaks DLPack (as cupy's host arrays or JAX do)."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


def test_other_dlpack_producers_give_numpy(rng):
    q, k, v = (_randn(rng, (1, 2, 13, 8), np.float32) for _ in range(3))
    out = fusedattn.attention(_DLPackOnly(q), _DLPackOnly(k), _DLPackOnly(v), causal=True)
    _check_numpy(out, q, k, v, causal=True)


def test_dlpack_index_arrays(rng):
    """cu_seqlens and cache_seqlens behind a generic __dlpack__ are read like numpy arrays (cu_seqlens
    with numpy q was a TypeError, 'got object')."""
    q = _randn(rng, (10, 2, 8), np.float32)
    cu = np.array([0, 4, 10], dtype=np.int32)
    for reference in (q, torch.from_numpy(q)):
        out = fusedattn.attention_varlen(reference, reference, reference, _DLPackOnly(cu), _DLPackOnly(cu), 6, 6)
        expected = fusedattn.attention_varlen(reference, reference, reference, cu, cu, 6, 6)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    cache = _randn(rng, (2, 8, 2, 8), np.float32)
    query = _randn(rng, (2, 1, 2, 8), np.float32)
    seqlens = np.array([3, 5], dtype=np.int32)
    out = fusedattn.attention_with_kvcache(query, cache, cache, cache_seqlens=_DLPackOnly(seqlens))
    np.testing.assert_array_equal(out, fusedattn.attention_with_kvcache(query, cache, cache, cache_seqlens=seqlens))


def test_arrays_that_cannot_be_read_name_themselves(rng):
    """Big-endian numpy arrays (DLPack cannot carry them) and a bf16 array behind a generic
    __dlpack__ (numpy has no bfloat16) are a TypeError naming the argument (they were numpy's
    BufferError and a RuntimeError)."""
    q = rng.standard_normal((1, 2, 5, 8)).astype(np.float32)
    with pytest.raises(TypeError, match="q cannot be read"):
        fusedattn.attention(q.astype(">f4"), q, q)
    with pytest.raises(TypeError, match="attn_mask cannot be read"):
        fusedattn.attention(q, q, q, attn_mask=np.zeros((5, 5), ">f4"))
    bf16 = _DLPackOnly(torch.from_numpy(q).bfloat16())
    with pytest.raises(TypeError, match="k cannot be read"):
        fusedattn.attention(q, bf16, q)


def test_numpy_inputs_are_not_modified(rng):
    q, k, v = (_randn(rng, (1, 2, 13, 8), np.float32) for _ in range(3))
    before = [x.copy() for x in (q, k, v)]
    fusedattn.attention(q, k, v, causal=True)
    for x, x0 in zip((q, k, v), before):
        np.testing.assert_array_equal(x, x0)
