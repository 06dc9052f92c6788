"""Array kinds: the kernels take anything with ``__dlpack__``; results are of the caller's kind.

torch tensors and numpy arrays are handled natively (outputs allocated by that framework);
any other DLPack-capable CPU array (cupy's host arrays, JAX) is viewed as numpy, zero-copy,
and the result is a numpy array.
"""

from __future__ import annotations

import sys

import numpy as np


def torch_module():
    """torch if it has been imported (fusedattn never imports it for numpy callers)."""
    return sys.modules.get("torch")


def is_torch(x) -> bool:
    torch = torch_module()
    return torch is not None and isinstance(x, torch.Tensor)


def as_array(x, name: str):
    """x as a torch tensor or numpy array (zero-copy); TypeError naming `name` otherwise."""
    if is_torch(x) or isinstance(x, np.ndarray):
        return x
    if hasattr(x, "__dlpack__"):
        return np.from_dlpack(x)
    raise TypeError(
        f"{name} must be a torch tensor, a numpy array or an object with __dlpack__, got {type(x).__name__}"
    )


def check_rank(x, rank: int, name: str, dims: str) -> None:
    if x.ndim != rank:
        raise ValueError(f"{name} must be {rank}-D {dims}, got shape {tuple(x.shape)}")


def swap_seq_heads(x):
    """(b, s, h, d) <-> (b, h, s, d) as a view (never a copy)."""
    return x.transpose(1, 2) if is_torch(x) else x.swapaxes(1, 2)


def empty_like_kind(reference, shape, dtype=None):
    """An uninitialised array of reference's kind and device (dtype defaults to reference's)."""
    if is_torch(reference):
        torch = torch_module()
        return torch.empty(shape, dtype=dtype or reference.dtype, device=reference.device)
    return np.empty(shape, dtype=dtype or reference.dtype)


def float32_of(reference):
    return torch_module().float32 if is_torch(reference) else np.float32


def for_kernel(x):
    """What the extension reads: torch tensors lose autograd (DLPack refuses requires_grad)."""
    return x.detach() if is_torch(x) and x.requires_grad else x
