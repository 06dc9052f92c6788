"""PyTorch integration: the kernels as torch.library ops with fake (meta) kernels and autograd.

    fusedattn::attention_forward(q, k, v, attn_mask?, alibi_slopes?, sinks?, rng_seed?, ...) -> (out, lse)
    fusedattn::attention_backward(dout, dlse?, q, k, v, out, lse, ...) -> (dq, dk, dv, dmask, dsinks)

Tensors are passed in the caller's layout (`bshd` says (b, s, h, d), else (b, h, s, d)); outputs
are contiguous in that layout, in the real and the fake kernel alike. attn_mask has any shape that
broadcasts to (b, h, Lq, Lk) (the kernels read it as that view); its gradient is the dense one
summed to the mask's own shape in float32 (float64) and then rounded to its dtype once, as torch
reduces it (rounding each dense element first, before autograd's expand summed them, cost a bf16
per-row mask's gradient three orders of magnitude of accuracy). rng_seed is an int64 scalar tensor
(traceable under torch.compile).
Being real ops, they trace under torch.compile(fullgraph=True) without graph breaks, pass
torch.library.opcheck, and get gradients through register_autograd. In eager mode,
EagerAttention runs the same functions without the dispatcher (fewer µs per call).
"""

from __future__ import annotations

import torch

from . import _C, _runtime

_VARIANT_ARGS = (
    "float scale, bool causal, int q_offset, int window_left, int window_right, float softcap, "
    "float dropout_p, bool bshd, str names"
)
torch.library.define(
    "fusedattn::attention_forward",
    "(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? alibi_slopes, Tensor? sinks, Tensor? rng_seed, "
    f"{_VARIANT_ARGS}) -> (Tensor, Tensor)",
)
torch.library.define(
    "fusedattn::attention_backward",
    "(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? attn_mask, "
    f"Tensor? alibi_slopes, Tensor? sinks, Tensor? rng_seed, {_VARIANT_ARGS}, bool mask_grad) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)


def _bhsd(x: torch.Tensor, bshd: bool) -> torch.Tensor:
    """The (b, h, s, d) view the extension reads."""
    return x.transpose(1, 2) if bshd else x


def _lse_shape(q: torch.Tensor, bshd: bool):
    return (q.shape[0], q.shape[2], q.shape[1]) if bshd else (q.shape[0], q.shape[1], q.shape[2])


def _float64(x):
    return None if x is None else x.detach().to(torch.float64).contiguous()


def lse_dtype(q):
    """float32, or float64 for float64 inputs (fp64 gradients stay fp64-accurate)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _variant(attn_mask, alibi_slopes, sinks, rng_seed, scale, causal, q_offset, window_left, window_right, softcap,
             dropout_p):
    """The extension's variant tuple (see csrc/bindings/validate.h)."""
    seed = int(rng_seed.item()) if rng_seed is not None and dropout_p > 0.0 else 0
    return (scale, causal, q_offset, window_left, window_right, softcap, attn_mask, _float64(alibi_slopes),
            _float64(sinks), dropout_p, seed, 0)


def _full_mask(attn_mask, q, k, bshd):
    """attn_mask as the (b, h, Lq, Lk) view the kernels read (stride 0 on broadcast dims)."""
    if attn_mask is None:
        return None
    return attn_mask.expand(*_lse_shape(q, bshd), k.shape[1] if bshd else k.shape[2])


def _forward_cpu(q, k, v, attn_mask, alibi_slopes, sinks, rng_seed, scale, causal, q_offset, window_left,
                 window_right, softcap, dropout_p, bshd, names):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(q, bshd), dtype=lse_dtype(q), device=q.device)
    variant = _variant(_full_mask(attn_mask, q, k, bshd), alibi_slopes, sinks, rng_seed, scale, causal, q_offset,
                       window_left, window_right, softcap, dropout_p)
    _C.attention_forward(_bhsd(q, bshd), _bhsd(k, bshd), _bhsd(v, bshd), _bhsd(out, bshd), lse, variant,
                         _runtime.cpu_isa(), _runtime.get_num_threads(), tuple(names.split(",")))
    return out, lse


