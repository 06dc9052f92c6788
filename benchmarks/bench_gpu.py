"""GPU benchmark of the CUDA backend: forward vs torch SDPA's flash, efficient and cuDNN backends,
and KV-cache decode vs the measured memory bandwidth. Prints a compact table last.

Forward: hidden 2048 (heads = 2048 / head_dim), head_dim 64 and 128, (batch, seqlen) from
(32, 512) to (1, 16384) with batch·seqlen = 16k, causal and not, bf16 (FlashAttention's grid).
TFLOP/s = 4·B·H·L²·D / time, halved when causal. Implementations are timed interleaved
(A B C D A B C D …, CUDA events, medians), after warm-up; max |fusedattn - SDPA| is printed
as a sanity column. Varlen: 16k packed tokens in sequences of 64..4096 (fixed draw), causal,
against SDPA on the same sequences zero-padded to the longest (what varlen saves); TFLOP/s of
the real tokens. Decode: one query token per sequence (GQA 32/8, head_dim 128, bf16) over a
contiguous or paged cache: GB/s of K/V read against a large device-to-device copy (bytes read
plus written), the machine's measured bandwidth. fusedattn runs first in a subprocess smoke
test; if that crashes, only the baselines are timed.

    python benchmarks/bench_gpu.py [--reps 10] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch

from fusedattn import _cuda_backend as backend

HIDDEN = 2048
FORWARD_SHAPES = [(32, 512), (16, 1024), (8, 2048), (4, 4096), (2, 8192), (1, 16384)]
# (batch, heads, heads_kv, cache length, head_dim, page_size or 0 for a contiguous cache)
DECODE_SHAPES = [(1, 32, 8, 16384, 128, 0), (8, 32, 8, 8192, 128, 0), (32, 32, 8, 4096, 128, 0),
                 (64, 32, 8, 2048, 128, 0), (8, 32, 8, 8192, 128, 16), (32, 32, 8, 4096, 128, 256)]


def varlen_lengths(total: int = 16384) -> list:
    """Sequence lengths of 64..4096 summing to `total` (a fixed draw)."""
    draw, lengths = random.Random(0), []
    while sum(lengths) < total:
        lengths.append(draw.randint(64, 4096))
    lengths[-1] -= sum(lengths) - total
    return lengths


def packed(x):
    """(total, heads, d) as the (1, heads, total, d) view the CUDA module reads."""
    return x[None].transpose(1, 2)


def variant(scale, causal):
    return (scale, causal, 0, -1, -1, 0.0, None, None, None, 0.0, 0, 0)


def time_interleaved(calls: dict, reps: int, warmup: int = 3, inner: int = 1) -> dict:
    """Median milliseconds of each call, measured A B C A B C … with CUDA events; each sample
    times `inner` back-to-back calls (for microsecond kernels, so launch gaps do not dominate)."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    samples = {name: [] for name in calls}
    for _ in range(reps):
        for name, fn in calls.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end) / inner)
    return {name: statistics.median(values) for name, values in samples.items()}


def sdpa_backends() -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {}
    for name, kind in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                       ("cudnn", getattr(SDPBackend, "CUDNN_ATTENTION", None))):
        if kind is None:
            continue

        def run(q, k, v, causal, kind=kind):
            with sdpa_kernel(kind):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

        backends[name] = run
    return backends


