"""Inputs that used to crash, hang, or give silent wrong answers (fuzzing reviews), each now a
correct result or a ValueError / TypeError naming the argument:

- index arrays changed by another thread while a call runs (the extension copies them);
- torch tensors with the lazy negative bit; sparse tensors; meta tensors among CPU ones;
- a KV-cache append whose v_cache cannot be written (k_cache must stay unchanged too);
- positions and windows near 2**63 (the kernels' int64 sums wrapped around);
- merges of integer, complex or misshapen arrays;
- a numpy backward given read-only out / lse (inputs, only read);
- forked children after the OpenMP hand-over, and numpy calls while torch is being imported;
- torch integration: double backward, autocast, varlen under fake tensors, torch.jit.trace, nn
  module configs, the bench CLI's late tracebacks.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import fusedattn
from fusedattn.nn import Attention


def _run_script(script: str, timeout: float = 60.0) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"exit code {result.returncode}: {result.stderr[-2000:]}"
    return result.stdout


def test_index_arrays_changed_during_a_call():
    """Another process rewrites a block_table (in shared memory) while decode calls run: each call
    either rejects an entry or reads the pages it checked. The kernels used to read the caller's
    table again after checking it, with the GIL released, and read outside k_cache (SIGSEGV
    within a second or two here)."""
    out = _run_script("""
        import mmap, os, time
        import numpy as np
        buffer = mmap.mmap(-1, 256 * 4)  # shared with the child forked below
        table = np.frombuffer(buffer, dtype=np.int32).reshape(1, 256)
        table[0] = np.arange(256)
        parent = os.getpid()
        if os.fork() == 0:  # rewrites pages 1..255 until the parent ends
            pages = np.arange(1, 256, dtype=np.int32)
            while os.getppid() == parent:
                table[0, 1:] = 10**9
                table[0, 1:] = pages
            os._exit(0)
        import fusedattn
        fusedattn.set_num_threads(1)
        rng = np.random.default_rng(0)
        q = rng.standard_normal((1, 1, 8, 64), dtype=np.float32)
        k_cache = rng.standard_normal((256, 16, 8, 64), dtype=np.float32)
        seqlens = np.array([256 * 16], np.int32)
        expected = fusedattn.attention_with_kvcache(q, k_cache, k_cache, cache_seqlens=seqlens,
                                                    block_table=np.arange(256, dtype=np.int32)[None])
        calls = rejected = 0
        start = time.time()
        while time.time() - start < 3:
            try:
                out = fusedattn.attention_with_kvcache(q, k_cache, k_cache, cache_seqlens=seqlens, block_table=table)
                assert np.array_equal(out, expected)
                calls += 1
            except ValueError as error:
                assert "block_table[0, " in str(error)
                rejected += 1
        print(calls, rejected)
    """)
    calls, rejected = map(int, out.split())
    assert calls > 0 and rejected > 0


@pytest.mark.parametrize("which", ["q", "v", "attn_mask", "sinks"])
def test_negative_bit_tensors_are_rejected(which):
    """torch's lazily negated views (x.conj().imag, torch._neg_view) hold -x in memory: read as
    they are, they gave wrong results silently."""
    args = dict(q=torch.randn(1, 2, 4, 8), k=torch.randn(1, 2, 6, 8), v=torch.randn(1, 2, 6, 8),
                attn_mask=torch.randn(1, 2, 4, 6), sinks=torch.randn(2, dtype=torch.float64))
    args[which] = torch._neg_view(args[which])
    assert args[which].is_neg()
    with pytest.raises(TypeError, match=f"{which} is a lazily negated view.*resolve_neg"):
        fusedattn.attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_sparse_tensors_name_themselves():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(TypeError, match="k's data cannot be read.*dense"):
        fusedattn.attention(q, q.to_sparse(), q)


@pytest.mark.parametrize("case", ["mask", "k grad", "dout", "varlen", "new k", "rotary", "merge", "sinks",
                                  "cache_seqlens"])
def test_meta_tensors_among_cpu_ones(case):
    """A meta tensor among CPU ones went to the torch ops' fake kernels, whose outputs are
    uninitialised memory (errors of 1e20), or into an append that wrote nothing."""
    meta = dict(device="meta")
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    cache = torch.zeros(1, 8, 2, 8)
    qb = q.transpose(1, 2)
    calls = {
        "mask": lambda: fusedattn.attention(torch.nn.Parameter(q), k, v, attn_mask=torch.zeros(1, 1, 4, 6, **meta)),
        "k grad": lambda: fusedattn.attention(q.requires_grad_(), torch.randn(1, 2, 6, 8, **meta), v),
        "dout": lambda: fusedattn.attention_backward(torch.ones(1, 2, 4, 8, **meta), q, k, v,
                                                     *fusedattn.attention(q, k, v, return_lse=True)),
        "varlen": lambda: fusedattn.attention_varlen(q[0].requires_grad_(), k[0].to("meta"), v[0], [0, 2], [0, 6],
                                                     2, 6),
        "new k": lambda: fusedattn.attention_with_kvcache(qb, cache, cache.clone(), torch.randn(1, 1, 2, 8, **meta),
                                                          torch.randn(1, 1, 2, 8), cache_seqlens=3),
        "rotary": lambda: fusedattn.attention_with_kvcache(qb, cache, cache, cache_seqlens=3,
                                                           rotary_cos=torch.ones(16, 2, **meta),
                                                           rotary_sin=torch.zeros(16, 2, **meta)),
        "merge": lambda: fusedattn.merge_attention_states(q, torch.zeros(1, 2, 4, **meta), q, torch.zeros(1, 2, 4)),
        "sinks": lambda: fusedattn.attention(q, k, v, sinks=torch.zeros(2, **meta)),
        "cache_seqlens": lambda: fusedattn.attention_with_kvcache(qb, cache, cache,
                                                                  cache_seqlens=torch.tensor([3], **meta)),
    }
    names = {"mask": "attn_mask", "k grad": "k", "varlen": "k", "new k": "k", "rotary": "rotary_cos",
             "merge": "lses", "cache_seqlens": "cache_seqlens"}
    with pytest.raises(ValueError, match=rf"{names.get(case, case)}.* is on meta"):
        calls[case]()
    assert not cache.any()


@pytest.mark.parametrize("kind", ["read-only numpy", "requires grad", "inference tensor"])
def test_append_into_an_unwritable_v_cache_leaves_k_cache_unchanged(kind):
    """The docs promise a rejected call leaves the cache as it was; k_cache was written before
    v_cache's write failed (numpy's unnamed 'assignment destination is read-only')."""
    q, k, v = torch.randn(2, 1, 4, 8), torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
    k_cache, v_cache = torch.zeros(2, 8, 2, 8), torch.zeros(2, 8, 2, 8)
    if kind == "read-only numpy":
        q, k, v, k_cache, v_cache = (x.numpy() for x in (q, k, v, k_cache, v_cache))
        v_cache.flags.writeable = False
        message = "v_cache is read-only"
    elif kind == "requires grad":
        v_cache.requires_grad_()
        message = "v_cache requires grad"
    else:
        with torch.inference_mode():
            v_cache = torch.zeros(2, 8, 2, 8)
        message = "v_cache is an inference tensor"
    with pytest.raises(ValueError, match=message):
        fusedattn.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=3)
    assert not k_cache.any()


@pytest.mark.parametrize("kwargs", [dict(window=(-1, 2**63 - 1)), dict(window=(2**61, -1)),
                                    dict(causal=True, q_offset=2**63 - 1), dict(q_offset=-2**61)], ids=str)
def test_positions_that_overflowed_are_rejected(kwargs):
    """Window sizes and q_offset near 2**63 wrapped around in the kernels' int64 sums (every key
    hidden: output 0); they are now bounded by 2**61, far beyond any sequence."""
    q = np.random.default_rng(0).standard_normal((1, 2, 4, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="window|q_offset"):
        fusedattn.attention(q, q, q, **kwargs)


def test_large_windows_and_offsets_still_work():
    """The largest accepted values together (2**62 - 1 each, accepted at first, still wrapped)."""
    largest = 2**61 - 1
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, n, 8)).astype(np.float64) for n in (4, 6, 6))
    plain = fusedattn.attention(q, k, v)
    for kwargs in (dict(window=(largest, largest)), dict(causal=True, q_offset=largest),
                   dict(q_offset=largest, window=(-1, largest)), dict(q_offset=-largest, window=(largest, -1))):
        np.testing.assert_allclose(fusedattn.attention(q, k, v, **kwargs), plain, rtol=1e-12, err_msg=str(kwargs))
    qt, kt, vt = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    fusedattn.attention(qt, kt, vt).square().sum().backward()
    expected = [x.grad.clone() for x in (qt, kt, vt)]
    for x in (qt, kt, vt):
        x.grad = None
    fusedattn.attention(qt, kt, vt, q_offset=-largest, window=(largest, -1)).square().sum().backward()
    for x, want in zip((qt, kt, vt), expected):
        torch.testing.assert_close(x.grad, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case, error, message", [
    ("int outs", TypeError, r"outs\[0\] must be floating point"),
    ("int lses", TypeError, r"lses\[0\] must be floating point"),
    ("complex lses", TypeError, r"lses\[0\] must be floating point"),
    ("1-D outs", ValueError, r"outs\[0\] must be 4-D"),
])
def test_merge_rejects_what_it_cannot_merge(case, error, message):
    rng = np.random.default_rng(0)
    out, lse = rng.standard_normal((1, 2, 3, 4)), rng.standard_normal((1, 2, 3))
    outs, lses = {
        "int outs": ([out.astype(np.int64)] * 2, [lse] * 2),
        "int lses": ([out] * 2, [lse.astype(np.int32)] * 2),
        "complex lses": ([out] * 2, [lse.astype(np.complex64)] * 2),
        "1-D outs": ([np.ones(3)] * 2, [np.zeros(())] * 2),
    }[case]
    with pytest.raises(error, match=message):
        fusedattn.merge_attention_states_list(outs, lses)


def test_numpy_backward_reads_read_only_out_and_lse():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, n, 8)) for n in (4, 6, 6))
    out, lse = fusedattn.attention(q, k, v, return_lse=True)
    dout = rng.standard_normal(out.shape)
    expected = fusedattn.attention_backward(dout, q, k, v, out, lse)
    out.flags.writeable = lse.flags.writeable = False
    for got, want in zip(fusedattn.attention_backward(dout, q, k, v, out, lse), expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("how", ["dataloader", "fork"])
def test_forked_children_after_the_openmp_hand_over(how):
    """A child forked after fusedattn ran on torch's OpenMP threads with a set thread count hung
    in libgomp's barrier (DataLoader workers, multiprocessing's fork); it now runs on a fresh
    private pool."""
    script = """
        import os, sys
        import torch, fusedattn
        fusedattn.set_num_threads(2)
        x = torch.randn(1, 4, 128, 64)
        expected = fusedattn.attention(x, x, x)
        if sys.argv[1] == "dataloader":
            from torch.utils.data import DataLoader, Dataset
            class Items(Dataset):
                def __len__(self):
                    return 2
                def __getitem__(self, i):
                    return fusedattn.attention(x, x, x)
            for item in DataLoader(Items(), batch_size=None, num_workers=1, timeout=30):
                assert torch.equal(item, expected)
        else:
            pid = os.fork()
            if pid == 0:
                os._exit(0 if torch.equal(fusedattn.attention(x, x, x), expected) else 1)
            assert os.waitpid(pid, 0)[1] == 0
        print("ok")
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script), how], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_numpy_calls_while_torch_is_being_imported():
    """numpy calls on one thread while another imports torch: "torch" is in sys.modules from the
    start of its import, and the calls read torch.Tensor from the half-made module."""
    out = _run_script("""
        import sys, threading
        import numpy as np
        import fusedattn
        assert "torch" not in sys.modules
        q = np.random.default_rng(0).standard_normal((1, 2, 16, 32)).astype(np.float32)
        expected = fusedattn.attention(q, q, q)
        errors, stop = [], False
        def calls():
            while not stop:
                try:
                    assert np.array_equal(fusedattn.attention(q, q, q), expected)
                except Exception as error:
                    errors.append(repr(error))
        thread = threading.Thread(target=calls)
        thread.start()
        import torch
        stop = True
        thread.join()
        print(len(errors), errors[:1])
    """, timeout=120)
    assert out.startswith("0 "), out


