"""attention_with_kvcache in eager mode and under torch.compile(fullgraph=True), side by side.

One decode step that appends a token and attends (B = 8, Hq = 32, Hkv = 8, D = 128, a contiguous
bf16 cache of 4096 rows: 2 x 64 MiB), then doubles the output, as compiled model code would. The
compiled step goes through the fusedattn::attention_kvcache op, which writes the caches in place:
were they copied, the step would cost a copy of 128 MiB (several ms) more than eager. Then the
same step over a tiny cache (B 1, Hq 8, Hkv 2, D 64, 64 rows), whose time is the call's fixed
cost: what the compiled graph adds per call. For it, the op alone is timed too (called directly,
outside any compiled region: the dispatcher and the op's kernel, which is the eager function). Prints
the time per step (the best of 5 runs of 20 steps, or 2000 for the tiny cache, alternating eager,
compiled and, for the tiny cache, the op alone).

    python benchmarks/kvcache_compile.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import fusedattn
from fusedattn import _torch_kvcache  # noqa: F401  (registers the op that op_step calls)


def step(q, k_cache, v_cache, k, v, seqlens):
    return fusedattn.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens) * 2.0


def op_step(q, k_cache, v_cache, k, v, seqlens):
    """step's attention as the compiled graph calls it: the op (with step's defaults), then * 2."""
    out, _ = torch.ops.fusedattn.attention_kvcache.default(q, k_cache, v_cache, k, v, seqlens, None, None, None, None,
                                                          None, None, None, None, True, -1, -1, 0.0, True)
    return out * 2.0


def time_steps(device, batch, heads, heads_kv, head_dim, rows, steps, with_op=False) -> dict[str, float]:
    """Seconds per step, eager and compiled (and the op alone): the best of 5 runs of `steps`
    steps, alternating."""
    dtype = torch.bfloat16
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, 1, heads, head_dim, generator=generator).to(device, dtype)
    k, v = (torch.randn(batch, 1, heads_kv, head_dim, generator=generator).to(device, dtype) for _ in range(2))
    k_cache, v_cache = (torch.randn(batch, rows, heads_kv, head_dim, generator=generator).to(device, dtype)
                        for _ in range(2))
    seqlens = torch.full((batch,), rows - 96 if rows > 96 else rows - 1, dtype=torch.int32, device=device)
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    fns = {"eager": step, "compiled": compiled, **({"op alone": op_step} if with_op else {})}
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(5):
        for name, fn in fns.items():
            fn(q, k_cache, v_cache, k, v, seqlens)  # (warm-up; compiles on the first call)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                fn(q, k_cache, v_cache, k, v, seqlens)  # (the same slot each step)
            if device == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], (time.perf_counter() - start) / steps)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    large = time_steps(args.device, 8, 32, 8, 128, 4096, steps=20)
    tiny = time_steps(args.device, 1, 8, 2, 64, 64, steps=2000, with_op=True)
    print(f"fusedattn {fusedattn.__version__}, torch {torch.__version__}, {args.device}; decode step with append, "
          "bf16 cache, best of 5:")
    print("  B 8, Hq 32, Hkv 8, D 128, 4096 rows (ms per step):")
    for name, seconds in large.items():
        print(f"    {name:9s} {seconds * 1e3:8.3f}")
    print("  B 1, Hq 8, Hkv 2, D 64, 64 rows (µs per step):")
    for name, seconds in tiny.items():
        print(f"    {name:9s} {seconds * 1e6:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
