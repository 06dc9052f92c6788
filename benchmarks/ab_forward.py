"""A/B of CPU forward (and forward + backward) builds: two or more fusedattn installs timed call by
call, interleaved.

Starts one worker process per install (a directory holding a `fusedattn` package, e.g. made with
`pip install . --target DIR -Cbuild-dir=DIR-build`), then, for each case, asks the workers in
turn for one timed call, `--reps` rounds, and prints each build's median ms and its ratio to the
first build's. Cases: B×H×L×D, dtype and causal; `--backward` times forward + backward
(torch.autograd.grad of all three inputs) instead of the forward alone. Interleaving keeps the
machine's drift (other tenants, frequency) out of the comparison, as DESIGN.md asks.

    python benchmarks/ab_forward.py DIR_A DIR_B [...] [--reps N] [--backward]
        [--cases 1x8x2048x64-bfloat16,1x8x2048x128-bfloat16-causal,...]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES = ["1x8x2048x64-bfloat16", "1x8x2048x128-bfloat16-causal", "1x8x2048x128-float32", "1x8x2048x64-float32-causal"]


def parse_case(case: str) -> tuple[tuple[int, int, int, int], str, bool]:
    """'BxHxLxD-DTYPE[-causal]' -> ((B, H, L, D), dtype name, causal); ValueError if malformed."""
    parts = case.split("-")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "causal"):
        raise ValueError(f"{case!r} is not BxHxLxD-DTYPE[-causal]")
    dims = tuple(int(x) for x in parts[0].split("x"))
    if len(dims) != 4 or min(dims) < 1:
        raise ValueError(f"{case!r}: BxHxLxD must be four positive integers")
    if parts[1] not in ("float32", "bfloat16", "float16", "float64"):
        raise ValueError(f"{case!r}: DTYPE must be float32, bfloat16, float16 or float64")
    return dims, parts[1], len(parts) == 3


def worker(install: str, cases: list[str], backward: bool) -> None:
    """Builds the inputs of `cases`, then reads case names on stdin and answers each with the
    seconds of one call."""
    sys.path.insert(0, install)
    import torch

    import fusedattn

    inputs = {}
    for seed, case in enumerate(cases):
        (batch, heads, seqlen, head_dim), dtype, causal = parse_case(case)
        generator = torch.Generator().manual_seed(seed)
        qkv = [torch.randn(batch, heads, seqlen, head_dim, generator=generator).to(getattr(torch, dtype))
               for _ in range(3)]
        inputs[case] = (qkv, causal, torch.randn(qkv[0].shape, generator=generator).to(qkv[0].dtype))

    def call(case):
        qkv, causal, dout = inputs[case]
        if not backward:
            return fusedattn.attention(*qkv, causal=causal)
        leaves = [x.detach().requires_grad_() for x in qkv]
        return torch.autograd.grad(fusedattn.attention(*leaves, causal=causal), leaves, dout)

    for case in cases:
        call(case)  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        start = time.perf_counter()
        call(line.strip())
        print(time.perf_counter() - start, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("installs", nargs="+", help="directories that each hold a fusedattn package")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated (default {','.join(CASES)})")
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases = args.cases.split(",")
    try:
        for case in cases:
            parse_case(case)
    except ValueError as error:
        parser.error(str(error))
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    if args.worker:
        worker(args.installs[0], cases, args.backward)
        return 0
    extra = ["--cases", args.cases, *(["--backward"] if args.backward else [])]
    workers = {path: subprocess.Popen([sys.executable, __file__, "--worker", path, *extra], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True) for path in args.installs}
    for process in workers.values():
        if process.stdout.readline().strip() != "ready":
            raise SystemExit("ab_forward: a worker failed to start")
    print(f"{'forward + backward' if args.backward else 'forward'}, median ms of {args.reps} interleaved calls")
    for case in cases:
        times = {path: [] for path in workers}
        for _ in range(args.reps):
            for path, process in workers.items():
                process.stdin.write(case + "\n")
                process.stdin.flush()
                times[path].append(float(process.stdout.readline()))
        first = statistics.median(times[args.installs[0]])
        cells = [f"{path} {statistics.median(t) * 1e3:8.2f} ({statistics.median(t) / first:4.2f})"
                 for path, t in times.items()]
        print(f"{case:30s} | " + " | ".join(cells), flush=True)
    for process in workers.values():
        process.stdin.close()
        process.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