# ---------------------------------------------------------------- torch integration


@pytest.mark.parametrize("path", ["eager", "op", "varlen"])
def test_double_backward_raises(path):
    """create_graph=True then a second gradient: the first gradient came back as a constant and
    the second-order terms were dropped silently."""
    q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    query = torch.nn.Parameter(q.detach().clone()) if path == "op" else q
    if path == "varlen":
        out = fusedattn.attention_varlen(query[0], k[0], v[0], [0, 2], [0, 2], 2, 2)
    else:
        out = fusedattn.attention(query, k, v)
    with pytest.raises(NotImplementedError, match="double backward"):
        dq, = torch.autograd.grad(out.square().sum(), query, create_graph=True)
        torch.autograd.grad(dq.square().sum(), query)


def test_autocast_casts_like_torch_sdpa():
    """Inside torch.autocast the inputs are cast as SDPA's are (q and k from RoPE in fp32 beside a
    bf16 v were a TypeError; fp32 inputs gave fp32)."""
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8)
    v = torch.randn(2, 4, 7, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        got = fusedattn.scaled_dot_product_attention(q, k, v)
        full = fusedattn.attention(q, k, v.float())
    assert got.dtype == expected.dtype == full.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    query = q.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fusedattn.attention(query, k, v).float().sum().backward()
    assert query.grad.dtype == torch.float32 and torch.isfinite(query.grad).all()


def test_varlen_under_fake_tensors_and_make_fx():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def varlen(q, k, v, cu_q, cu_k):
        return fusedattn.attention_varlen(q, k, v, cu_q, cu_k, 8, 9)

    shapes = ((8, 4, 8), (9, 2, 8), (9, 2, 8))
    with FakeTensorMode():
        out = varlen(*(torch.randn(s) for s in shapes), torch.tensor([0, 8], dtype=torch.int32),
                     torch.tensor([0, 9], dtype=torch.int32))
        assert out.shape == (8, 4, 8)
    inputs = (*(torch.randn(s) for s in shapes), torch.tensor([0, 8], dtype=torch.int32),
              torch.tensor([0, 9], dtype=torch.int32))
    traced = make_fx(varlen, tracing_mode="fake")(*inputs)
    torch.testing.assert_close(traced(*inputs), varlen(*inputs), rtol=0, atol=0)


def test_jit_trace_records_the_kernel():
    """torch.jit.trace did not see the direct kernel call: the traced function returned its
    output unfilled."""
    def causal(q, k, v):
        return fusedattn.attention(q, k, v, causal=True)

    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    traced = torch.jit.trace(causal, (q, k, v), check_trace=False)
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    torch.testing.assert_close(traced(q, k, v), causal(q, k, v), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden_size=64, num_heads=4, num_kv_heads=0), "num_kv_heads must be >= 1"),
    (dict(hidden_size=64, num_heads=0), "num_heads must be >= 1"),
    (dict(hidden_size=8, num_heads=16), r"head_dim must be >= 1, got 0 \(hidden_size 8 // num_heads 16\)"),
    (dict(hidden_size=64, num_heads=4, head_dim=0, rope_base=None), "head_dim must be >= 1, got 0"),
])
def test_attention_module_configs(kwargs, message):
    """They were ZeroDivisionErrors."""
    with pytest.raises(ValueError, match=message):
        Attention(**kwargs)


