"""Where a decode call's per-call overhead goes: the Python layer's pieces timed one by one.

A one-token decode over a 16-token cache (B = 1, one head, D = 8, torch tensors), the case
bench_decode.py's "per-call overhead" line times, is mostly fixed cost. This script times the
whole `fusedattn.attention_with_kvcache` call, the extension call alone with arguments prepared
once, and the Python steps in between (validation in `_Call`, the index conversion, the output
allocation), each alone in a loop (bench.per_call_us: medians of 7 batches), µs per call. The pieces overlap a little
(each is timed with its own call overhead), so they do not add up exactly.

--cold times each piece once right after a torch.sum over 256 MiB, which leaves the caches cold
as a model's other layers do between its attention calls (and bench_decode.py's torch.sum
between its contenders' calls): the median of --rounds such calls. Cold, the pieces overlap
more (each pays for the interpreter's own code coming back), so --cold also times the whole
call with each Python step in turn replaced by a stand-in that returns its result at once:
the difference is what that step adds to a cold call.

    python benchmarks/call_overhead_parts.py [--cold [--rounds 30]]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fusedattn
from fusedattn import _arrays, _C, _runtime, bench, functional, inference


def cold_us(pieces, rounds: int) -> dict[str, float]:
    """Median µs of each piece called once after a 256 MiB torch.sum, over `rounds` rounds."""
    flush = torch.ones(64 * 1024 * 1024)
    times = {name: [] for name in pieces}
    for _ in range(rounds):
        for name, piece in pieces.items():
            flush.sum()
            start = time.perf_counter()
            piece()
            times[name].append(time.perf_counter() - start)
    return {name: 1e6 * statistics.median(t) for name, t in times.items()}


def cold_without_us(whole, stand_ins, rounds: int) -> dict[str, float]:
    """Median µs of `whole` called once after a 256 MiB torch.sum, as it is and with each of
    stand_ins (name -> (module, attribute, stand-in)) patched in turn, over `rounds` rounds."""
    flush = torch.ones(64 * 1024 * 1024)
    times = {name: [] for name in ("as it is", *stand_ins)}
    for _ in range(rounds):
        for name in times:
            module, attribute, stand_in = stand_ins.get(name, (None, None, None))
            original = getattr(module, attribute) if module is not None else None
            if module is not None:
                setattr(module, attribute, stand_in)
            try:
                whole()  # (warm: the stand-in's own first call)
                flush.sum()
                start = time.perf_counter()
                whole()
                times[name].append(time.perf_counter() - start)
            finally:
                if module is not None:
                    setattr(module, attribute, original)
    return {name: 1e6 * statistics.median(t) for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", action="store_true", help="each piece once after a torch.sum over 256 MiB")
    parser.add_argument("--rounds", type=int, default=30, help="cold rounds (default 30)")
    args = parser.parse_args()
    q, k, v = torch.randn(1, 1, 1, 8), torch.randn(1, 16, 1, 8), torch.randn(1, 16, 1, 8)
    seqlens = torch.tensor([16], dtype=torch.int32)
    out = torch.empty_like(q)
    variant = (8**-0.5, True, 0, -1, -1, 0.0, None, None, None, 0.0, 0, 0)
    isa, threads = _runtime.cpu_isa(), _runtime.get_num_threads()
    names = ("q", "k_cache", "v_cache")
    bhsd = [x.transpose(1, 2).contiguous() for x in (q, k, v)]

    def new_call():
        return functional._Call(q, k, v, layout="bshd", names=names, causal=True, scale=None, q_offset=0,
                                window=(-1, -1), alibi_slopes=None, softcap=0.0, sinks=None)

    pieces = {
        "attention_with_kvcache (whole call)": lambda: fusedattn.attention_with_kvcache(q, k, v, cache_seqlens=seqlens),
        "  extension call alone (_C.attention_kvcache_forward)":
            lambda: _C.attention_kvcache_forward(q, k, v, out, None, seqlens, None, None, None, None, None, variant, isa,
                                                 threads),
        "  _Call (validation, variant)": new_call,
        "  _int32(cache_seqlens)": lambda: inference._int32(seqlens, "cache_seqlens", q),
        "  _check_cache_geometry": lambda: inference._check_cache_geometry(q, k, v, None, None, None),
        "  empty_like_kind (out)": lambda: _arrays.empty_like_kind(q, q.shape),
        "  cpu_isa() + get_num_threads()": lambda: (_runtime.cpu_isa(), _runtime.get_num_threads()),
        "torch SDPA, (b, h, s, d) tensors (for scale)": lambda: torch.nn.functional.scaled_dot_product_attention(*bhsd),
    }
    if args.cold:
        print(f"fusedattn {fusedattn.__version__}, torch {torch.__version__}; µs per call with cold caches, "
              f"median of {args.rounds}")
        timed = cold_us(pieces, args.rounds)
    else:
        print(f"fusedattn {fusedattn.__version__}, torch {torch.__version__}; µs per call, median of 7 batches")
        timed = bench.per_call_us(pieces, reps=20000)
    for name, us in timed.items():
        print(f"  {name:55s}{us:7.2f}")
    if args.cold:  # what each Python step adds to a cold call
        built, table = new_call(), inference._int32(seqlens, "cache_seqlens", q)
        stand_ins = {
            "_Call": (inference, "_Call", lambda *a, **kw: built),
            "_int32": (inference, "_int32", lambda *a: table),
            "_check_cache_geometry": (inference, "_check_cache_geometry", lambda *a: None),
            "cpu_isa()": (_runtime, "cpu_isa", lambda: isa),
            "get_num_threads()": (_runtime, "get_num_threads", lambda: threads),
            "empty_like_kind (out)": (_arrays, "empty_like_kind", lambda *a: out),
        }
        whole = cold_without_us(lambda: fusedattn.attention_with_kvcache(q, k, v, cache_seqlens=seqlens), stand_ins,
                                args.rounds)
        base = whole.pop("as it is")
        print(f"  the whole call with one step replaced by a stand-in (base {base:.1f} µs): the step adds")
        for name, us in whole.items():
            print(f"    {name:53s}{base - us:7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
