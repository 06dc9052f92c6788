"""The attention functions: the native API and the SDPA- and flash-attn-compatible drop-ins.

All of them are one kernel call. Layouts are views: "bhsd" (batch, heads, seqlen, head_dim) is
native, "bshd" (flash-attn's) is the same call with the seqlen and heads strides swapped.
Positions follow DESIGN.md: query row i sits at i + q_offset; the native API and flash-attn
default to q_offset = seqlen_k - seqlen_q (bottom-right causal), SDPA uses 0 (top-left).
The score pipeline is DESIGN.md's: scale → softcap → ALiBi → + float mask → masking →
softmax (with sinks) → dropout → ·V.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from . import _C, _arrays, _runtime

__all__ = ["attention", "attention_backward", "scaled_dot_product_attention", "flash_attn_func"]

_DIMS = {"bhsd": "(batch, heads, seqlen, head_dim)", "bshd": "(batch, seqlen, heads, head_dim)"}
_MAX_SEED = 2**63
_DRAWN_SEEDS = 2**62  # seeds drawn from torch's / numpy's generator are below this
# Bound on |q_offset| and window sizes: the kernels add up to three of them (and a row index) in
# int64 (common/variant.h), which near 2**63 wrapped around and hid every key.
_MAX_POSITION = 2**61


class _Call:
    """One validated attention call: arrays in the caller's layout plus the score variant."""

    def __init__(self, q, k, v, *, layout, names, causal, scale, q_offset, window, window_name="window",
                 attn_mask=None, alibi_slopes=None, softcap=0.0, sinks=None, dropout_p=0.0, seed=None,
                 arrays_checked=False):
        if layout not in _DIMS:
            raise ValueError(f"layout must be 'bhsd' or 'bshd', got {layout!r}")
        self.names = names
        if arrays_checked:  # the caller (the KV cache) has taken q, k, v as arrays of one kind and checked
            self.q, self.k, self.v = q, k, v  # their rank; no autocast: the cache fixes the dtype
        else:
            self.q, self.k, self.v = (_arrays.as_array(x, name) for x, name in zip((q, k, v), names))
            for x, name in zip((self.q, self.k, self.v), names):
                _arrays.check_rank(x, 4, name, _DIMS[layout])
            _arrays.check_same_kind((self.q, self.k, self.v), names)
            if _arrays.is_torch(self.q):
                _arrays.check_dense(self.q, names[0])  # (k and v: the extension names them)
                self.q, self.k, self.v = _arrays.autocast((self.q, self.k, self.v))
        self.bshd = layout == "bshd"
        seq_dim, head_dim_ = (1, 2) if self.bshd else (2, 1)
        self.batch, self.num_heads = self.q.shape[0], self.q.shape[head_dim_]
        self.seqlen_q, self.seqlen_k = self.q.shape[seq_dim], self.k.shape[seq_dim]
        head_dim = self.q.shape[3]
        if head_dim < 1:
            raise ValueError(f"{names[0]} has head_dim {head_dim}; supported: 1..256")
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else _number(scale, "scale")
        self.head_dims = (head_dim, self.v.shape[3])  # q's and k's, v's (the output's)
        if self.head_dims[1] != head_dim and not arrays_checked:  # (a KV cache is never copied)
            self.q, self.k, self.v = _pad_head_dims(self.q, self.k, self.v, names)
        self.causal = bool(causal)
        self.q_offset = self.seqlen_k - self.seqlen_q if q_offset is None else _integer(q_offset, "q_offset")
        if not -_MAX_POSITION < self.q_offset < _MAX_POSITION:
            raise ValueError(f"q_offset must be in (-2**61, 2**61), got {q_offset!r}")
        self.window = _window_pair(window, window_name)
        self.softcap = _number(softcap, "softcap")
        if not self.softcap >= 0.0:
            raise ValueError(f"softcap must be >= 0 (0 = off), got {softcap!r}")
        # attn_mask as given (the torch ops take it so: see _torch_ops.py), and as a (b, h, Lq, Lk) view
        self.mask_given = None if attn_mask is None else _arrays.as_array(attn_mask, "attn_mask")
        self.attn_mask = None if attn_mask is None else self._broadcast_mask(self.mask_given)
        self.alibi_slopes = None if alibi_slopes is None else self._per_head(alibi_slopes, "alibi_slopes")
        self.sinks = None if sinks is None else self._per_head(sinks, "sinks")
        self.dropout_p = _number(dropout_p, "dropout_p")
        if not 0.0 <= self.dropout_p <= 1.0:
            raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p!r}")
        self.seed = self._seed(seed) if self.dropout_p > 0.0 else 0

    def _broadcast_mask(self, mask):
        """attn_mask (an array already) as a (batch, heads, Lq, Lk) view; broadcast dims get
        stride 0 (no copy)."""
        _arrays.check_same_kind((self.q, mask), (self.names[0], "attn_mask"))
        _arrays.check_dense(mask, "attn_mask")
        shape = (self.batch, self.num_heads, self.seqlen_q, self.seqlen_k)
        if mask.ndim > 4:
            raise ValueError(f"attn_mask must have at most 4 dims, got shape {tuple(mask.shape)}")
        try:
            return _arrays.broadcast_view(mask, shape)
        except (RuntimeError, ValueError):
            raise ValueError(f"attn_mask of shape {tuple(mask.shape)} does not broadcast to {shape}") from None

    def _per_head(self, x, name):
        """Per-head parameters (ALiBi slopes, sinks): torch tensors stay tensors (autograd for
        sinks; the op converts them), others become contiguous float64 numpy arrays."""
        x = _arrays.as_array(x, name)
        _arrays.check_same_kind((self.q, x), (self.names[0], name))
        if _arrays.is_torch(x):
            _arrays.check_dense(x, name)
            if x.is_complex() or x.dtype == _arrays.torch_module().bool:
                raise TypeError(f"{name} must be real numbers, got {x.dtype}")
            if x.device == self.q.device:
                return x
            if x.device.type not in ("cpu", "cuda"):
                raise ValueError(f"{name} is on {x.device} but {self.names[0]} is on {self.q.device}")
            return x.to(self.q.device)
        if x.dtype.kind not in "fiu":
            raise TypeError(f"{name} must be real numbers, got {x.dtype}")
        return np.ascontiguousarray(x, dtype=np.float64)

    def _seed(self, seed):
        if seed is None:  # torch's default generator for torch callers (torch.manual_seed applies)
            if _arrays.is_torch(self.q):
                return int(_arrays.torch_module().randint(0, _DRAWN_SEEDS, (), dtype=_arrays.torch_module().int64))
            return int(np.random.randint(0, _DRAWN_SEEDS, dtype=np.int64))
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < _MAX_SEED:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        return int(seed)

    def variant(self, alibi_slopes, sinks):
        """The extension's variant tuple (csrc/bindings/validate.h)."""
        return (self.scale, self.causal, self.q_offset, *self.window, self.softcap, self.attn_mask, alibi_slopes,
                sinks, self.dropout_p, self.seed, 0)

    def op_args(self):
        """Arguments of the torch ops after (q, k, v) / before the tensors they add."""
        torch = _arrays.torch_module()
        rng_seed = torch.tensor(self.seed, dtype=torch.int64) if self.dropout_p > 0.0 else None
        return (self.mask_given, self.alibi_slopes, self.sinks, rng_seed, self.scale, self.causal, self.q_offset,
                *self.window, self.softcap, self.dropout_p, self.bshd, ",".join(self.names))

    def check_no_slope_gradient(self):
        """NotImplementedError for ALiBi slopes that would need a gradient (rather than none)."""
        slopes = self.alibi_slopes
        if slopes is not None and slopes.requires_grad and _arrays.torch_module().is_grad_enabled():
            raise NotImplementedError("fusedattn: alibi_slopes have no gradient (they are fixed in ALiBi); "
                                      "pass them detached")

    def check_devices(self, **more):
        """The torch ops' inputs (and `more`, by name) on q's device (the extension checks the
        direct calls' itself)."""
        _arrays.check_same_device((self.q, self.k, self.v, self.mask_given, self.sinks, *more.values()),
                                  (*self.names, "attn_mask", "sinks", *more))

    def unpad(self, out):
        """The output (or dv) at v's head_dim (see _pad_head_dims)."""
        dim_q, dim_v = self.head_dims
        return out if dim_q == dim_v else _arrays.cut_last_dim(out, dim_v)

    def bhsd(self, x):
        return _arrays.swap_seq_heads(x) if self.bshd else x

    def lse_shape(self):
        return (self.batch, self.num_heads, self.seqlen_q)

    def forward(self, return_lse: bool):
        q, k, v = self.q, self.k, self.v
        if _arrays.is_torch(q):
            self.check_no_slope_gradient()
            grad_inputs = (q, k, v, self.attn_mask, self.sinks)
            mode = _arrays.torch_mode(*(x for x in grad_inputs if x is not None))
            if q.is_cuda and mode == "autograd":
                raise NotImplementedError("fusedattn: the backward pass on CUDA is not implemented yet; "
                                          "use CPU tensors for training, or call under torch.no_grad()")
            if mode != "direct":
                self.check_devices()
                ops = _arrays.torch_ops()
                run = ops.attention_forward if mode == "op" else ops.EagerAttention.apply
                out, lse = run(q, k, v, *self.op_args())
                out = self.unpad(out)
                return (out, lse) if return_lse else out
        # numpy, or eager torch with no gradient to record: call the kernel directly.
        out = _arrays.empty_like_kind(q, q.shape)
        lse = _arrays.empty_like_kind(q, self.lse_shape(), _arrays.lse_dtype_of(q)) if return_lse else None
        variant = self.variant(_arrays.float64_contiguous(self.alibi_slopes), _arrays.float64_contiguous(self.sinks))
        if _arrays.is_cuda(q):
            from . import _cuda_backend

            _cuda_backend.forward(self.bhsd(q), self.bhsd(k), self.bhsd(v), self.bhsd(out), lse, variant, self.names)
        else:
            _C.attention_forward(self.bhsd(q), self.bhsd(k), self.bhsd(v), self.bhsd(out), lse, variant,
                                 _runtime.cpu_isa(), _runtime.get_num_threads(), self.names)
        out = self.unpad(out)
        return (out, lse) if return_lse else out


