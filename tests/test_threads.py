"""Threads: shapes whose blocking and key splits the thread count leaves alone give bitwise the
same results at any thread count (each q-block is computed by one thread in a fixed order); other
shapes agree to rounding (docs/api.md, Determinism); set_num_threads validates its argument, and
concurrent calls from several Python threads (the GIL is released in the kernel) all give correct
results.
"""

import concurrent.futures
import subprocess
import sys

import numpy as np
import pytest
import torch

import fusedattn
from conftest import ISAS, check_attention, force_isa, make_qkv


def _run_with_threads(num_threads, q, k, v, **kwargs):
    fusedattn.set_num_threads(num_threads)
    return fusedattn.attention(q, k, v, return_lse=True, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("num_threads", [2, 3, 8])
@pytest.mark.parametrize("causal", [False, True])
def test_thread_count_does_not_change_results(dtype, num_threads, causal):
    q, k, v = make_qkv(2, 4, 2, 300, 260, 64, dtype, k_scale=2.0)
    out_1, lse_1 = _run_with_threads(1, q, k, v, causal=causal)
    out_n, lse_n = _run_with_threads(num_threads, q, k, v, causal=causal)
    assert torch.equal(out_1, out_n)
    assert torch.equal(lse_1, lse_n)


@pytest.mark.parametrize("num_threads", [2, 3, 7])
@pytest.mark.parametrize("shape", [(4, 129, 300, 59), (1, 64, 4096, 64), (8, 1, 2048, 128)], ids=str)
def test_thread_counts_agree_to_rounding(num_threads, shape):
    """Where the thread count changes the plan (a tail of rows taken by the decode kernel, or the
    number of key splits), results differ only in rounding; the same count is bitwise repeatable."""
    heads, seqlen_q, seqlen_k, head_dim = shape
    q, k, v = make_qkv(1, heads, heads, seqlen_q, seqlen_k, head_dim, k_scale=2.0)
    out_1, lse_1 = _run_with_threads(1, q, k, v, causal=True)
    out_n, lse_n = _run_with_threads(num_threads, q, k, v, causal=True)
    torch.testing.assert_close(out_n, out_1, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(lse_n, lse_1, rtol=2e-6, atol=2e-6)
    again, lse_again = _run_with_threads(num_threads, q, k, v, causal=True)
    assert torch.equal(again, out_n) and torch.equal(lse_again, lse_n)


@pytest.mark.parametrize("num_threads", [2, 8])
def test_thread_count_does_not_change_results_with_window(num_threads):
    """Also with a sliding window, where each q-block starts at its own first visible key."""
    q, k, v = make_qkv(2, 4, 2, 300, 260, 64, k_scale=2.0)
    out_1, lse_1 = _run_with_threads(1, q, k, v, causal=True, window=(100, -1))
    out_n, lse_n = _run_with_threads(num_threads, q, k, v, causal=True, window=(100, -1))
    assert torch.equal(out_1, out_n), f"max difference {(out_1 - out_n).abs().max().item():.3g}"
    assert torch.equal(lse_1, lse_n)


@pytest.mark.parametrize("isa_name", ISAS)
def test_thread_count_does_not_change_results_per_isa(isa_name):
    q, k, v = make_qkv(1, 2, 2, 129, 129, 59)
    with force_isa(isa_name):
        fusedattn.set_num_threads(1)
        out_1 = fusedattn.attention(q, k, v, causal=True)
        fusedattn.set_num_threads(None)  # the default: torch's thread count
        out_default = fusedattn.attention(q, k, v, causal=True)
    assert torch.equal(out_1, out_default)


def test_default_follows_torch():
    fusedattn.set_num_threads(None)
    assert fusedattn.get_num_threads() == torch.get_num_threads()
    fusedattn.set_num_threads(3)
    assert fusedattn.get_num_threads() == 3
    assert fusedattn.info(verbose=False)["num_threads"] == 3


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_set_num_threads_rejects_bad_values(bad):
    fusedattn.set_num_threads(2)
    with pytest.raises(ValueError, match="num_threads"):
        fusedattn.set_num_threads(bad)
    assert fusedattn.get_num_threads() == 2  # unchanged


def test_more_threads_than_tasks():
    q, k, v = make_qkv(1, 1, 1, 3, 5, 8)
    fusedattn.set_num_threads(16)
    out = fusedattn.attention(q, k, v, causal=True)
    check_attention(out, q, k, v, causal=True)


def test_concurrent_calls_from_python_threads():
    """4 Python threads x 20 calls, each with its own inputs and options, all correct."""
    generator = np.random.default_rng(7)
    jobs = []
    for index in range(80):
        seqlen_q, seqlen_k = (int(n) for n in generator.integers(1, 80, size=2))
        head_dim = int(generator.choice([8, 40, 59, 64]))
        dtype = [torch.float32, torch.float64, torch.bfloat16][index % 3]
        kwargs = dict(causal=bool(index % 2), window=[(-1, -1), (6, -1), (3, 3)][index % 3])
        jobs.append((make_qkv(1, 4, 2, seqlen_q, seqlen_k, head_dim, dtype), kwargs))

    def run(job):
        (q, k, v), kwargs = job
        return fusedattn.attention(q, k, v, return_lse=True, **kwargs)

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, jobs))
    for ((q, k, v), kwargs), result in zip(jobs, results):
        check_attention(result, q, k, v, return_lse=True, **kwargs)


def test_concurrent_calls_are_deterministic():
    """The same call made concurrently from 4 threads gives bitwise the same result as alone."""
    q, k, v = make_qkv(2, 4, 4, 129, 129, 64)
    expected = fusedattn.attention(q, k, v, causal=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: fusedattn.attention(q, k, v, causal=True), range(16)))
    for out in results:
        assert torch.equal(out, expected)


def test_set_num_threads_keeps_torch_openmp():
    """With torch loaded, a set thread count still runs on torch's OpenMP threads."""
    script = ("import torch, fusedattn; fusedattn.set_num_threads(2); "
              "fusedattn.attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)); "
              "print(fusedattn._runtime._attached[0])")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"


def test_own_pool_without_torch():
    """numpy arrays with no torch in the process run on fusedattn's own pool, which small calls
    skip (serial_work_macs): on 1 and 2 threads, small calls or not, decode matches a float64
    reference."""
    script = """
import sys
import numpy as np
import fusedattn
assert "torch" not in sys.modules
rng = np.random.default_rng(0)
for length in (16, 64, 3000):
    q = rng.standard_normal((2, 1, 8, 64), dtype=np.float32)
    k, v = (rng.standard_normal((2, length, 2, 64), dtype=np.float32) for _ in range(2))
    k64, v64 = (np.repeat(x.astype(np.float64), 4, axis=2) for x in (k, v))  # (2, L, 8, 64)
    scores = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k64) / 8.0
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    expected = np.einsum("bhqk,bkhd->bqhd", p / p.sum(axis=-1, keepdims=True), v64)
    for threads in (1, 2):
        fusedattn.set_num_threads(threads)
        out = np.asarray(fusedattn.attention_with_kvcache(q, k, v, cache_seqlens=length))
        assert np.abs(out - expected).max() < 1e-5, (length, threads, np.abs(out - expected).max())
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