def _forward_cuda(q, k, v, attn_mask, alibi_slopes, sinks, rng_seed, scale, causal, q_offset, window_left,
                  window_right, softcap, dropout_p, bshd, names):
    from . import _cuda_backend

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(q, bshd), dtype=torch.float32, device=q.device)
    variant = _variant(_full_mask(attn_mask, q, k, bshd), alibi_slopes, sinks, rng_seed, scale, causal, q_offset,
                       window_left, window_right, softcap, dropout_p)
    _cuda_backend.forward(_bhsd(q, bshd), _bhsd(k, bshd), _bhsd(v, bshd), _bhsd(out, bshd), lse, variant,
                          tuple(names.split(",")))
    return out, lse


def _backward_cuda(*args):
    raise NotImplementedError("fusedattn: the backward pass on CUDA is not implemented yet")


def sink_probability(sinks, lse):
    """exp(sinks - lse), the sink's share of each row's softmax (sinks broadcast against lse), 0
    where lse is -inf: rows that see neither a key nor the sink (a sink of -inf), and packed
    varlen rows of no sequence, which would give exp(-inf + inf) = NaN."""
    return torch.where(lse == float("-inf"), torch.zeros_like(lse), torch.exp(sinks - lse))


def sink_gradient(sinks, dout, out, lse, dlse, bshd):
    """d loss / d sinks[h] = -sum_{b,i} exp(sinks[h] - lse[b,h,i]) · (rowsum(dO∘O) - dlse)[b,h,i]."""
    compute = lse.dtype
    dsum = (dout.to(compute) * out.to(compute)).sum(-1)
    if bshd:
        dsum = dsum.transpose(1, 2)
    if dlse is not None:
        dsum = dsum - dlse
    return (-(sink_probability(sinks.to(compute)[None, :, None], lse) * dsum).sum((0, 2))).to(sinks.dtype)


def _backward_cpu(dout, dlse, q, k, v, out, lse, attn_mask, alibi_slopes, sinks, rng_seed, scale, causal, q_offset,
                  window_left, window_right, softcap, dropout_p, bshd, names, mask_grad):
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    batch, num_heads, seqlen_q = _lse_shape(q, bshd)
    seqlen_k = k.shape[1] if bshd else k.shape[2]
    dmask = (torch.zeros((batch, num_heads, seqlen_q, seqlen_k), dtype=lse_dtype(q), device=q.device)
             if mask_grad else q.new_empty((0,), dtype=lse_dtype(q)))
    if dout.stride(-1) != 1:  # e.g. the expanded gradient of a sum()
        dout = dout.contiguous()
    if dlse is not None:
        dlse = dlse.contiguous()
    variant = _variant(_full_mask(attn_mask, q, k, bshd), alibi_slopes, sinks, rng_seed, scale, causal, q_offset,
                       window_left, window_right, softcap, dropout_p)
    _C.attention_backward(_bhsd(dout, bshd), dlse, _bhsd(q, bshd), _bhsd(k, bshd), _bhsd(v, bshd), _bhsd(out, bshd),
                          lse, _bhsd(dq, bshd), _bhsd(dk, bshd), _bhsd(dv, bshd), dmask if mask_grad else None,
                          variant, _runtime.cpu_isa(), _runtime.get_num_threads(), tuple(names.split(",")))
    dsinks = sink_gradient(sinks, dout, out, lse, dlse, bshd) if sinks is not None else q.new_empty((0,))
    return dq, dk, dv, dmask, dsinks


def _forward_fake(q, k, v, attn_mask, alibi_slopes, sinks, rng_seed, scale, causal, q_offset, window_left,
                  window_right, softcap, dropout_p, bshd, names):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, bshd), dtype=lse_dtype(q))