def _pad_head_dims(q, k, v, names):
    """q, k, v at one head_dim where v's differs from q's and k's (DeepSeek-V2/V3's MLA: 192 and
    128), which torch's SDPA takes. The kernels take one head_dim, and zero columns change
    nothing: v padded to q's head_dim gives the output zero columns past v's (which _Call.unpad
    cuts off), q and k padded to v's add 0 to every score (the default scale stays q's: _Call
    sets it first). The price is a padded copy of the narrower side and products at the wider
    head_dim (benchmarks/bench_value_head_dim.py). k unlike q stays the extension's error."""
    dim_q, dim_k, dim_v = q.shape[3], k.shape[3], v.shape[3]
    if dim_k != dim_q:
        return q, k, v
    if not 1 <= dim_v <= 256:
        raise ValueError(f"{names[2]} has head_dim {dim_v}; supported: 1..256")
    # (checked here: after the pad, the extension's errors would show the padded shapes, and the
    # copy would hide a last dim that is not contiguous, which the contract rejects)
    if tuple(v.shape[:3]) != tuple(k.shape[:3]) or v.dtype != k.dtype:
        raise ValueError(f"{names[2]} has shape {tuple(v.shape)} and dtype {v.dtype}; it must match "
                         f"{names[1]}'s {tuple(k.shape)} and {k.dtype} but for its head_dim")
    for x, name in zip((q, k, v), names):
        if not _arrays.last_dim_contiguous(x):
            raise ValueError(f"{name} must be contiguous in its last dim")
    width = max(dim_q, dim_v)
    return tuple(_arrays.pad_last_dim(x, width) for x in (q, k, v))


