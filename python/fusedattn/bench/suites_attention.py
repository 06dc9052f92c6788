"""The attention-level suites: fwd (forward), bwd (backward alone) and decode (one token vs a KV cache).

Every case times fusedattn, torch SDPA (default backend) and naive torch side by side; on a GPU
also SDPA pinned to each CUDA backend and fusedattn's CPU fallback (the same inputs on the CPU).

fwd:    attention forward; FLOPs 4·B·H·L²·D (halved when causal). Error: head (0, 0) vs the
        float64 reference.
bwd:    backward alone: torch.autograd.grad over a retained forward graph; FLOPs 2.5× forward.
        Error: dq, dk, dv of head (0, 0) vs float64 autograd of the naive attention.
decode: one query token per sequence against a full KV cache of L tokens; GB/s of K/V read
        (2·B·L·Hkv·D·bytes per call) against the measured read bandwidth. fusedattn reads the
        cache in its real (B, L, Hkv, D) layout through attention_with_kvcache; SDPA and naive get
        contiguous (B, Hkv, L, D) tensors (their best case; SDPA with enable_gqa). Error: batch 0
        vs float64.
"""

from __future__ import annotations

from ..functional import attention
from ..inference import attention_with_kvcache
from .common import Case, dtype_of
from .forward import (
    FIRST_HEAD,
    forward_flops,
    gpu_sdpa_backends,
    implementations,
    make_inputs,
    max_abs_error,
    naive_attention,
    reference_first_head,
)

FWD_SHAPES = [(1, 8, seqlen, 64) for seqlen in (512, 1024, 2048, 4096)]
FWD_QUICK_SHAPES = [(1, 4, seqlen, 64) for seqlen in (256, 512, 1024)]
BWD_SHAPES = [(1, 8, 1024, 64), (1, 8, 2048, 64)]
BWD_QUICK_SHAPES = [(1, 4, 512, 64)]
DECODE_SHAPES = [(4, 32, 8, 8192, 128)]       # (batch, heads, kv heads, cache length, head_dim)
DECODE_QUICK_SHAPES = [(2, 16, 4, 2048, 128)]
BACKWARD_FLOPS_FACTOR = 2.5


def shape_label(shape) -> str:
    return "x".join(map(str, shape))


def decode_label(shape) -> str:
    """'4x32/8x8192x128' (B x Hq/Hkv x L x D); '4x32x8192x128' when Hkv = Hq."""
    batch, heads, heads_kv, seqlen, head_dim = shape
    heads_text = str(heads) if heads == heads_kv else f"{heads}/{heads_kv}"
    return f"{batch}x{heads_text}x{seqlen}x{head_dim}"


def _raise(error):
    def call():
        raise error
    return call


def attention_fns(torch, device: str) -> dict[str, tuple]:
    """name -> (fn(q, k, v, causal), device its inputs live on), in timing order."""
    fns = {name: (fn, device) for name, fn in implementations(torch).items()}
    if device == "cuda":
        fns.update({name: (fn, device) for name, fn in gpu_sdpa_backends(torch).items()})
        fns["fusedattn-cpu"] = (fns["fusedattn"][0], "cpu")
    return fns


def fwd_case(torch, shape, dtype_name, causal, device) -> Case:
    def prepare():
        q, k, v = make_inputs(torch, shape, dtype_of(torch, dtype_name), device=device)
        on = {device: (q, k, v)}
        if device != "cpu":
            on["cpu"] = tuple(x.cpu() for x in (q, k, v))
        calls = {name: (lambda fn=fn, where=where: fn(*on[where], causal))
                 for name, (fn, where) in attention_fns(torch, device).items()}

        def check(results):
            expected = reference_first_head(q, k, v, causal)
            return {name: max_abs_error(out, expected) for name, out in results.items()}

        return calls, check

    return Case("fwd", shape_label(shape), dtype_name, causal, dict(zip("BHLD", shape)), "GFLOP/s",
                forward_flops(shape[0], shape[1], shape[2], shape[2], shape[3], causal),
                flops=forward_flops(shape[0], shape[1], shape[2], shape[2], shape[3], causal), prepare=prepare)