def _backward_fake(dout, dlse, q, k, v, out, lse, attn_mask, alibi_slopes, sinks, rng_seed, scale, causal, q_offset,
                   window_left, window_right, softcap, dropout_p, bshd, names, mask_grad):
    batch, num_heads, seqlen_q = _lse_shape(q, bshd)
    seqlen_k = k.shape[1] if bshd else k.shape[2]
    dmask_shape = (batch, num_heads, seqlen_q, seqlen_k) if mask_grad else (0,)
    dsinks = sinks.new_empty(sinks.shape) if sinks is not None else q.new_empty((0,))
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(dmask_shape, dtype=lse_dtype(q)), dsinks)


_NO_GRAD_OPTIONS = (None,) * 10  # rng_seed and the nine variant scalars


def _gradients(ctx, grads):
    """Gradients of (q, k, v, attn_mask, alibi_slopes, sinks, ...): None where none is needed."""
    dq, dk, dv, dmask, dsinks = grads
    needs = ctx.needs_input_grad
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
            dmask.sum_to_size(ctx.mask_shape).to(ctx.mask_dtype) if needs[3] else None, None,
            dsinks if needs[5] else None) + _NO_GRAD_OPTIONS


def _save(ctx, inputs, output):
    q, k, v, attn_mask, alibi_slopes, sinks, rng_seed, *options = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], attn_mask, alibi_slopes, sinks, rng_seed)
    ctx.options = options
    ctx.mask_dtype, ctx.mask_shape = (None, None) if attn_mask is None else (attn_mask.dtype, attn_mask.shape)


def _backward_args(ctx, dout, dlse):
    q, k, v, out, lse, attn_mask, alibi_slopes, sinks, rng_seed = ctx.saved_tensors
    return (dout, dlse, q, k, v, out, lse, attn_mask, alibi_slopes, sinks, rng_seed, *ctx.options,
            bool(ctx.needs_input_grad[3]))


def _backward(ctx, dout, dlse):
    return _gradients(ctx, attention_backward(*_backward_args(ctx, dout, dlse)))


torch.library.impl("fusedattn::attention_forward", "CPU")(_forward_cpu)
torch.library.impl("fusedattn::attention_backward", "CPU")(_backward_cpu)
torch.library.impl("fusedattn::attention_forward", "CUDA")(_forward_cuda)
torch.library.impl("fusedattn::attention_backward", "CUDA")(_backward_cuda)
torch.library.register_fake("fusedattn::attention_forward")(_forward_fake)
torch.library.register_fake("fusedattn::attention_backward")(_backward_fake)
torch.library.register_autograd("fusedattn::attention_forward", _backward, setup_context=_save)


_DOUBLE_BACKWARD = "fusedattn: double backward (the gradient of a gradient, create_graph=True) is not implemented"


def no_double_backward(op_name: str) -> None:
    """Registers an autograd for backward op `op_name` that raises when it is differentiated in
    turn (create_graph=True and a second backward): without one, torch took its outputs as
    constants and second-order gradients came out wrong with no error."""

    def backward(ctx, *grads):
        raise NotImplementedError(_DOUBLE_BACKWARD)

    torch.library.register_autograd(op_name, backward, setup_context=lambda ctx, inputs, output: None)


no_double_backward("fusedattn::attention_backward")

attention_forward = torch.ops.fusedattn.attention_forward.default
attention_backward = torch.ops.fusedattn.attention_backward.default


def eager_function(name, forward_impl, backward_impl, backward_op, save, backward_args, gradients):
    """An autograd.Function that runs an op's implementations directly, without the dispatcher
    (eager mode): the same forward, saved tensors and gradients as the op's registered autograd.
    With create_graph=True the backward goes through backward_op, whose autograd raises only if
    a second backward reaches it (no_double_backward), as the ops' path does."""

    def forward(ctx, *inputs):
        output = forward_impl(*inputs)
        save(ctx, inputs, output)
        return output

    def backward(ctx, dout, dlse):
        run = backward_op if torch.is_grad_enabled() else backward_impl  # (grad mode: create_graph=True)
        return gradients(ctx, run(*backward_args(ctx, dout, dlse)))

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)})


EagerAttention = eager_function("EagerAttention", _forward_cpu, _backward_cpu, attention_backward, _save,
                                _backward_args, _gradients)
