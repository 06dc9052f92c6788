"""PyTorch integration: the kernels as torch.library ops with fake (meta) kernels and autograd.

    fusedattn::attention_forward(q, k, v, ...)  -> (out, lse)
    fusedattn::attention_backward(dout, dlse, q, k, v, out, lse, ...) -> (dq, dk, dv)

Tensors are passed in the caller's layout (`bshd` says (b, s, h, d), else (b, h, s, d)); outputs
are contiguous in that layout, in the real and the fake kernel alike. Being real ops (not a
Python autograd.Function around an opaque call), they trace under torch.compile(fullgraph=True)
without graph breaks, pass torch.library.opcheck, and get gradients through register_autograd.
In eager mode, EagerAttention runs the same kernels without the dispatcher (fewer µs per call).
The lse output is always produced: backward needs it, and it costs B·H·Lq floats.
"""

from __future__ import annotations

import torch

from . import _C, _runtime

torch.library.define(
    "fusedattn::attention_forward",
    "(Tensor q, Tensor k, Tensor v, float scale, bool causal, int q_offset, int window_left, "
    "int window_right, bool bshd, str names) -> (Tensor, Tensor)",
)
torch.library.define(
    "fusedattn::attention_backward",
    "(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, "
    "bool causal, int q_offset, int window_left, int window_right, bool bshd, str names) -> (Tensor, Tensor, Tensor)",
)


def _bhsd(x: torch.Tensor, bshd: bool) -> torch.Tensor:
    """The (b, h, s, d) view the extension reads."""
    return x.transpose(1, 2) if bshd else x


def _lse_shape(q: torch.Tensor, bshd: bool):
    return (q.shape[0], q.shape[2], q.shape[1]) if bshd else (q.shape[0], q.shape[1], q.shape[2])


def _attention_forward_cpu(q, k, v, scale, causal, q_offset, window_left, window_right, bshd, names):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(q, bshd), dtype=torch.float32, device=q.device)
    _C.attention_forward(
        _bhsd(q, bshd), _bhsd(k, bshd), _bhsd(v, bshd), _bhsd(out, bshd), lse, scale, causal, q_offset,
        window_left, window_right, _runtime.cpu_isa(), _runtime.get_num_threads(), tuple(names.split(",")),
    )
    return out, lse


def _attention_backward_cpu(dout, dlse, q, k, v, out, lse, scale, causal, q_offset, window_left, window_right,
                            bshd, names):
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    if dout.stride(-1) != 1:  # e.g. the expanded gradient of a sum()
        dout = dout.contiguous()
    if dlse is not None:
        dlse = dlse.contiguous()
    _C.attention_backward(
        _bhsd(dout, bshd), dlse, _bhsd(q, bshd), _bhsd(k, bshd), _bhsd(v, bshd), _bhsd(out, bshd), lse,
        _bhsd(dq, bshd), _bhsd(dk, bshd), _bhsd(dv, bshd), scale, causal, q_offset, window_left, window_right,
        _runtime.cpu_isa(), _runtime.get_num_threads(), tuple(names.split(",")),
    )
    return dq, dk, dv


def _attention_forward_fake(q, k, v, scale, causal, q_offset, window_left, window_right, bshd, names):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, bshd), dtype=torch.float32)


def _attention_backward_fake(dout, dlse, q, k, v, out, lse, scale, causal, q_offset, window_left, window_right,
                             bshd, names):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _gradients_needed(ctx, dq, dk, dv):
    """(dq, dk, dv, None × 7): no gradient for inputs that do not require one."""
    needs = ctx.needs_input_grad
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None) + (None,) * 7


def _setup_context(ctx, inputs, output):
    q, k, v, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.options = options  # scale, causal, q_offset, window_left, window_right, bshd, names


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    return _gradients_needed(ctx, *attention_backward(dout, dlse, q, k, v, out, lse, *ctx.options))


torch.library.impl("fusedattn::attention_forward", "CPU")(_attention_forward_cpu)
torch.library.impl("fusedattn::attention_backward", "CPU")(_attention_backward_cpu)
torch.library.register_fake("fusedattn::attention_forward")(_attention_forward_fake)
torch.library.register_fake("fusedattn::attention_backward")(_attention_backward_fake)
torch.library.register_autograd("fusedattn::attention_forward", _backward, setup_context=_setup_context)

attention_forward = torch.ops.fusedattn.attention_forward.default
attention_backward = torch.ops.fusedattn.attention_backward.default


class EagerAttention(torch.autograd.Function):
    """The same forward and backward for eager mode, calling the kernels without the dispatcher."""

    @staticmethod
    def forward(ctx, q, k, v, *options):
        out, lse = _attention_forward_cpu(q, k, v, *options)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = options
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        return _gradients_needed(ctx, *_attention_backward_cpu(dout, dlse, q, k, v, out, lse, *ctx.options))
