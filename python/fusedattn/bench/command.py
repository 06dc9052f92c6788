"""`fusedattn bench`: the options, the default cases of each suite, and the run itself."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .. import _runtime
from .common import DTYPES, SHORT_DTYPES, load_average, machine_line, require_torch, positive_int, versions_line
from .forward import GPU_IMPLEMENTATIONS, IMPLEMENTATIONS
from .peaks import Peaks
from .progress import Progress
from .report import environment, format_table, markdown_table, write_json
from .runner import involuntary_switches, run_cases
from . import suites_attention as attn
from . import suites_model as model

SUITES = ("fwd", "bwd", "decode", "block", "lm")
SUITE_HELP = {
    "fwd": "attention forward, GFLOP/s",
    "bwd": "attention backward alone, GFLOP/s (2.5x forward FLOPs)",
    "decode": "one token vs a KV cache, GB/s of K/V read",
    "block": "TransformerBlock forward+backward, GFLOP/s",
    "lm": "TransformerLM.generate, tokens/s",
}
# (default shapes, --quick shapes) per suite
DEFAULT_SHAPES = {
    "fwd": (attn.FWD_SHAPES, attn.FWD_QUICK_SHAPES),
    "bwd": (attn.BWD_SHAPES, attn.BWD_QUICK_SHAPES),
    "decode": (attn.DECODE_SHAPES, attn.DECODE_QUICK_SHAPES),
    "block": (model.BLOCK_SHAPES, model.BLOCK_QUICK_SHAPES),
    "lm": (model.LM_SHAPES, model.LM_QUICK_SHAPES),
}
DEFAULT_DTYPES = {"fwd": ["float32", "bfloat16"], "bwd": ["float32", "bfloat16"], "decode": ["float32", "bfloat16"],
                  "block": ["float32"], "lm": ["float32"]}
SHAPE_FORMATS = {
    "fwd": "BxHxLxD",
    "bwd": "BxHxLxD",
    "decode": "BxHxLxD or BxHq/HkvxLxD",
    "block": "BxLxDMODELxH",
    "lm": "BxPROMPTxNEW",
}


# --- option parsing ---------------------------------------------------------------------------

def _ints(text: str, count: int, what: str) -> tuple:
    try:
        dims = tuple(int(d) for d in text.strip().lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) != count or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"shape must be {what} with positive ints, got {text!r}")
    return dims


def _decode_shape(text: str) -> tuple:
    """'4x32/8x8192x128' -> (4, 32, 8, 8192, 128); '4x32x8192x128' -> (4, 32, 32, 8192, 128)."""
    parts = text.strip().lower().split("x")
    if len(parts) == 4 and "/" in parts[1]:
        heads_text, _, heads_kv_text = parts[1].partition("/")
        batch, heads, seqlen, head_dim = _ints("x".join([parts[0], heads_text, parts[2], parts[3]]), 4,
                                               SHAPE_FORMATS["decode"])
        heads_kv = _ints(heads_kv_text, 1, SHAPE_FORMATS["decode"])[0]
        if heads % heads_kv:
            raise argparse.ArgumentTypeError(f"Hq must be a multiple of Hkv, got {text!r}")
        return batch, heads, heads_kv, seqlen, head_dim
    batch, heads, seqlen, head_dim = _ints(text, 4, SHAPE_FORMATS["decode"])
    return batch, heads, heads, seqlen, head_dim


def parse_shapes(text: str) -> dict[str, list[tuple]]:
    """'1x8x2048x64,decode:4x32/8x8192x128,block:4x1024x512x8,lm:1x512x32' -> {suite: [shape, ...]}.

    An unprefixed BxHxLxD applies to fwd, bwd and decode (with Hkv = H); a "suite:" prefix
    applies to that suite only (formats: SHAPE_FORMATS).
    """
    shapes: dict[str, list[tuple]] = {}
    for item in text.split(","):
        suite, _, spec = item.strip().rpartition(":")
        if suite and suite not in SUITES:
            raise argparse.ArgumentTypeError(f"unknown suite {suite!r} in --shapes; choose from {', '.join(SUITES)}")
        for name in [suite] if suite else ["fwd", "bwd", "decode"]:
            if name == "decode":
                shape = _decode_shape(spec)
            else:
                shape = _ints(spec, len(SHAPE_FORMATS[name].split("x")), SHAPE_FORMATS[name])
            if name == "block" and (shape[2] % shape[3] or (shape[2] // shape[3]) % 2):
                raise argparse.ArgumentTypeError(f"block shape {spec!r}: DMODEL must be H times an even head_dim "
                                                 "(the block's RoPE rotates pairs)")
            shapes.setdefault(name, []).append(shape)
    return shapes


def parse_dtypes(text: str) -> list[str]:
    names = []
    for item in text.split(","):
        if item.strip() not in DTYPES:
            raise argparse.ArgumentTypeError(f"dtype must be one of {', '.join(DTYPES)}; got {item!r}")
        names.append(DTYPES[item.strip()])
    return names


def parse_impls(text: str) -> list[str]:
    names = [item.strip() for item in text.split(",")]
    known = IMPLEMENTATIONS + GPU_IMPLEMENTATIONS
    unknown = [name for name in names if name not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown implementation(s) {unknown}; choose from {', '.join(known)}")
    return names


def parse_suites(text: str) -> list[str]:
    names = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [name for name in names if name not in SUITES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown suite(s) {unknown}; choose from {', '.join(SUITES)}")
    return list(dict.fromkeys(names))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    suites = "; ".join(f"{name}: {text}" for name, text in SUITE_HELP.items())
    parser.description = ("Times fusedattn against torch SDPA (default backend) and a naive torch attention, "
                          "interleaved in one run (medians). Suites: " + suites + ".")
    parser.add_argument("--quick", action="store_true", help="small cases, fp32 only, under 30 s in all")
    parser.add_argument("--suite", type=parse_suites, default=list(SUITES),
                        help=f"comma-separated suites to run (default all: {','.join(SUITES)})")
    parser.add_argument("--shapes", type=parse_shapes, default={},
                        help="comma-separated shapes; BxHxLxD applies to fwd, bwd and decode; prefix one suite: "
                             + ", ".join(f"{s}:{f}" for s, f in SHAPE_FORMATS.items() if s != "fwd")
                             + " (e.g. 1x8x4096x64,decode:4x32/8x8192x128,lm:1x1024x64)")
    parser.add_argument("--dtype", type=parse_dtypes, default=None,
                        help="comma-separated dtypes for every suite: float32,bfloat16,float16,float64 (default: "
                             "fp32 and bf16 for fwd, bwd, decode; fp32 for block, lm; --quick fp32)")
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="no",
                        help="causal cases of fwd and bwd (default no; block and lm are causal models)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the inputs live (default: cuda when torch sees a GPU, else cpu); on cuda "
                             "every SDPA backend and fusedattn's CPU fallback are timed too")
    parser.add_argument("--impls", type=parse_impls, default=None,
                        help=f"comma-separated implementations (default all: {','.join(IMPLEMENTATIONS)}, on a GPU "
                             f"also {','.join(GPU_IMPLEMENTATIONS)})")
    parser.add_argument("--reps", type=positive_int, default=None,
                        help="interleaved rounds per case (default: ~3 s per case, 5..50; block, lm ~6 s, 3..20)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="threads for torch and fusedattn alike (default: torch's; fusedattn follows it)")
    parser.add_argument("--out", default="bench-out",
                        help="directory for bench.json, table.md and the PNG plots (default ./bench-out)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


# --- the cases --------------------------------------------------------------------------------

def build_cases(torch, args, device: str) -> list:
    """Every Case of the selected suites, in run order."""
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    cases = []
    for suite in args.suite:
        default, quick = DEFAULT_SHAPES[suite]
        shapes = args.shapes.get(suite) or (quick if args.quick else default)
        dtypes = args.dtype or (["float32"] if args.quick else DEFAULT_DTYPES[suite])
        if suite == "fwd":
            cases += attn.fwd_cases(torch, shapes, dtypes, causals, device)
        elif suite == "bwd":
            cases += attn.bwd_cases(torch, shapes, dtypes, causals, device)
        elif suite == "decode":
            cases += attn.decode_cases(torch, shapes, dtypes, device)
        elif suite == "block":
            cases += model.block_cases(torch, shapes, dtypes, device)
        elif suite == "lm":
            cases += model.lm_cases(torch, shapes, dtypes, device, quick=args.quick)
    return cases


def resolve_device(torch, name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    return name


# --- the command ------------------------------------------------------------------------------

NOISY_SWITCHES_PER_SECOND = 100  # an otherwise idle machine: a few tens per second


def noise_line(switches_start, seconds: float) -> str:
    """How often the OS preempted this run, and whether that makes the timings noisy."""
    if switches_start is None:
        return "context switches not available"
    rate = (involuntary_switches() - switches_start) / max(seconds, 1e-9)
    verdict = ("noisy: other processes were competing for the cores" if rate > NOISY_SWITCHES_PER_SECOND
               else "quiet enough")
    return f"{rate:.0f} involuntary context switches/s ({verdict})"


def check_out_dir(path: str) -> None:
    """SystemExit with a message, before the benchmark runs, unless results can be written to path."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"fusedattn bench: --out {path!r} cannot be a results folder: {error.strerror}") from None
    if not os.access(path, os.W_OK):
        raise SystemExit(f"fusedattn bench: --out {path!r} is not writable")


