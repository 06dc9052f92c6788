"""Peak memory of one forward beyond its inputs and output: fusedattn needs O(L), not an L×L buffer.

For each L in 2048, 4096, 8192 and each implementation, a fresh Python subprocess imports torch and
fusedattn, warms the implementation up on a tiny shape (so libraries, thread pools and their stacks
exist), reads its peak RSS (getrusage ru_maxrss; in a fresh process this equals the current RSS),
allocates q, k, v of shape (1, 8, L, 64) fp32, runs one forward and reads the peak RSS again. The
increase minus the bytes of q, k, v and the output is what the call needed beyond its arguments.
One L×L fp32 score matrix per head would be L²·4 B (256 MiB at L = 8192) per head; fusedattn's
extra should stay small and grow at most linearly in L. torch SDPA and the naive matmul-softmax-
matmul (which materialises the (8, L, L) scores and probabilities) are measured for comparison.

    python benchmarks/memory_forward.py [--lengths 2048,4096,8192] [--impls fusedattn,torch-sdpa,naive-torch]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

BATCH, HEADS, HEAD_DIM = 1, 8, 64
FLOAT_BYTES = 4
MIB = 2**20


def peak_rss_bytes() -> int:
    """This process's peak resident set size (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def child(impl: str, seqlen: int) -> None:
    """Runs in the subprocess: measures one forward and prints one JSON line."""
    from fusedattn import bench

    torch = bench.require_torch()
    forward = bench.implementations(torch)[impl]
    forward(*bench.make_inputs(torch, (BATCH, HEADS, 128, HEAD_DIM), torch.float32), False)  # warm-up

    before = peak_rss_bytes()
    q, k, v = bench.make_inputs(torch, (BATCH, HEADS, seqlen, HEAD_DIM), torch.float32)
    out = forward(q, k, v, False)
    after = peak_rss_bytes()
    arguments = sum(x.numel() * x.element_size() for x in (q, k, v, out))
    print(json.dumps({"impl": impl, "seqlen": seqlen, "peak_increase": after - before,
                      "arguments": arguments, "beyond": after - before - arguments}))


def measure(impl: str, seqlen: int) -> dict:
    """Runs child(impl, seqlen) in a fresh interpreter and returns its result."""
    result = subprocess.run([sys.executable, __file__, "--child", impl, str(seqlen)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{impl} at L={seqlen} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def format_table(lengths, impls, results) -> str:
    header = ("L", "q,k,v,out MiB", "one L×L head MiB", *(f"{impl} beyond MiB" for impl in impls))
    lines = []
    for seqlen in lengths:
        by_impl = {impl: results[impl, seqlen] for impl in impls}
        arguments = by_impl[impls[0]]["arguments"]
        lines.append((str(seqlen), f"{arguments / MIB:.1f}", f"{seqlen * seqlen * FLOAT_BYTES / MIB:.0f}",
                      *(f"{by_impl[i]['beyond'] / MIB:.2f}" for i in impls)))
    from fusedattn.bench import aligned_table  # the parent process only formats; children measure

    return aligned_table(header, lines)


def comma_list(convert):
    return lambda text: [convert(item.strip()) for item in text.split(",")]


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]))
        return 0
    from fusedattn import bench

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=comma_list(int), default=[2048, 4096, 8192],
                        help="comma-separated sequence lengths (default 2048,4096,8192)")
    parser.add_argument("--impls", type=bench.parse_impls, default=list(bench.IMPLEMENTATIONS),
                        help=f"comma-separated implementations (default {','.join(bench.IMPLEMENTATIONS)})")
    args = parser.parse_args()
    bench.require_torch()

    results = {}
    for seqlen in args.lengths:
        for impl in args.impls:
            results[impl, seqlen] = measure(impl, seqlen)
            print(f"L={seqlen} {impl}: {results[impl, seqlen]['beyond'] / MIB:.2f} MiB beyond the arguments",
                  flush=True)
    print(f"\none forward, fp32, shape ({BATCH}, {HEADS}, L, {HEAD_DIM}), non-causal; 'beyond' = peak RSS increase "
          "during the call minus q, k, v and the output\n")
    print(format_table(args.lengths, args.impls, results))
    if "fusedattn" in args.impls:
        longest = max(args.lengths)
        score_matrix = longest * longest * FLOAT_BYTES
        print(f"\nfusedattn at L={longest}: {results['fusedattn', longest]['beyond'] / MIB:.2f} MiB beyond its "
              f"arguments; one L×L fp32 score matrix would be {score_matrix / MIB:.0f} MiB per head "
              f"({HEADS * score_matrix / MIB:.0f} MiB for all {HEADS})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
