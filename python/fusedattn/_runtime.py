"""Process-wide runtime settings: CPU thread count, CPU ISA selection, and the info() report.

The thread count follows ``torch.get_num_threads()`` when torch is imported (so fusedattn and
torch never oversubscribe the cores together), else the CPU count available to this process;
``set_num_threads`` overrides both. The CPU ISA is the best one the CPU supports, unless the
environment variable ``FUSEDATTN_CPU_ISA`` (read at import) forces one.
"""

from __future__ import annotations

import os
import sys

from . import _C
from ._arrays import torch_module

__all__ = ["get_num_threads", "set_num_threads", "cpu_isa", "info"]

_num_threads: int | None = None
_forced_isa: str | None = os.environ.get("FUSEDATTN_CPU_ISA") or None
_attached = [False]  # whether attach_torch_openmp() has run (once torch is loaded)
_AVAILABLE_ISAS = tuple(_C.available_isas())  # fixed for the process: read once, not per call


def get_num_threads() -> int:
    """Threads the CPU kernels use: set_num_threads' value, else torch's, else the CPU count.

    Once torch is loaded the kernels run on its OpenMP threads, whichever count is set (on
    fusedattn's own pool, whose threads sleep between calls, each call paid about 40 µs here to
    wake them, next to torch's spinning threads).
    """
    torch = torch_module()
    if torch is not None and not _attached[0]:
        _attached[0] = True
        attach_torch_openmp()
    if _num_threads is not None:
        return _num_threads
    if torch is not None:
        return max(1, torch.get_num_threads())
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def set_num_threads(num_threads: int | None) -> None:
    """Sets the CPU kernels' thread count; ``None`` goes back to following torch / the CPU count."""
    global _num_threads
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
    _num_threads = num_threads


def cpu_isa() -> str:
    """The CPU ISA the kernels run: FUSEDATTN_CPU_ISA when set (it must be available), else the best."""
    available = _AVAILABLE_ISAS
    if _forced_isa is None:
        return available[0]
    if _forced_isa not in available:
        raise ValueError(
            f"FUSEDATTN_CPU_ISA={_forced_isa!r} is not available on this machine; "
            f"available: {', '.join(available)}"
        )
    return _forced_isa


def attach_torch_openmp() -> str | None:
    """Makes the CPU kernels run on PyTorch's own OpenMP threads (Linux; torch imported).

    A second pool next to torch's would compete for the cores with torch's OpenMP workers,
    which spin for a while after every torch op. Returns the runtime's path, or None.
    """
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    except OSError:
        return None
    torch_dir = os.path.dirname(sys.modules["torch"].__file__) if "torch" in sys.modules else ""
    for path in sorted(paths, key=lambda p: not p.startswith(torch_dir)):  # torch's own runtime first
        if _C.use_openmp_runtime(path):
            return path
    return None


def _set_cpu_isa(name: str | None) -> None:
    """Forces a CPU ISA in this process (None = best available), as FUSEDATTN_CPU_ISA does. For tests."""
    global _forced_isa
    if name is not None and name not in _AVAILABLE_ISAS:
        raise ValueError(
            f"FUSEDATTN_CPU_ISA={name!r} is not available on this machine; available: {', '.join(_AVAILABLE_ISAS)}"
        )
    _forced_isa = name


def _cuda_report() -> dict:
    try:
        from . import _cuda
    except ImportError:
        return {"cuda_compiled": False, "gpus": []}
    gpus = []
    for device in range(_cuda.device_count()):
        try:
            gpus.append(_cuda.probe_device(device))
        except RuntimeError as error:
            gpus.append({"device": device, "error": str(error)})
    return {"cuda_compiled": True, "gpus": gpus}


def info(verbose: bool = True) -> dict:
    """Reports version, CPU ISA in use and available, thread count, CUDA build and GPUs.

    Prints the report when ``verbose`` (the default) and returns it as a dict.
    """
    from . import __version__

    report = {"version": __version__, "cpu_isas_available": list(_AVAILABLE_ISAS)}
    try:
        report["cpu_isa"] = cpu_isa()
    except ValueError as error:
        report["cpu_isa"] = f"error: {error}"
    report["num_threads"] = get_num_threads()
    report.update(_cuda_report())
    if verbose:
        print(f"fusedattn {report['version']}")
        print(f"  CPU ISA in use:     {report['cpu_isa']}")
        print(f"  CPU ISAs available: {', '.join(report['cpu_isas_available'])}")
        print(f"  threads:            {report['num_threads']}")
        print(f"  CUDA compiled:      {'yes' if report['cuda_compiled'] else 'no'}")
        if not report["gpus"]:
            print("  GPUs found:         none")
        for gpu in report["gpus"]:
            if "error" in gpu:
                print(f"  GPU {gpu['device']}: {gpu['error']}")
            else:
                print(
                    f"  GPU: {gpu['name']} (sm_{gpu['compute_capability']}, {gpu['multiprocessors']} SMs, "
                    f"{gpu['total_memory'] / 2**30:.0f} GiB; kernels from sm_{gpu['kernel_arch']})"
                )
    return report
