"""Array kinds: the kernels take anything with ``__dlpack__``; results are of the caller's kind.

torch tensors and numpy arrays are handled natively (outputs allocated by that framework);
any other DLPack-capable CPU array (cupy's host arrays, JAX) is viewed as numpy, zero-copy,
and the result is a numpy array.
"""

from __future__ import annotations

import sys

import numpy as np


_torch = []  # [torch] once its import has completed


def torch_module():
    """torch if it has been imported (fusedattn never imports it for numpy callers). Not while
    its import is still running in another thread: "torch" is in sys.modules from the start, and
    numpy calls read torch.Tensor from the half-made module (AttributeError)."""
    if _torch:
        return _torch[0]
    torch = sys.modules.get("torch")
    if torch is None or getattr(getattr(torch, "__spec__", None), "_initializing", False):
        return None
    _torch.append(torch)
    return torch


_tensor_type = []  # [torch.Tensor] once torch has been imported (a hot path: ~10 checks per call)


def is_torch(x) -> bool:
    if not _tensor_type:
        torch = torch_module()
        if torch is None:
            return False
        _tensor_type.append(torch.Tensor)
    return isinstance(x, _tensor_type[0])


def as_array(x, name: str):
    """x as a torch tensor or numpy array (zero-copy); TypeError naming `name` otherwise."""
    if is_torch(x) or isinstance(x, np.ndarray):
        return x
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError, ValueError) as error:  # (a dtype numpy lacks, such as bfloat16)
            raise TypeError(f"{name} cannot be read as a numpy array through DLPack: {error}") from None
    raise TypeError(
        f"{name} must be a torch tensor, a numpy array or an object with __dlpack__, got {type(x).__name__}"
    )


def is_tensor_subclass(x) -> bool:
    """A torch tensor of a subclass (FakeTensor, nn.Parameter, ...), not a plain torch.Tensor."""
    return is_torch(x) and type(x) is not _tensor_type[0]


def check_dense(x, name: str) -> None:
    """TypeError naming `name` for a torch tensor without strided storage (sparse layouts), which
    the kernels cannot read and torch cannot allocate an output like."""
    if is_torch(x) and x.layout is not torch_module().strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")


def last_dim_contiguous(x) -> bool:
    """Whether x's last dim is contiguous (stride one element; any stride for a size of 0 or 1)."""
    step = x.stride(-1) if is_torch(x) else x.strides[-1] // x.itemsize
    return x.shape[-1] <= 1 or step == 1


def is_floating(x) -> bool:
    """A torch tensor or numpy array of a floating-point dtype."""
    return x.is_floating_point() if is_torch(x) else np.issubdtype(x.dtype, np.floating)


def is_cuda(x) -> bool:
    """A torch tensor on a CUDA device (the CUDA kernels' inputs)."""
    return is_torch(x) and x.is_cuda


def autocast(arrays):
    """torch tensors as torch.autocast casts the inputs of ops such as SDPA: within an autocast
    region for their device, floating-point ones other than float64 to its dtype (None stays
    None); outside one, unchanged. (q, k from RoPE in fp32 beside a bf16 v were a TypeError.)"""
    torch = torch_module()
    device_type = "cuda" if arrays[0].is_cuda else "cpu"  # (x.device.type cost 0.25 µs more per call)
    if not torch.is_autocast_enabled(device_type):
        return arrays
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(x.to(dtype) if x is not None and x.is_floating_point() and x.dtype != torch.float64 else x
                 for x in arrays)


def check_same_device(arrays, names) -> None:
    """torch tensors (None skipped) all on the first one's device: ValueError naming the odd one.
    (The torch ops took a meta tensor among CPU ones to their fake kernels, whose outputs are
    uninitialised, and torch's in-place append wrote nothing from one.)"""
    device = arrays[0].device
    for x, name in zip(arrays, names):
        if x is not None and is_torch(x) and x.device != device:
            raise ValueError(f"{name} is on {x.device} but {names[0]} is on {device}")


def check_same_kind(arrays, names) -> None:
    """All torch tensors or none: a result has one kind, and torch ops take only tensors."""
    torch_flags = [is_torch(x) for x in arrays]
    if any(torch_flags) and not all(torch_flags):
        odd = names[torch_flags.index(not torch_flags[0])]
        kind = "a torch tensor" if torch_flags[0] else "not a torch tensor"
        raise TypeError(f"{odd} must be of the same kind as {names[0]} ({names[0]} is {kind})")


def is_compiling() -> bool:
    """True inside a torch.compile trace (never without torch)."""
    torch = torch_module()
    return torch is not None and torch.compiler.is_compiling()