@pytest.mark.parametrize("args, env, message", [
    (["--shapes", "block:1x4x30x4"], {}, "DMODEL must be H times an even head_dim"),
    (["--out", "FILE"], {}, "cannot be a results folder"),
    ([], {"FUSEDATTN_CPU_ISA": "bogus"}, "FUSEDATTN_CPU_ISA='bogus' is not available"),
])
def test_bench_cli_errors_are_messages(tmp_path, args, env, message):
    """A bad block shape, an --out that is a file and a bad FUSEDATTN_CPU_ISA gave tracebacks,
    the last two only after the whole benchmark had run."""
    existing = tmp_path / "file"
    existing.write_text("")
    args = [str(existing) if a == "FILE" else a for a in args]
    command = [sys.executable, "-m", "fusedattn", "bench", "--quick", "--suite", "fwd", "--shapes", "1x1x16x8",
               "--out", str(tmp_path / "out"), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("fn", ["attention_varlen", "flash_attn_varlen_func"])
def test_varlen_alibi_slopes_requiring_grad_raise(fn):
    """As attention and flash_attn_func do (docs/api.md); the varlen functions left the slopes'
    gradient None without a word."""
    q, k, v = (torch.randn(9, 2, 8, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="alibi_slopes have no gradient"):
        getattr(fusedattn, fn)(q, k, v, cu, cu, 5, 5, alibi_slopes=torch.rand(2, requires_grad=True))
    with torch.no_grad():
        getattr(fusedattn, fn)(q, k, v, cu, cu, 5, 5, alibi_slopes=torch.rand(2, requires_grad=True))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("seqlen_k", [1000, 4096])
def test_split_kv_rows_hidden_by_a_finite_mask(threads, seqlen_k):
    """A decode row whose keys a finfo.min mask hides (transformers' additive padding masks) sees
    them all equally, as torch's math does (out = the mean of v). Its key splits' LSEs, m + log l
    in fp32, all rounded to m, and the merge weighed splits of unequal key counts equally."""
    fusedattn.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 64, generator=generator)
    k, v = (torch.randn(1, 1, seqlen_k, 64, generator=generator) for _ in range(2))
    v[:, :, : seqlen_k // 3] += 3.0  # so that splits differ
    expected = v.double().mean(dim=2, keepdim=True)
    mask = torch.full((1, 1, 1, seqlen_k), torch.finfo(torch.float32).min)
    out = fusedattn.attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_forked_child_of_a_parent_that_never_called_fusedattn():
    """The parent set a thread count and ran torch ops, but no fusedattn call, before the fork: the
    child's first call attached to the parent's libgomp and hung (the atfork handler had nothing
    to reset yet)."""
    script = """
        import torch, fusedattn
        from torch.utils.data import DataLoader, Dataset
        torch.set_num_threads(2)
        fusedattn.set_num_threads(2)
        x = torch.randn(1, 4, 128, 64)
        for _ in range(3):
            x @ x.transpose(-1, -2)
        class Items(Dataset):
            def __len__(self):
                return 2
            def __getitem__(self, i):
                return fusedattn.attention(x, x, x)
        for item in DataLoader(Items(), batch_size=None, num_workers=1, timeout=30):
            assert item.shape == x.shape
        print("ok")
    """
    assert _run_script(script, timeout=120).strip() == "ok"


def test_create_graph_without_a_second_backward_through_attention():
    """First-order gradients with create_graph=True, then a penalty on a gradient whose graph does
    not pass through attention's backward: works as with torch's SDPA (the eager path raised at
    once; only a real double backward raises)."""
    torch.manual_seed(0)
    w_in, w_out = torch.randn(8, 8, requires_grad=True), torch.randn(8, 8, requires_grad=True)
    x = torch.randn(1, 2, 5, 8)
    grads = []
    for attend in (fusedattn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention):
        h = x @ w_in
        loss = (attend(h, h, h) @ w_out).square().sum()
        g_in, g_out = torch.autograd.grad(loss, (w_in, w_out), create_graph=True)
        grads.append((g_in.detach(), *torch.autograd.grad(g_out.square().sum(), (w_in, w_out))))
    for got, want in zip(*grads):  # fp32 rounding, relative to each gradient's scale (elements near 0 too)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_varlen_max_seqlen_checked_for_parameters():
    """nn.Parameter inputs (a tensor subclass) skipped the host-side check of max_seqlen."""
    q = torch.nn.Parameter(torch.randn(9, 2, 8))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    with pytest.raises(TypeError, match="max_seqlen_k must be an int"):
        fusedattn.attention_varlen(q, q, q, cu, cu, 5, "abc")
    with pytest.raises(ValueError, match="smaller than the longest sequence"):
        fusedattn.attention_varlen(q, q, q, cu, cu, 1, 5)


def test_value_head_dim_errors_name_the_callers_shapes():
    q, k = torch.randn(1, 2, 4, 24), torch.randn(1, 2, 6, 24)
    with pytest.raises(ValueError, match=r"v has shape \(1, 2, 4, 16\).*k's \(1, 2, 6, 24\)"):
        fusedattn.attention(q, k, torch.randn(1, 2, 4, 16))
    with pytest.raises(ValueError, match="v has shape .* and dtype torch.float64"):
        fusedattn.attention(q, k, torch.randn(1, 2, 6, 16, dtype=torch.float64))


def test_kv_cache_of_two_head_dims_is_rejected_before_any_copy():
    """A v_cache of another head_dim was zero-padded (a copy of the whole cache) before the
    geometry check rejected it."""
    q = torch.randn(1, 1, 2, 64)
    k_cache, v_cache = torch.zeros(1, 4096, 2, 64), torch.zeros(1, 4096, 2, 32)
    import fusedattn._arrays as arrays

    padded = []
    original = arrays.pad_last_dim
    arrays.pad_last_dim = lambda x, width: padded.append(x.shape) or original(x, width)
    try:
        with pytest.raises(ValueError, match="v_cache"):
            fusedattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=3)
    finally:
        arrays.pad_last_dim = original
    assert not padded


@pytest.mark.parametrize("which", ["q", "attn_mask", "sinks"])
def test_sparse_inputs_name_themselves(which):
    args = dict(q=torch.randn(1, 2, 4, 8), attn_mask=torch.randn(1, 2, 4, 6), sinks=torch.randn(2))
    args[which] = args[which].to_sparse()
    with pytest.raises(TypeError, match=f"{which} must be a dense"):
        fusedattn.attention(args.pop("q"), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), **args)


