"""The machine's peaks, measured in the run (never hard-coded): GEMM FLOP/s and read bandwidth.

GEMM: the fastest 2048² fp32 GEMM torch runs on the CPU, timed with torch.matmul (MKL) and
oneDNN (torch's mkldnn linear, which unlike MKL uses AVX-512 on AMD CPUs): best of a few at the
start and one more after each FLOP-counted case, so a busy moment does not deflate it. On the
CPU every row, bf16 too, is compared with the fp32 peak (so oneDNN's bf16 dot-product GEMMs can
exceed 100%). On a GPU: an 8192² torch.matmul per dtype (fp32 with TF32 off, bf16, fp16), each
row compared with its own dtype's.

Bandwidth: a torch.sum over a 1 GiB fp32 tensor (256 MiB with --quick): bytes read / time, best
of the run. A copy of half of it into the other half (read + write) is reported alongside.
"""

from __future__ import annotations

import math
import time
from typing import Callable

GEMM_SIZE = 2048
CUDA_GEMM_SIZE = 8192


def gemm_calls(torch, size=GEMM_SIZE) -> dict[str, Callable]:
    """fp32 (size × size) GEMMs by name, each run once (warm-up): torch.matmul, and oneDNN if present."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    calls = {"torch.matmul": lambda: torch.matmul(a, b)}
    try:  # a private torch entry point, so skipped when a torch version lacks it
        a_dnn, b_dnn = a.to_mkldnn(), b.to_mkldnn()

        def onednn():
            return torch._C._nn.mkldnn_linear(a_dnn, b_dnn, None)  # a @ b.T

        calls["onednn"] = onednn
        onednn()
    except (AttributeError, RuntimeError):
        calls.pop("onednn", None)
    calls["torch.matmul"]()
    return calls


def measure_gemm_peaks(calls, reps, previous=None, *, size=GEMM_SIZE, sync=None) -> dict[str, float]:
    """{GEMM name: GFLOP/s of its best of `reps` calls}, each at least its value in `previous`."""
    sync = sync or (lambda: None)
    peaks = dict(previous or {})
    for name, call in calls.items():
        best = math.inf
        for _ in range(reps):
            start = time.perf_counter()
            call()
            sync()
            best = min(best, time.perf_counter() - start)
        peaks[name] = max(peaks.get(name, 0.0), 2.0 * size**3 / best / 1e9)
    return peaks


def describe_peaks(peaks: dict[str, float], size=GEMM_SIZE, dtype="fp32") -> str:
    """'measured fp32 GEMM peak: 459.3 GFLOP/s (onednn; torch.matmul 216.0), 2048², best of the run'."""
    best = max(peaks, key=peaks.get)
    others = "; ".join(f"{name} {value:.1f}" for name, value in peaks.items() if name != best)
    return (f"measured {dtype} GEMM peak: {peaks[best]:.1f} GFLOP/s ({best}{'; ' + others if others else ''}), "
            f"{size}², best of the run")


def cuda_gemm_calls(torch) -> dict[str, dict[str, Callable]]:
    """{dtype name: {'torch.matmul': call}} for 8192² GEMMs on the current GPU (fp32 without TF32)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    calls = {}
    for name in ("float32", "bfloat16", "float16"):
        a = torch.randn(CUDA_GEMM_SIZE, CUDA_GEMM_SIZE, device="cuda", dtype=getattr(torch, name))
        b = torch.randn_like(a)
        calls[name] = {"torch.matmul": lambda a=a, b=b: torch.matmul(a, b)}
        calls[name]["torch.matmul"]()
    torch.cuda.synchronize()
    return calls


class Peaks:
    """GEMM GFLOP/s per dtype and read GB/s of this machine, best of the run so far."""

    def __init__(self, torch, device: str = "cpu", quick: bool = False):
        self.torch, self.device = torch, device
        self.sync = torch.cuda.synchronize if device == "cuda" else None
        if device == "cuda":
            self.gemm_size = CUDA_GEMM_SIZE
            self._gemms = cuda_gemm_calls(torch)
        else:
            self.gemm_size = GEMM_SIZE
            self._gemms = {"float32": gemm_calls(torch)}
        self.gemm = {dtype: measure_gemm_peaks(calls, 3 if quick else 5, size=self.gemm_size, sync=self.sync)
                     for dtype, calls in self._gemms.items()}
        numel = (64 if quick else 256) * 2**20  # fp32: 256 MiB or 1 GiB
        self._data = torch.ones(numel, device=device)
        self.bandwidth_bytes = self._data.numel() * self._data.element_size()
        self.read_gbs = 0.0
        self.copy_gbs = 0.0
        self.refresh_bandwidth(reps=3 if quick else 5)

    def refresh_gemm(self, reps: int = 1) -> None:
        for dtype, calls in self._gemms.items():
            self.gemm[dtype] = measure_gemm_peaks(calls, reps, self.gemm[dtype], size=self.gemm_size, sync=self.sync)

    def refresh_bandwidth(self, reps: int = 1) -> None:
        data, half = self._data, self._data.numel() // 2
        sync = self.sync or (lambda: None)
        data.sum()  # warm-up (first touch of the pages, thread start)
        sync()
        for _ in range(reps):
            start = time.perf_counter()
            data.sum()
            sync()
            self.read_gbs = max(self.read_gbs, self.bandwidth_bytes / (time.perf_counter() - start) / 1e9)
            start = time.perf_counter()
            data[half:].copy_(data[:half])
            sync()
            self.copy_gbs = max(self.copy_gbs, self.bandwidth_bytes / (time.perf_counter() - start) / 1e9)

    def flops(self, dtype: str) -> float:
        """GFLOP/s that rows of `dtype` are compared with: that dtype's GEMM peak, else fp32's."""
        peaks = self.gemm.get(dtype, self.gemm["float32"])
        return max(peaks.values())

    def lines(self) -> list[str]:
        """Human-readable description of every measured peak."""
        lines = [describe_peaks(peaks, self.gemm_size, dtype) for dtype, peaks in self.gemm.items()]
        lines.append(f"measured read bandwidth: {self.read_gbs:.1f} GB/s (torch.sum over "
                     f"{self.bandwidth_bytes / 2**30:g} GiB fp32, best of the run); copy (read + write): "
                     f"{self.copy_gbs:.1f} GB/s")
        return lines

    def as_dict(self) -> dict:
        return {
            "gemm_gflops": self.gemm,
            "gemm_size": self.gemm_size,
            "fp32_gemm_peak_gflops": max(self.gemm["float32"].values()),
            "read_gbs": self.read_gbs,
            "copy_gbs": self.copy_gbs,
            "bandwidth_bytes": self.bandwidth_bytes,
        }

    def release(self) -> None:
        """Frees the bandwidth buffer (1 GiB) and the GEMM operands."""
        self._data = None
        self._gemms = {}
