"""Microseconds per call of small attention calls, where thread wake-ups and per-call overhead
weigh as much as the kernels: one decode token (B = 1, 32 query heads, 8 kv heads, D = 128)
against caches of 16 to 4096 tokens, and causal prefills of 32 and 128 tokens (B = 1, 8 heads,
D = 64), with numpy arrays (no torch in the process: fusedattn's own thread pool) or torch
tensors (torch's OpenMP threads). Each figure is fusedattn.bench.per_call_us's median of 7
timed batches.

    python benchmarks/small_calls.py [--arrays numpy|torch] [--threads N]

Run it once per install to compare builds (e.g. PYTHONPATH=DIR for an install made with
`pip install . --target DIR`); the machine's state drifts, so compare runs made close together.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

DECODE_LENGTHS = (16, 64, 256, 1024, 4096)
PREFILL_LENGTHS = (32, 128)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arrays", choices=["numpy", "torch"], default="numpy")
    parser.add_argument("--threads", type=int, default=2, help="fusedattn threads (default 2)")
    args = parser.parse_args()
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.arrays == "torch":
        import torch

        convert = torch.from_numpy
    else:
        convert = np.asarray
    import fusedattn
    from fusedattn import bench

    fusedattn.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"fusedattn {fusedattn.__version__}, {args.arrays} arrays, {args.threads} threads, fp32; "
          "µs per call (median of 7 batches)\n")
    print("| call | µs |")
    print("|---|---:|")
    for length in DECODE_LENGTHS:
        q = convert(rng.standard_normal((1, 1, 32, 128), dtype=np.float32))
        k, v = (convert(rng.standard_normal((1, length, 8, 128), dtype=np.float32)) for _ in range(2))
        call = {"decode": lambda: fusedattn.attention_with_kvcache(q, k, v, cache_seqlens=length)}
        us = bench.per_call_us(call, 2000 if length < 1024 else 300)["decode"]
        print(f"| decode, 1 token, L {length} | {us:.1f} |")
    for length in PREFILL_LENGTHS:
        q = convert(rng.standard_normal((1, length, 8, 64), dtype=np.float32))
        call = {"prefill": lambda: fusedattn.attention(q, q, q, layout="bshd", causal=True)}
        us = bench.per_call_us(call, 1000)["prefill"]
        print(f"| causal prefill, {length} tokens | {us:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