def run(args: argparse.Namespace) -> int:
    torch = require_torch()
    check_out_dir(args.out)
    try:
        _runtime.cpu_isa()
    except ValueError as error:
        raise SystemExit(f"fusedattn bench: {error}") from None
    started = time.perf_counter()
    switches_start = involuntary_switches()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        _runtime.set_num_threads(args.threads)
    device = resolve_device(torch, args.device)
    load_start = load_average()
    machine = machine_line(torch, device)

    print(versions_line(torch))
    print(f"device: {device}; machine: {machine}; load average: {load_start}")
    print("interleaved rounds (A B C A B C ...), medians; errors: max abs vs a float64 reference")
    print("measuring the GEMM peak and the read bandwidth (again after each case; the best is used) ...",
          flush=True)
    peaks = Peaks(torch, device, quick=args.quick)
    for line in peaks.lines():
        print("  at the start: " + line.replace(", best of the run", ""))

    cases = build_cases(torch, args, device)
    sys.stdout.flush()  # the progress bar goes to stderr
    results = run_cases(torch, cases, peaks, impls=args.impls, reps=args.reps, quick=args.quick, device=device,
                        progress=Progress(len(cases)))
    seconds = time.perf_counter() - started

    print()
    print(format_table(results))
    print()
    for line in peaks.lines():
        print(line)
    load_end = load_average()
    print("% peak: of the GEMM peak (fwd, bwd, block, lm: model FLOPs), of the read bandwidth (decode)")
    noise = noise_line(switches_start, seconds)
    print(f"wall time {seconds:.0f} s; load average {load_start} -> {load_end}; {noise}")

    env = environment(torch, device, peaks, args, load_start)
    env["involuntary_context_switches"] = None if switches_start is None else involuntary_switches() - switches_start
    json_path = os.path.join(args.out, "bench.json")
    write_json(json_path, env, results, seconds)
    table_path = os.path.join(args.out, "table.md")
    with open(table_path, "w") as file:
        dtypes = ",".join(SHORT_DTYPES.get(d, d) for d in (args.dtype or []))
        file.write(f"<!-- {time.strftime('%Y-%m-%d %H:%M')}; {versions_line(torch)}; {machine}; "
                   f"load {load_start} -> {load_end}; {seconds:.0f} s; {noise}"
                   f"{'; dtypes ' + dtypes if dtypes else ''} -->\n")
        file.write(markdown_table(results) + "\n\n")
        file.write("\n".join(peaks.lines()) + "\n")
    written = [json_path, table_path]
    if not args.no_plots:
        from .plots import write_plots

        written += write_plots(results, peaks, machine, args.out, torch.__version__)
    peaks.release()
    print("wrote " + ", ".join(written))
    return 0