def needs_op(*tensors) -> bool:
    """True where torch tensors must go through a torch.library op: inside a torch.compile or
    torch.jit.trace trace (a direct kernel call is invisible to the tracer: the traced function
    returned its output unfilled), or tensor subclasses (FakeTensor, DTensor, nn.Parameter)."""
    torch = torch_module()
    if torch.compiler.is_compiling() or torch._C._is_tracing():  # (what torch.jit.is_tracing asks, 60 ns sooner)
        return True
    for t in tensors:
        if type(t) is not torch.Tensor:
            return True
    return False


def torch_mode(*tensors) -> str:
    """How to run torch tensors: "op" (needs_op), "autograd" (eager with a gradient to record),
    or "direct" (eager, no gradient: the kernel is called with no dispatcher or autograd cost)."""
    torch = torch_module()
    if needs_op(*tensors):
        return "op"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "autograd"
    return "direct"


def check_no_grad(x, what: str) -> None:
    """Raises for torch inputs that would need a gradient through an inference-only function."""
    torch = torch_module()
    if is_torch(x) and torch.is_grad_enabled() and x.requires_grad:
        raise NotImplementedError(f"fusedattn: {what} has no backward; call it under torch.no_grad()")


def index_like(reference, indices: np.ndarray):
    """An integer index array usable to index arrays of reference's kind."""
    if is_torch(reference):
        return torch_module().as_tensor(np.asarray(indices, dtype=np.int64))
    return np.asarray(indices, dtype=np.int64)


def torch_ops():
    """The torch.library ops (registered on first use when torch was imported after fusedattn)."""
    from . import _torch_ops

    return _torch_ops


def check_rank(x, rank: int, name: str, dims: str) -> None:
    if x.ndim != rank:
        raise ValueError(f"{name} must be {rank}-D {dims}, got shape {tuple(x.shape)}")


def swap_seq_heads(x):
    """(b, s, h, d) <-> (b, h, s, d) as a view (never a copy)."""
    return x.transpose(1, 2) if is_torch(x) else x.swapaxes(1, 2)


def broadcast_view(x, shape):
    """x broadcast to `shape` as a view (stride 0 on broadcast dims, never a copy).

    Leading dims are added as needed; raises ValueError when x does not broadcast. Numpy views
    are made writeable-flagged (they are only read) so that any DLPack version exports them.
    """
    shape = tuple(int(s) for s in shape)
    if x.ndim > len(shape):
        raise ValueError(f"shape {tuple(x.shape)} has more dims than {shape}")
    if is_torch(x):
        return x.expand(shape)
    view = np.broadcast_to(x, shape)
    return np.lib.stride_tricks.as_strided(x, shape=view.shape, strides=view.strides, writeable=True)


def pad_last_dim(x, width: int):
    """x with its last dim zero-padded to `width` (a new contiguous array; x itself if it has
    that width already). torch pads through F.pad, so autograd and torch.compile follow it."""
    missing = width - x.shape[-1]
    if missing == 0:
        return x
    if is_torch(x):
        return torch_module().nn.functional.pad(x, (0, missing))
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, missing)])


def cut_last_dim(x, width: int):
    """The first `width` entries of x's last dim, contiguous (x itself if that is all of it)."""
    if x.shape[-1] == width:
        return x
    return x[..., :width].contiguous() if is_torch(x) else np.ascontiguousarray(x[..., :width])


def float64_contiguous(x):
    """A per-head parameter array (ALiBi slopes, sinks) as contiguous float64 (None stays None)."""
    if x is None:
        return None
    if is_torch(x):
        return x.detach().to(torch_module().float64).contiguous()
    return np.ascontiguousarray(x, dtype=np.float64)


def from_numpy_like(reference, array: np.ndarray):
    """array converted to reference's kind and dtype (and device, for torch)."""
    if is_torch(reference):
        return torch_module().from_numpy(np.ascontiguousarray(array)).to(dtype=reference.dtype, device=reference.device)
    return array.astype(reference.dtype)


def empty_like_kind(reference, shape, dtype=None):
    """An uninitialised array of reference's kind and device (dtype defaults to reference's)."""
    if is_torch(reference):
        torch = torch_module()
        if dtype is None and shape == reference.shape:  # (about 1 µs faster than torch.empty)
            return torch.empty_like(reference, memory_format=torch.contiguous_format)
        return torch.empty(shape, dtype=dtype or reference.dtype, device=reference.device)
    return np.empty(shape, dtype=dtype or reference.dtype)


def lse_dtype_of(reference):
    """The LSE dtype for inputs like reference: float32, or float64 for float64 inputs."""
    if is_torch(reference):
        torch = torch_module()
        return torch.float64 if reference.dtype == torch.float64 else torch.float32
    return np.float64 if reference.dtype == np.float64 else np.float32