def _number(x, name: str) -> float:
    """A scalar argument as a float; TypeError naming it otherwise (float() named nothing)."""
    try:
        return float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {x!r}") from None


def _scale(softmax_scale):
    """The flash-attn drop-ins' softmax_scale: None (1/sqrt(head_dim)) or a number (errors name it)."""
    return None if softmax_scale is None else _number(softmax_scale, "softmax_scale")


def _integer(x, name: str) -> int:
    """An integer argument (an int, numpy integer or integer tensor: not a float or a str, which
    int() would truncate or parse); TypeError naming it otherwise."""
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {x!r}") from None


def _window_pair(window, name: str) -> tuple[int, int]:
    try:
        left, right = (operator.index(w) for w in window)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (left, right) of ints, got {window!r}") from None
    if left < -1 or right < -1 or max(left, right) >= _MAX_POSITION:
        raise ValueError(f"{name} entries must be in [0, 2**61) or -1 (unbounded), got {window!r}")
    return left, right


def attention(q, k, v, *, causal=False, scale=None, layout="bhsd", q_offset=None, window=(-1, -1), attn_mask=None,
              alibi_slopes=None, softcap=0.0, sinks=None, dropout_p=0.0, seed=None, return_lse=False):
    """Exact attention softmax(q·kᵀ·scale + bias)·v without materialising the score matrix.

    Args:
        q: (batch, num_heads, seqlen_q, head_dim) for layout "bhsd", or (batch, seqlen_q,
            num_heads, head_dim) for "bshd". torch tensor, numpy array or any DLPack array.
        k, v: like q with seqlen_k and num_heads_kv heads; num_heads % num_heads_kv == 0 (GQA).
            v may have its own head_dim (DeepSeek's MLA), which out then has (see _pad_head_dims).
        causal: query at position p sees keys j <= p.
        scale: multiplies q·k; default 1/sqrt(head_dim).
        layout: "bhsd" (native, as SDPA) or "bshd" (flash-attn); any other strides are views.
        q_offset: position of query row 0; default seqlen_k - seqlen_q (bottom-right).
        window: (left, right) sliding window: position - left <= j <= position + right; -1 = unbounded.
        attn_mask: bool (True = attend) or float (added to the scores), broadcastable to
            (batch, num_heads, seqlen_q, seqlen_k) in either layout; read in place (no copy).
            A float mask that requires grad gets its gradient.
        alibi_slopes: (num_heads,) or (batch, num_heads); adds -slope·|position - j|.
        softcap: > 0 replaces scores s by softcap·tanh(s / softcap) (Gemma-2).
        sinks: (num_heads,) learnable logits that join each row's softmax denominator but carry
            no value (gpt-oss); they get gradients.
        dropout_p: probability of dropping each attention weight (Philox, counter-based).
        seed: dropout seed; default: drawn from torch's default generator for torch inputs
            (torch.manual_seed makes runs reproducible), from numpy's global RNG otherwise.
        return_lse: also return the log-sum-exp of the final scores, (batch, heads, seqlen_q),
            float32 (float64 for float64 inputs).

    Returns:
        out (same kind, dtype and layout as q), or (out, lse) when return_lse.
        Rows that see no key give 0 (and LSE -inf, or the sink's logit when sinks are given).
    """
    call = _Call(q, k, v, layout=layout, names=("q", "k", "v"), causal=causal, scale=scale, q_offset=q_offset,
                 window=window, attn_mask=attn_mask, alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks,
                 dropout_p=dropout_p, seed=seed)
    return call.forward(return_lse)