def bwd_case(torch, shape, dtype_name, causal, device) -> Case:
    flops = BACKWARD_FLOPS_FACTOR * forward_flops(shape[0], shape[1], shape[2], shape[2], shape[3], causal)

    def prepare():
        dtype = dtype_of(torch, dtype_name)
        base = make_inputs(torch, shape, dtype, device=device)
        dout = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
        on = {device: (tuple(x.clone().requires_grad_() for x in base), dout)}
        if device != "cpu":
            on["cpu"] = (tuple(x.cpu().requires_grad_() for x in base), dout.cpu())
        calls = {}
        for name, (fn, where) in attention_fns(torch, device).items():
            inputs, grad = on[where]
            try:
                out = fn(*inputs, causal)
            except (RuntimeError, ValueError, TypeError, NotImplementedError) as error:
                calls[name] = _raise(error)
                continue
            calls[name] = (lambda out=out, inputs=inputs, grad=grad:
                           torch.autograd.grad(out, inputs, grad, retain_graph=True))

        def check(results):
            inputs64 = [x[FIRST_HEAD].detach().to(device="cpu", dtype=torch.float64).requires_grad_() for x in base]
            out64 = naive_attention(torch, *inputs64, causal)
            expected = torch.autograd.grad(out64, inputs64, dout[FIRST_HEAD].to(device="cpu", dtype=torch.float64))
            return {name: max(float((g[FIRST_HEAD].to(device="cpu", dtype=torch.float64) - e).abs().max())
                              for g, e in zip(grads, expected))
                    for name, grads in results.items()}

        return calls, check

    return Case("bwd", shape_label(shape), dtype_name, causal, dict(zip("BHLD", shape)), "GFLOP/s", flops,
                flops=flops, prepare=prepare)


def decode_case(torch, shape, dtype_name, device) -> Case:
    batch, heads, heads_kv, seqlen, head_dim = shape
    dtype_bytes = torch.empty((), dtype=dtype_of(torch, dtype_name)).element_size()
    kv_bytes = 2.0 * batch * seqlen * heads_kv * head_dim * dtype_bytes

    def prepare():
        dtype = dtype_of(torch, dtype_name)
        generator = torch.Generator().manual_seed(0)
        q = torch.randn(batch, 1, heads, head_dim, generator=generator).to(dtype)          # (B, 1, Hq, D)
        k_cache = torch.randn(batch, seqlen, heads_kv, head_dim, generator=generator).to(dtype)
        v_cache = torch.randn(batch, seqlen, heads_kv, head_dim, generator=generator).to(dtype)
        seqlens = torch.full((batch,), seqlen, dtype=torch.int32)
        cpu = (q, k_cache, v_cache)
        q, k_cache, v_cache = (x.to(device) for x in cpu)
        q_bhsd = q.transpose(1, 2).contiguous()                                            # (B, Hq, 1, D)
        k_bhsd, v_bhsd = (x.transpose(1, 2).contiguous() for x in (k_cache, v_cache))      # (B, Hkv, L, D)
        # fusedattn reads copies made the same way as SDPA's, not the torch.randn output: where a
        # memory-bound call's buffers lie moved its speed by up to a third on a VM, and the randn
        # output read slowest (benchmarks/decode_placement.py).
        k_cache, v_cache = (x.clone() for x in (k_cache, v_cache))
        gqa = heads != heads_kv
        sdpa = torch.nn.functional.scaled_dot_product_attention

        seqlens_on = {"cpu": seqlens, device: seqlens.to(device)}  # no host-device copy inside the timing

        def fusedattn_call(q, k_cache, v_cache):
            out = attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens_on[q.device.type])
            return out.transpose(1, 2)                                                     # (B, Hq, 1, D) view

        calls = {
            "fusedattn": lambda: fusedattn_call(q, k_cache, v_cache),
            "torch-sdpa": lambda: sdpa(q_bhsd, k_bhsd, v_bhsd, enable_gqa=gqa),
            "naive-torch": lambda: naive_attention(torch, q_bhsd, k_bhsd, v_bhsd, False),
        }
        if device == "cuda":
            for name, fn in gpu_sdpa_backends(torch).items():
                if gqa:
                    calls[name] = _raise(NotImplementedError("GQA decode: only the default SDPA backend is timed"))
                else:
                    calls[name] = lambda fn=fn: fn(q_bhsd, k_bhsd, v_bhsd, False)
            calls["fusedattn-cpu"] = lambda: fusedattn_call(*cpu)

        def check(results):
            q64, k64, v64 = (x[:1].to(device="cpu", dtype=torch.float64) for x in (q_bhsd, k_bhsd, v_bhsd))
            expected = naive_attention(torch, q64, k64, v64, False)                        # (1, Hq, 1, D)
            return {name: float((out[:1].to(device="cpu", dtype=torch.float64) - expected).abs().max())
                    for name, out in results.items()}

        return calls, check

    params = {"B": batch, "Hq": heads, "Hkv": heads_kv, "L": seqlen, "D": head_dim, "kv_bytes": kv_bytes}
    return Case("decode", decode_label(shape), dtype_name, None, params, "GB/s", kv_bytes, flops=None,
                prepare=prepare)


def fwd_cases(torch, shapes, dtypes, causals, device) -> list[Case]:
    return [fwd_case(torch, s, d, c, device) for d in dtypes for c in causals for s in shapes]


def bwd_cases(torch, shapes, dtypes, causals, device) -> list[Case]:
    return [bwd_case(torch, s, d, c, device) for d in dtypes for c in causals for s in shapes]


def decode_cases(torch, shapes, dtypes, device) -> list[Case]:
    return [decode_case(torch, s, d, device) for d in dtypes for s in shapes]
