"""attention_with_kvcache in eager mode and under torch.compile(fullgraph=True), side by side.

One decode step that appends a token and attends (B = 8, Hq = 32, Hkv = 8, D = 128, a contiguous
bf16 cache of 4096 rows: 2 x 64 MiB), then doubles the output, as compiled model code would. The
compiled step goes through the fusedattn::attention_kvcache op, which writes the caches in place:
were they copied, the step would cost a copy of 128 MiB (several ms) more than eager. Prints ms
per step (the best of 5 runs of 20 steps each, alternating eager and compiled).

    python benchmarks/kvcache_compile.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import fusedattn


def step(q, k_cache, v_cache, k, v, seqlens):
    return fusedattn.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens) * 2.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    device, dtype = args.device, torch.bfloat16
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(8, 1, 32, 128, generator=generator).to(device, dtype)
    k, v = (torch.randn(8, 1, 8, 128, generator=generator).to(device, dtype) for _ in range(2))
    k_cache, v_cache = (torch.randn(8, 4096, 8, 128, generator=generator).to(device, dtype) for _ in range(2))
    seqlens = torch.full((8,), 4000, dtype=torch.int32, device=device)  # the same slot each step
    compiled = torch.compile(step, fullgraph=True)
    best = {"eager": float("inf"), "compiled": float("inf")}
    for _ in range(5):
        for name, fn in (("eager", step), ("compiled", compiled)):
            fn(q, k_cache, v_cache, k, v, seqlens)  # (warm-up; compiles on the first call)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(20):
                fn(q, k_cache, v_cache, k, v, seqlens)
            if device == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], (time.perf_counter() - start) / 20 * 1e3)
    print(f"fusedattn {fusedattn.__version__}, torch {torch.__version__}, {device}; decode step with append, "
          "B 8, Hq 32, Hkv 8, D 128, bf16 cache of 4096 rows, ms per step (best of 5):")
    for name, ms in best.items():
        print(f"  {name:9s} {ms:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
