"""A/B of CPU decode builds: two or more fusedattn installs timed call by call, interleaved.

This machine's read bandwidth drifts between about 45 and 80 GB/s over minutes, so decode
timings from separate runs cannot be compared. This script starts one worker process per
install (a directory holding a `fusedattn` package, e.g. made with
`pip install . --target DIR -Cbuild-dir=DIR-build`), then, for each case, asks the workers in
turn for one attention_with_kvcache call and times a torch.sum over as many bytes right after,
`--reps` rounds. It prints, per case, the median GB/s of K/V read of each build and its share
of the median torch.sum GB/s. Cases: the inference issue's decode shapes (B = 8, Hq = 32,
L = 4096, D = 128, Hkv 32 or 8, fp32 / bf16), contiguous and paged (pages of --page-size
rows, 16 by default, shuffled; a case ending in -inorder has its pages in address order, which reads the same bytes
in the same order as the contiguous cache, so it isolates what the paged path itself costs from
what the page order costs; one ending in -runs has runs of 8 adjacent pages in shuffled order, as
an allocator that hands out free pages in order leaves a cache after some churn; one ending in
-interleaved has page p of sequence b at p * B + b, as sequences that grew side by side leave a
pool). Set OMP_WAIT_POLICY=PASSIVE so idle workers' OpenMP threads do not
spin.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/ab_decode.py DIR_A DIR_B [...] [--reps N] [--cases ...]
        [--batch B --seqlen L] [--queries N] [--page-size P] [--heads HQ] [--head-major]

--batch / --seqlen change B and L (B = 1 with L = 32768 reads as many bytes as the default, the
key axis then split across the threads); --heads HQ sets the query heads (e.g. 64 with case
8-... for a GQA group of 8); --head-major stores the contiguous caches (B, Hkv, L, D), as Hugging
Face's caches are, and passes (B, L, Hkv, D) views; --queries N attends N new tokens per sequence
(speculative decoding), causal from the bottom right.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

HEADS, HEAD_DIM = 32, 128  # query heads by default (--heads), head_dim
RUN_PAGES = 8  # adjacent pages per run in the -runs cases
CASES = ["32-float32", "32-bfloat16", "8-float32", "8-bfloat16",
         "32-float32-paged", "32-bfloat16-paged", "8-float32-paged", "8-bfloat16-paged"]


ELEMENT_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


def case_bytes(case: str, batch: int, seqlen: int) -> int:
    heads_kv, dtype = case.split("-")[:2]
    return 2 * batch * seqlen * int(heads_kv) * HEAD_DIM * ELEMENT_BYTES[dtype]


def case_error(case: str, heads: int) -> str | None:
    """Why `case` is not HKV-DTYPE[-paged|-inorder|-runs|-interleaved] with HKV dividing `heads`, or None."""
    parts = case.split("-")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("paged", "inorder", "runs", "interleaved")) or not parts[0].isdigit():
        return f"{case!r} is not HKV-DTYPE[-paged|-inorder|-runs|-interleaved]"
    if int(parts[0]) < 1 or heads % int(parts[0]):
        return f"{case!r}: HKV must divide {heads}"
    if parts[1] not in ELEMENT_BYTES:
        return f"{case!r}: DTYPE must be one of {', '.join(ELEMENT_BYTES)}"
    return None


def worker(install: str, cases: list[str], batch: int, seqlen: int, queries: int, page: int, heads: int,
           head_major: bool) -> None:
    """Builds the inputs of `cases`, then reads case names on stdin and answers each with the GB/s
    of one decode call."""
    sys.path.insert(0, install)
    import torch

    import fusedattn
    from bench_decode import paged_copy  # (beside this script; its fusedattn is the install's)

    def make_inputs(case: str, seed: int):
        heads_kv, dtype_name = int(case.split("-")[0]), case.split("-")[1]
        dtype = getattr(torch, dtype_name)
        generator = torch.Generator().manual_seed(seed)
        q = torch.randn(batch, queries, heads, HEAD_DIM, generator=generator).to(dtype)
        if head_major:  # (B, Hkv, L, D) storage seen as (B, L, Hkv, D), as Hugging Face's caches
            k, v = (torch.randn(batch, heads_kv, seqlen, HEAD_DIM, generator=generator).to(dtype).transpose(1, 2)
                    for _ in range(2))
        else:
            k, v = (torch.randn(batch, seqlen, heads_kv, HEAD_DIM, generator=generator).to(dtype) for _ in range(2))
        kwargs = {}
        if case.endswith(("-paged", "-inorder", "-runs", "-interleaved")):
            pages = batch * seqlen // page
            if case.endswith("-paged"):
                order = torch.randperm(pages, generator=generator)
            elif case.endswith("-inorder"):
                order = torch.arange(pages)
            elif case.endswith("-interleaved"):  # page p of sequence b at p * batch + b
                order = torch.arange(pages).reshape(-1, batch).T.flatten()
            else:  # runs of RUN_PAGES adjacent pages, the runs shuffled
                runs = torch.randperm(pages // RUN_PAGES, generator=generator)
                order = (runs[:, None] * RUN_PAGES + torch.arange(RUN_PAGES)).flatten()
            table = order.to(torch.int32).reshape(batch, -1)
            k, v = paged_copy(k, v, page, table)
            kwargs["block_table"] = table
        return q, k, v, kwargs

    inputs = {case: make_inputs(case, seed) for seed, case in enumerate(cases)}
    seqlens = torch.full((batch,), seqlen, dtype=torch.int32)
    print("ready", flush=True)
    for line in sys.stdin:
        q, k, v, kwargs = inputs[line.strip()]
        start = time.perf_counter()
        fusedattn.attention_with_kvcache(q, k, v, cache_seqlens=seqlens, **kwargs)
        print(case_bytes(line.strip(), batch, seqlen) / (time.perf_counter() - start) / 1e9, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("installs", nargs="+", help="directories that each hold a fusedattn package")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated, HKV-DTYPE[-paged|-inorder|-runs|-interleaved] (default {','.join(CASES)})")
    parser.add_argument("--batch", type=int, default=8, help="sequences (default 8)")
    parser.add_argument("--seqlen", type=int, default=4096, help="cached tokens, a multiple of --page-size (default 4096)")
    parser.add_argument("--queries", type=int, default=1, help="new tokens per sequence (default 1)")
    parser.add_argument("--page-size", type=int, default=16, help="rows per page of the paged cases (default 16)")
    parser.add_argument("--heads", type=int, default=HEADS, help=f"query heads (default {HEADS})")
    parser.add_argument("--head-major", action="store_true",
                        help="contiguous caches stored (B, Hkv, L, D) and viewed as (B, L, Hkv, D)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.page_size < 1:
        parser.error("--page-size must be >= 1")
    if args.batch < 1 or args.seqlen < args.page_size or args.seqlen % args.page_size or not 1 <= args.queries <= args.seqlen:
        parser.error("--batch must be >= 1, --seqlen a positive multiple of --page-size, --queries in [1, seqlen]")
    if args.heads < 1:
        parser.error("--heads must be >= 1")
    errors = [e for e in (case_error(case, args.heads) for case in args.cases.split(",")) if e]
    if any(case.endswith("-runs") for case in args.cases.split(",")) and args.batch * args.seqlen // args.page_size % RUN_PAGES:
        errors.append(f"-runs cases need a page count (batch * seqlen / page size) that is a multiple of {RUN_PAGES}")
    if errors:
        parser.error("; ".join(errors))
    if args.worker:
        worker(args.installs[0], args.cases.split(","), args.batch, args.seqlen, args.queries, args.page_size,
               args.heads, args.head_major)
        return 0
    import torch

    shape = ["--batch", str(args.batch), "--seqlen", str(args.seqlen), "--queries", str(args.queries),
             "--page-size", str(args.page_size), "--heads", str(args.heads), "--cases", args.cases,
             *(["--head-major"] if args.head_major else [])]
    workers = {path: subprocess.Popen([sys.executable, __file__, "--worker", path, *shape], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True) for path in args.installs}
    for process in workers.values():
        if process.stdout.readline().strip() != "ready":
            raise SystemExit("ab_decode: a worker failed to start")
    for case in args.cases.split(","):
        same_bytes = torch.ones(case_bytes(case, args.batch, args.seqlen) // 4)
        rates = {path: [] for path in workers}
        sums = []
        for _ in range(args.reps):
            for path, process in workers.items():
                process.stdin.write(case + "\n")
                process.stdin.flush()
                rates[path].append(float(process.stdout.readline()))
            start = time.perf_counter()
            same_bytes.sum()
            sums.append(same_bytes.numel() * 4 / (time.perf_counter() - start) / 1e9)
        summed = statistics.median(sums)
        cells = [f"{path} {statistics.median(r):5.1f} ({statistics.median(r) / summed:4.0%})" for path, r in rates.items()]
        print(f"{case:18s} sum {summed:5.1f} GB/s | " + " | ".join(cells), flush=True)
    for process in workers.values():
        process.stdin.close()
        process.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