def attention_backward(dout, q, k, v, out, lse, *, causal=False, scale=None, layout="bhsd", q_offset=None,
                       window=(-1, -1), attn_mask=None, alibi_slopes=None, softcap=0.0, sinks=None, dropout_p=0.0,
                       seed=None):
    """Gradients (dq, dk, dv) of attention, given the forward's out and lse from outside.

    For context-parallel and ring attention, where the forward's out and lse are merged across
    devices before the backward. Arguments mean what they mean in attention() and must be the
    forward's (with dropout, the same explicit seed); dout has out's shape; lse is the forward's
    (batch, heads, seqlen_q) log-sum-exp. Gradients have the kinds, dtypes and shapes of q, k, v
    (contiguous in the given layout).
    """
    if dropout_p > 0.0 and seed is None:
        raise ValueError("attention_backward with dropout needs the forward's seed")
    call = _Call(q, k, v, layout=layout, names=("q", "k", "v"), causal=causal, scale=scale, q_offset=q_offset,
                 window=window, attn_mask=attn_mask, alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks,
                 dropout_p=dropout_p, seed=seed)
    dout = _arrays.as_array(dout, "dout")
    out = _arrays.as_array(out, "out")
    lse = _arrays.as_array(lse, "lse")
    _arrays.check_same_kind((call.q, dout, out, lse), ("q", "dout", "out", "lse"))
    if _arrays.is_torch(call.q):
        call.check_devices(dout=dout, out=out, lse=lse)
    _arrays.check_rank(dout, 4, "dout", _DIMS[layout])
    _arrays.check_rank(out, 4, "out", _DIMS[layout])
    dim_q, dim_v = call.head_dims
    if dim_q != dim_v:  # v padded (see _pad_head_dims): dout and out likewise
        for x, name in ((dout, "dout"), (out, "out")):
            if x.shape[3] != dim_v:
                raise ValueError(f"{name} has head_dim {x.shape[3]}; expected v's, {dim_v}")
        dout, out = (_arrays.pad_last_dim(x, call.v.shape[3]) for x in (dout, out))
    if _arrays.is_torch(call.q):
        dq, dk, dv, _, _ = _arrays.torch_ops().attention_backward(dout, None, call.q, call.k, call.v, out, lse,
                                                                  *call.op_args(), False)
    else:
        dq, dk, dv = (_arrays.empty_like_kind(x, x.shape) for x in (call.q, call.k, call.v))
        variant = call.variant(_arrays.float64_contiguous(call.alibi_slopes), _arrays.float64_contiguous(call.sinks))
        _C.attention_backward(call.bhsd(dout), None, call.bhsd(call.q), call.bhsd(call.k), call.bhsd(call.v),
                              call.bhsd(out), lse, call.bhsd(dq), call.bhsd(dk), call.bhsd(dv), None, variant,
                              _runtime.cpu_isa(), _runtime.get_num_threads(), call.names)
    return _arrays.cut_last_dim(dq, dim_q), _arrays.cut_last_dim(dk, dim_q), call.unpad(dv)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention (same signature and semantics).

    (..., heads, seqlen, head_dim) inputs; is_causal is top-left aligned, as in torch; a bool
    attn_mask marks the keys to attend, a float one is added to the scores; rows that see no
    key give 0. Dropout draws its seed from torch's default generator.
    """
    names = ("query", "key", "value")
    query, key, value = (_arrays.as_array(x, n) for x, n in zip((query, key, value), names))
    for x, name in zip((query, key, value), names):
        if x.ndim < 3:
            raise ValueError(f"{name} must be at least 3-D (..., heads, seqlen, head_dim), got shape {tuple(x.shape)}")
    if attn_mask is not None and is_causal:
        raise ValueError("pass either attn_mask or is_causal=True, not both (as torch's SDPA requires)")
    if not enable_gqa and query.shape[-3] != key.shape[-3]:
        raise ValueError(
            f"query has {query.shape[-3]} heads but key has {key.shape[-3]}; pass enable_gqa=True for GQA"
        )
    lead = query.shape[:-3]
    for x, name in ((key, "key"), (value, "value")):
        if tuple(x.shape[:-3]) != tuple(lead):
            raise ValueError(f"{name} has leading (batch) dims {tuple(x.shape[:-3])} but query has {tuple(lead)}")
    batch = math.prod(lead)
    q4, k4, v4 = (x.reshape((batch,) + tuple(x.shape[-3:])) for x in (query, key, value))
    mask4 = attn_mask
    if attn_mask is not None and query.ndim != 4:  # fold the mask's leading dims like the inputs'
        full = tuple(lead) + (query.shape[-3], query.shape[-2], key.shape[-2])
        mask = _arrays.as_array(attn_mask, "attn_mask")
        try:
            # Only the leading dims are expanded and folded, and not at all where they are all 1:
            # the last three keep their size-1 dims, which the kernels broadcast and the mask's
            # gradient is summed over before it is rounded (_torch_ops.py).
            padded = mask.reshape((1,) * (len(full) - mask.ndim) + tuple(mask.shape))
            last = tuple(padded.shape[-3:])
            if all(d == 1 for d in padded.shape[:-3]):
                mask4 = padded.reshape((1,) + last)
            else:
                mask4 = _arrays.broadcast_view(padded, tuple(lead) + last).reshape((batch,) + last)
        except (RuntimeError, ValueError):
            raise ValueError(f"attn_mask of shape {tuple(mask.shape)} does not broadcast to {full}") from None
    call = _Call(q4, k4, v4, layout="bhsd", names=names, causal=is_causal, scale=scale, q_offset=0,
                 window=(-1, -1), attn_mask=mask4, dropout_p=dropout_p)
    out = call.forward(return_lse=False)
    return out.reshape(tuple(lead) + tuple(out.shape[1:]))


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Drop-in for flash_attn.flash_attn_func: (batch, seqlen, heads, head_dim), bottom-right causal.

    deterministic is accepted and always true here (the backward never uses atomics).
    return_attn_probs=True returns (out, softmax_lse, S_dmask) as flash-attn does, for testing:
    S_dmask is the dense (batch, heads, Lq, Lk) attention probability matrix, negated where
    dropout dropped the weight (it is O(L²): small shapes only).
    """
    del deterministic
    call = _Call(q, k, v, layout="bshd", names=("q", "k", "v"), causal=causal, scale=_scale(softmax_scale),
                 q_offset=None, window=window_size, window_name="window_size", alibi_slopes=alibi_slopes,
                 softcap=softcap, dropout_p=dropout_p)
    if not return_attn_probs:
        return call.forward(return_lse=False)
    out, lse = call.forward(return_lse=True)
    return out, lse, _attention_probabilities(call)


def _attention_probabilities(call: _Call):
    """Dense attention probabilities of `call` (float64 reference math), sign-encoding dropout."""
    from . import reference

    probs, _ = reference.attention_probabilities(
        call.q, call.k, causal=call.causal, scale=call.scale, q_offset=call.q_offset, window=call.window,
        layout="bshd" if call.bshd else "bhsd", attn_mask=call.attn_mask, alibi_slopes=call.alibi_slopes,
        softcap=call.softcap, sinks=call.sinks)
    if call.dropout_p > 0.0:
        keep = reference.dropout_keep_mask(*probs.shape, call.dropout_p, call.seed)
        probs = np.where(keep, probs, -probs)
    return _arrays.from_numpy_like(call.q, probs)
