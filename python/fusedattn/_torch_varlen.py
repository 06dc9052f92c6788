"""torch.library ops for variable-length (packed) batches, with fake kernels and autograd.

    fusedattn::attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, ...) -> (out, lse)
    fusedattn::attention_varlen_backward(dout, dlse?, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, ...)
        -> (dq, dk, dv, dsinks)

q, out: (total_q, heads, d); k, v: (total_k, kv_heads, d); lse: (heads, total_q) float32 (float64 for float64 inputs);
cu_seqlens: int32 (batch + 1,) CPU tensors. The remaining arguments are those of
fusedattn::attention_forward (see _torch_ops.py); attn_mask must be None.
"""

from __future__ import annotations

import torch

from . import _C, _runtime
from ._torch_ops import _VARIANT_ARGS, _variant, eager_function, lse_dtype, no_double_backward, sink_probability

torch.library.define(
    "fusedattn::attention_varlen_forward",
    "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor? attn_mask, "
    f"Tensor? alibi_slopes, Tensor? sinks, Tensor? rng_seed, {_VARIANT_ARGS}) -> (Tensor, Tensor)",
)
torch.library.define(
    "fusedattn::attention_varlen_backward",
    "(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, "
    "Tensor cu_seqlens_k, Tensor? attn_mask, Tensor? alibi_slopes, Tensor? sinks, Tensor? rng_seed, "
    f"{_VARIANT_ARGS}) -> (Tensor, Tensor, Tensor, Tensor)",
)


def _packed(x: torch.Tensor) -> torch.Tensor:
    """(total, heads, d) as the (1, heads, total, d) view the extension reads."""
    return x[None].transpose(1, 2)


def _forward_cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, attn_mask, alibi_slopes, sinks, rng_seed, scale, causal,
                 q_offset, window_left, window_right, softcap, dropout_p, bshd, names):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=lse_dtype(q), device=q.device)
    variant = _variant(attn_mask, alibi_slopes, sinks, rng_seed, scale, causal, q_offset, window_left, window_right,
                       softcap, dropout_p)
    _C.attention_varlen_forward(_packed(q), _packed(k), _packed(v), _packed(out), lse[None], cu_seqlens_q,
                                cu_seqlens_k, variant, _runtime.cpu_isa(), _runtime.get_num_threads(),
                                tuple(names.split(",")))
    if cu_seqlens_q[-1] < q.shape[0]:  # packed rows that belong to no sequence
        out[int(cu_seqlens_q[-1]):] = 0
        lse[:, int(cu_seqlens_q[-1]):] = float("-inf")
    return out, lse


def _backward_cpu(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, attn_mask, alibi_slopes, sinks,
                  rng_seed, scale, causal, q_offset, window_left, window_right, softcap, dropout_p, bshd, names):
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    if dlse is not None:
        dlse = dlse.contiguous()
    variant = _variant(attn_mask, alibi_slopes, sinks, rng_seed, scale, causal, q_offset, window_left, window_right,
                       softcap, dropout_p)
    _C.attention_varlen_backward(_packed(dout), None if dlse is None else dlse[None], _packed(q), _packed(k),
                                 _packed(v), _packed(out), lse[None], _packed(dq), _packed(dk), _packed(dv),
                                 cu_seqlens_q, cu_seqlens_k, variant, _runtime.cpu_isa(), _runtime.get_num_threads(),
                                 tuple(names.split(",")))
    dq[int(cu_seqlens_q[-1]):] = 0  # packed rows that belong to no sequence
    dk[int(cu_seqlens_k[-1]):] = 0
    dv[int(cu_seqlens_k[-1]):] = 0
    dsinks = q.new_empty((0,))
    if sinks is not None:  # d sinks[h] = -Σ_i exp(sinks[h] - lse[h, i]) · (rowsum(dO∘O) - dlse)[h, i]
        dsum = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1).transpose(0, 1)
        if dlse is not None:
            dsum = dsum - dlse
        dsinks = (-(sink_probability(sinks.to(lse.dtype)[:, None], lse) * dsum).sum(1)).to(sinks.dtype)
    return dq, dk, dv, dsinks


def _forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, *rest):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype(q))


def _backward_fake(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, attn_mask, alibi_slopes, sinks, *rest):
    dsinks = sinks.new_empty(sinks.shape) if sinks is not None else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


_NO_GRAD = (None,) * 10  # rng_seed and the nine variant scalars


def _save(ctx, inputs, output):
    q, k, v, cu_q, cu_k, attn_mask, alibi_slopes, sinks, rng_seed, *options = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k, alibi_slopes, sinks, rng_seed)
    ctx.options = options


def _backward_args(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, alibi_slopes, sinks, rng_seed = ctx.saved_tensors
    return (dout, dlse, q, k, v, out, lse, cu_q, cu_k, None, alibi_slopes, sinks, rng_seed, *ctx.options)


def _gradients(ctx, grads):
    dq, dk, dv, dsinks = grads
    needs = ctx.needs_input_grad
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None, None, None, None, None,
            dsinks if needs[7] else None) + _NO_GRAD


def _backward(ctx, dout, dlse):
    return _gradients(ctx, varlen_backward(*_backward_args(ctx, dout, dlse)))


torch.library.impl("fusedattn::attention_varlen_forward", "CPU")(_forward_cpu)
torch.library.impl("fusedattn::attention_varlen_backward", "CPU")(_backward_cpu)
torch.library.register_fake("fusedattn::attention_varlen_forward")(_forward_fake)
torch.library.register_fake("fusedattn::attention_varlen_backward")(_backward_fake)
torch.library.register_autograd("fusedattn::attention_varlen_forward", _backward, setup_context=_save)
no_double_backward("fusedattn::attention_varlen_backward")

varlen_forward = torch.ops.fusedattn.attention_varlen_forward.default
varlen_backward = torch.ops.fusedattn.attention_varlen_backward.default


EagerVarlen = eager_function("EagerVarlen", _forward_cpu, _backward_cpu, varlen_backward, _save, _backward_args,
                             _gradients)