@pytest.mark.parametrize("sink", [float("inf"), 1e39])
def test_sinks_beyond_the_compute_range_are_rejected(sink):
    """A +inf sink (or a float64 one past float32's range, for float32 compute) started the
    running max at inf and gave NaN; now a ValueError. Within the range they work."""
    q, k, v = torch.randn(1, 2, 1, 64), torch.randn(1, 2, 5, 64), torch.randn(1, 2, 5, 64)
    with pytest.raises(ValueError, match=r"sinks\[0\] = .* a sink must be a finite logit or -inf"):
        fusedattn.attention(q, k, v, sinks=torch.tensor([sink, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"sinks\[0\]"):
        fusedattn.attention_with_kvcache(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), cache_seqlens=5,
                                         sinks=torch.tensor([sink, 0.5], dtype=torch.float64))
    out, lse = fusedattn.attention(q, k, v, sinks=torch.tensor([3e38, 0.5], dtype=torch.float64), return_lse=True)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0])) and torch.isfinite(lse).all()
    if sink == 1e39:  # float64 compute takes it
        out64 = fusedattn.attention(q.double(), k.double(), v.double(), sinks=torch.tensor([sink, 0.5], dtype=torch.float64))
        assert torch.equal(out64[:, 0], torch.zeros_like(out64[:, 0]))
