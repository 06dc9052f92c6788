"""fusedattn: fused, tiled attention kernels for CPUs (and NVIDIA GPUs) behind one Python API.

    import fusedattn
    out = fusedattn.attention(q, k, v, causal=True)            # (b, h, s, d), bottom-right causal
    out = fusedattn.scaled_dot_product_attention(q, k, v)     # torch SDPA drop-in
    out = fusedattn.flash_attn_func(q, k, v, causal=True)     # flash-attn drop-in, (b, s, h, d)

Inputs may be torch tensors, numpy arrays or any DLPack CPU array; the result has the caller's kind.
"""

from . import _arrays
from ._runtime import get_num_threads, info, set_num_threads
from .functional import attention, attention_backward, flash_attn_func, scaled_dot_product_attention
from .inference import (
    attention_varlen,
    attention_with_kvcache,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    merge_attention_states,
    merge_attention_states_list,
)

if _arrays.torch_module() is not None:  # register the torch ops now, outside any torch.compile trace
    from . import _torch_kvcache, _torch_ops, _torch_varlen  # noqa: F401

__version__ = "0.1.0"

__all__ = [
    "attention",
    "attention_backward",
    "attention_varlen",
    "flash_attn_varlen_func",
    "attention_with_kvcache",
    "flash_attn_with_kvcache",
    "merge_attention_states",
    "merge_attention_states_list",
    "scaled_dot_product_attention",
    "flash_attn_func",
    "get_num_threads",
    "set_num_threads",
    "info",
    "__version__",
]