def measure_bandwidth() -> float:
    """GB/s of a 4 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(2**31, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = time_interleaved({"copy": lambda: dst.copy_(src)}, reps=10)["copy"]
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def forward_rows(reps: int, with_fusedattn: bool, quick: bool) -> list:
    rows = []
    baselines = sdpa_backends()
    shapes = FORWARD_SHAPES[::2] if quick else FORWARD_SHAPES
    for head_dim in (64, 128):
        heads = HIDDEN // head_dim
        for causal in (False, True):
            for batch, seqlen in shapes:
                q, k, v = (torch.randn(batch, heads, seqlen, head_dim, dtype=torch.bfloat16, device="cuda")
                           for _ in range(3))
                out = torch.empty_like(q)
                flops = 4 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
                calls = {}
                if with_fusedattn:
                    calls["fusedattn"] = lambda: backend.forward(q, k, v, out, None, variant(head_dim**-0.5, causal))
                for name, fn in baselines.items():
                    try:
                        fn(q, k, v, causal)
                        calls[name] = lambda fn=fn: fn(q, k, v, causal)
                    except RuntimeError:  # backend unavailable for this shape / build
                        pass
                ms = time_interleaved(calls, reps)
                row = {"head_dim": head_dim, "causal": causal, "batch": batch, "seqlen": seqlen,
                       "tflops": {name: flops / (t * 1e-3) / 1e12 for name, t in ms.items()}, "ms": ms}
                if with_fusedattn and "flash" in calls:
                    expected = baselines["flash"](q, k, v, causal)
                    row["max_abs_diff"] = (out.float() - expected.float()).abs().max().item()
                rows.append(row)
                del q, k, v, out
    return rows


def varlen_rows(reps: int, with_fusedattn: bool) -> list:
    rows = []
    baselines = sdpa_backends()
    lengths = varlen_lengths()
    longest, total = max(lengths), sum(lengths)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device="cuda")
    for head_dim in (64, 128):
        heads = HIDDEN // head_dim
        q, k, v = (torch.randn(total, heads, head_dim, dtype=torch.bfloat16, device="cuda") for _ in range(3))
        out = torch.empty_like(q)
        # The same sequences zero-padded to the longest, (batch, heads, longest, d): causal top-left is
        # bottom-right for Lq = Lk, and padding after the real keys is never seen by real rows.
        padded = [torch.zeros(len(lengths), heads, longest, head_dim, dtype=torch.bfloat16, device="cuda")
                  for _ in range(3)]
        for b, (start, length) in enumerate(zip(cu.tolist(), lengths)):
            for dst, src in zip(padded, (q, k, v)):
                dst[b, :, :length] = src[start:start + length].transpose(0, 1)
        flops = sum(4 * heads * length * length * head_dim / 2 for length in lengths)
        calls = {}
        if with_fusedattn:
            calls["fusedattn"] = lambda: backend.varlen_forward(packed(q), packed(k), packed(v), packed(out), None, cu,
                                                                cu, longest, variant(head_dim**-0.5, True))
        for name, fn in baselines.items():
            try:
                fn(*padded, True)
                calls[name] = lambda fn=fn: fn(*padded, True)
            except RuntimeError:
                pass
        ms = time_interleaved(calls, reps)
        rows.append({"head_dim": head_dim, "sequences": len(lengths), "longest": longest, "total": total,
                     "tflops": {name: flops / (t * 1e-3) / 1e12 for name, t in ms.items()}, "ms": ms})
        del q, k, v, out, padded
    return rows


def decode_rows(reps: int, with_fusedattn: bool, bandwidth: float) -> list:
    rows = []
    for batch, heads, heads_kv, length, head_dim, page_size in DECODE_SHAPES:
        dtype = torch.bfloat16
        q = torch.randn(batch, heads, 1, head_dim, dtype=dtype, device="cuda")
        out = torch.empty_like(q)
        lengths = torch.full((batch,), length, dtype=torch.int32, device="cuda")
        if page_size:
            pages = batch * length // page_size
            k_cache = torch.randn(pages, page_size, heads_kv, head_dim, dtype=dtype, device="cuda")
            table = torch.randperm(pages, device="cuda").reshape(batch, -1).to(torch.int32)
        else:
            k_cache = torch.randn(batch, length, heads_kv, head_dim, dtype=dtype, device="cuda")
            table = None
        v_cache = torch.randn_like(k_cache)
        kv_bytes = 2 * batch * length * heads_kv * head_dim * dtype.itemsize
        calls = {}
        if with_fusedattn:
            calls["fusedattn"] = lambda: backend.kvcache_forward(
                q, k_cache.transpose(1, 2), v_cache.transpose(1, 2), out, None, lengths,
                variant(head_dim**-0.5, True), block_table=table)
        if not page_size:  # SDPA on the contiguous cache (GQA by enable_gqa)
            kt, vt = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
            calls["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, kt, vt, enable_gqa=True)
        ms = time_interleaved(calls, reps, inner=20)
        gbs = {name: kv_bytes / (t * 1e-3) / 1e9 for name, t in ms.items()}
        rows.append({"batch": batch, "heads": heads, "heads_kv": heads_kv, "length": length, "head_dim": head_dim,
                     "page_size": page_size, "gbs": gbs, "ms": ms, "percent_of_copy": {n: 100 * g / bandwidth for n, g in gbs.items()}})
        del k_cache, v_cache
    return rows


def smoke() -> None:
    """One call of each fusedattn CUDA path, checked against SDPA (run in a subprocess)."""
    for head_dim in (64, 128):
        for causal in (False, True):
            q, k, v = (torch.randn(2, 4, 300, head_dim, dtype=torch.bfloat16, device="cuda") for _ in range(3))
            out = torch.empty_like(q)
            backend.forward(q, k, v, out, None, variant(head_dim**-0.5, causal))
            expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
            torch.cuda.synchronize()
            err = (out.float() - expected.float()).abs().max().item()
            print(f"smoke forward d{head_dim} causal={causal}: max |diff| vs SDPA {err:.3g}")
    lengths = [300, 1, 77]
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(sum(lengths), 4, 64, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    out = torch.empty_like(q)
    backend.varlen_forward(packed(q), packed(k), packed(v), packed(out), None, cu, cu, max(lengths),
                           variant(64**-0.5, True))
    err = 0.0
    for start, length in zip(cu.tolist(), lengths):
        rows = slice(start, start + length)
        expected = torch.nn.functional.scaled_dot_product_attention(*(x[rows].transpose(0, 1) for x in (q, k, v)),
                                                                    is_causal=True)
        err = max(err, (out[rows].transpose(0, 1).float() - expected.float()).abs().max().item())
    torch.cuda.synchronize()
    print(f"smoke varlen d64 causal: max |diff| vs SDPA per sequence {err:.3g}")
    k_cache = torch.randn(2, 1000, 2, 128, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(2, 8, 1, 128, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    backend.kvcache_forward(q, k_cache.transpose(1, 2), k_cache.transpose(1, 2), out, None,
                            torch.full((2,), 1000, dtype=torch.int32, device="cuda"), variant(128**-0.5, True))
    torch.cuda.synchronize()
    print("smoke decode: ok")


def table(forward: list, varlen: list, decode: list, bandwidth: float, fused_ok: bool) -> str:
    lines = [f"GPU: {torch.cuda.get_device_name()}   torch {torch.__version__}   copy bandwidth {bandwidth:.0f} GB/s"]
    if not fused_ok:
        lines.append("fusedattn CRASHED in the smoke test: baselines only")
    names = ["fusedattn", "flash", "efficient", "cudnn"]
    lines.append("forward bf16, hidden 2048, TFLOP/s (4·B·H·L²·D, /2 causal)")
    lines.append(f"{'d':>4} {'causal':>6} {'BxL':>9} " + " ".join(f"{n:>9}" for n in names) + f" {'vs best':>8} {'|Δ|':>8}")
    for r in forward:
        t = r["tflops"]
        best = max((t[n] for n in names[1:] if n in t), default=0.0)
        ratio = f"{t['fusedattn'] / best:8.2f}" if "fusedattn" in t and best else f"{'-':>8}"
        diff = f"{r['max_abs_diff']:8.1e}" if "max_abs_diff" in r else f"{'-':>8}"
        lines.append(f"{r['head_dim']:>4} {('yes' if r['causal'] else 'no'):>6} {r['batch']:>3}x{r['seqlen']:<5} " +
                     " ".join(f"{t[n]:9.1f}" if n in t else f"{'-':>9}" for n in names) + f" {ratio} {diff}")
    if varlen:
        r = varlen[0]
        lines.append(f"varlen bf16 causal, {r['total']} tokens in {r['sequences']} sequences (longest {r['longest']}), "
                     "TFLOP/s of the real tokens; SDPA on the zero-padded batch")
        lines.append(f"{'d':>4} " + " ".join(f"{n:>9}" for n in names) + f" {'vs best':>8}")
        for r in varlen:
            t = r["tflops"]
            best = max((t[n] for n in names[1:] if n in t), default=0.0)
            ratio = f"{t['fusedattn'] / best:8.2f}" if "fusedattn" in t and best else f"{'-':>8}"
            lines.append(f"{r['head_dim']:>4} " + " ".join(f"{t[n]:9.1f}" if n in t else f"{'-':>9}" for n in names) +
                         f" {ratio}")
    lines.append(f"decode bf16, 1 query token, GB/s of K/V read (% of the copy bandwidth)")
    lines.append(f"{'B':>4} {'Hq/Hkv':>7} {'L':>6} {'d':>4} {'cache':>10} {'fusedattn':>16} {'sdpa':>16}")
    for r in decode:
        cache = f"paged {r['page_size']}" if r["page_size"] else "contiguous"
        cells = [f"{r['gbs'][n]:7.0f} ({r['percent_of_copy'][n]:3.0f}%)" if n in r["gbs"] else "-"
                 for n in ("fusedattn", "sdpa")]
        lines.append(f"{r['batch']:>4} {r['heads']:>3}/{r['heads_kv']:<3} {r['length']:>6} {r['head_dim']:>4} {cache:>10} "
                     f"{cells[0]:>16} {cells[1]:>16}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="every other forward shape")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="directory for bench_gpu.json")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: torch sees no CUDA GPU", file=sys.stderr)
        return 2
    if args.smoke:
        smoke()
        return 0
    probe = subprocess.run([sys.executable, __file__, "--smoke"], capture_output=True, text=True, timeout=300)
    print(probe.stdout + probe.stderr[-3000:])
    fused_ok = probe.returncode == 0
    started = time.time()
    bandwidth = measure_bandwidth()
    forward = forward_rows(args.reps, fused_ok, args.quick)
    varlen = varlen_rows(args.reps, fused_ok)
    decode = decode_rows(args.reps, fused_ok, bandwidth)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_gpu.json"), "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "bandwidth_gbs": bandwidth,
                       "fusedattn_ok": fused_ok, "forward": forward, "varlen": varlen, "decode": decode}, f, indent=1)
    print(f"(benchmark took {time.time() - started:.0f} s)")
    print(table(forward, varlen, decode, bandwidth, fused_ok))
    return 0 if fused_ok else 1


if __name__ == "__main__":
    sys.exit(main())
